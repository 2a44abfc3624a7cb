"""Each kernel's parameter list, declared once: the template renders its `__global__` parameters from it
(`{{ signature.declaration() }}`) and the launcher packs its arguments by name through it (`pack`), so the
two cannot drift. A new per-call tensor is one Param here (or in its modifier) plus the code that uses it.

Groups, in the order a kernel takes them:
- the tensors (pointers, or tensor maps on the wgmma path) and their strides [batch, seq, head];
- the sizes: seqlen_q, seqlen_k, heads_q, group_size, scale_log2, position_shift (and the backward's scale); a varlen
  kernel takes its launch's schedule (a descriptor per tile) and the total rows instead of seqlen_q, seqlen_k;
- a runtime BlockMask's block-CSR (query-major for the forward and dQ, kv-major for dK/dV);
- the modifiers' parameters (modifiers.py), the pattern's block table, the named tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .modifiers import ActiveModifiers, Param
from ..planner.decode import prefill_loads
from ..variant import Variant


def strides(tensor: str) -> tuple[Param, ...]:
    return tuple(Param("long long", f"{tensor}_stride_{axis}") for axis in "bsh")


def pointers(ctype: str, *names: str) -> tuple[Param, ...]:
    return tuple(Param(ctype, name) for name in names)


def maps(*names: str) -> tuple[Param, ...]:
    return tuple(Param("const __grid_constant__ TensorMap", f"{name}_map") for name in names)


# position_shift: added to the bottom-right alignment seqlen_k - seqlen_q of causal, windows and ALiBi when q and
# k are shards of a longer sequence (attention's position_offsets); 0 otherwise
SIZES = (Param("int", "seqlen_q"), Param("int", "seqlen_k"), Param("int", "heads_q"), Param("int", "group_size"),
         Param("float", "scale_log2"), Param("int", "position_shift"))
# tile_info: two int4 per scheduled tile, (sequence, tile, first q row, first k row), (seqlen_q, seqlen_k, -, -)
VARLEN_SIZES = (Param("const int4*", "tile_info"), Param("int", "total_q"), Param("int", "total_k"), *SIZES[2:])
# a varlen sequence's rows in the padded per-row buffers (row stats, the dQ accumulator) start at
# padded_tiles[b] * BLOCK_M (padded_tiles: the unsorted schedule of the query tiles)
VARLEN_PADDED = (Param("const int*", "padded_tiles"),)
QUERY_MAJOR_LAYOUT = (*pointers("const int*", "full_row_ptr", "full_cols", "partial_row_ptr", "partial_cols"),
                      Param("int", "mask_heads"), Param("int", "mask_q_blocks"))
KV_MAJOR_LAYOUT = (*pointers("const int*", "full_col_ptr", "full_rows", "partial_col_ptr", "partial_rows"),
                   Param("int", "mask_heads"), Param("int", "mask_kv_blocks"))
BLOCK_TABLE = (Param("const unsigned*", "block_bits"), Param("int", "block_bits_heads"),
               Param("int", "block_bits_rows"), Param("int", "block_bits_words"))

_PACKERS = {"long long": np.int64, "int": np.int32, "float": np.float32}


@dataclass(frozen=True)
class Signature:
    """One kernel's ordered parameters."""

    params: tuple[Param, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def declaration(self, width: int = 112) -> str:
        """The parameter list as C, wrapped to lines of at most `width` characters."""
        lines, line = [], ""
        for p in self.params:
            if line and len(line) + len(p.declaration) + 6 > width:
                lines.append(line + ",")
                line = ""
            line = f"{line}, {p.declaration}" if line else p.declaration
        return "\n    ".join(lines + [line])

    def pack(self, values: dict) -> tuple:
        """The launch's arguments in order, typed as the kernel declares them; every parameter must be
        given, and nothing else. (On every backward call: one conversion per parameter, nothing more.)"""
        if len(values) != len(self.params):
            self._refuse(values)
        try:
            return tuple([convert(values[name]) for name, convert in self._converters])
        except KeyError:
            self._refuse(values)

    @functools.cached_property
    def _converters(self) -> tuple:
        return tuple((p.name, _converter(p)) for p in self.params)

    def _refuse(self, values: dict):
        missing = [p.name for p in self.params if p.name not in values]
        extra = sorted(set(values) - set(self.names))
        raise TypeError(f"kernel arguments: missing {missing}, unexpected {extra}")


def _converter(param: Param):
    """How a value becomes this parameter's argument: numpy scalars of its C type; a tensor map (the
    runtime's TensorMapArgument) as it is."""
    if param.ctype.endswith("TensorMap"):
        def tensor_map(value):
            if not hasattr(value, "address"):
                raise TypeError(f"kernel argument {param.name}: expected a tensor map")
            return value
        return tensor_map
    return np.uint64 if param.ctype.endswith("*") else _PACKERS[param.ctype]


def sizes(variant: Variant) -> tuple[Param, ...]:
    if variant.kvcache:
        return PREFILL_SIZES
    return VARLEN_SIZES if variant.varlen else SIZES


def modifier_params(variant: Variant) -> tuple[Param, ...]:
    """The score modifiers' parameters, then the pattern's block table, then the named tensors."""
    return (*ActiveModifiers(variant).params(), *(BLOCK_TABLE if variant.block_table else ()),
            *(Param(f"const {t.ctype}*", t.name) for t in variant.tensors))


# FP8: the factors that undo each input's quantisation, per (batch, KV head) at [b * stride_b + h * stride_h]
# (strides 0: one factor for the whole tensor), as FlashAttention-3's q_descale, k_descale, v_descale.
FP8_DESCALES = (*pointers("const float*", "q_descale", "k_descale", "v_descale"), Param("int", "descale_stride_b"),
                Param("int", "descale_stride_h"))


# FP8's V^T pass (pieces/fp8_v_transpose.cu.j2): V's strides in elements (= bytes), V^T contiguous.
FP8_V_TRANSPOSE = Signature((Param("const unsigned char*", "v"), Param("unsigned char*", "vt"), *strides("v"),
                             Param("int", "seqlen_k"), Param("int", "keys_padded")))


def forward_signature(variant: Variant, wgmma: bool, gather: bool = False) -> Signature:
    """q, k, v (tensor maps on the wgmma path), o, lse first: a remembered launch swaps exactly these. Over a KV
    cache (prefill, the wgmma path only) the k and v maps address the cache's pages, [page or sequence, row,
    head, dim], or (gather: the producer warpgroup reads rows itself) k and v are the caches' pointers with
    their strides; the sizes are PREFILL_SIZES. FP8: the v map addresses V^T in P's key order (fp8.py).
    """
    if wgmma and gather:
        inputs = (*maps("q"), *pointers("const elem_t*", "k", "v"), Param("elem_t*", "o"), Param("float*", "lse"),
                  *strides("k"), *strides("v"))
    elif wgmma:
        inputs = (*maps("q", "k", "v"), Param("elem_t*", "o"), Param("float*", "lse"))
    else:
        inputs = (*pointers("const elem_t*", "q", "k", "v"), Param("elem_t*", "o"), Param("float*", "lse"),
                  *strides("q"), *strides("k"), *strides("v"))
    layout = QUERY_MAJOR_LAYOUT if variant.schedule == "runtime" else ()
    return Signature((*inputs, *strides("o"), *sizes(variant), *layout, *modifier_params(variant),
                      *(FP8_DESCALES if variant.fp8 else ())))



def backward_dq_signature(variant: Variant) -> Signature:
    layout = QUERY_MAJOR_LAYOUT if variant.schedule == "runtime" else ()
    return Signature((*pointers("const elem_t*", "q", "k", "v", "dout"), *pointers("const float*", "lse", "delta"),
                      Param("elem_t*", "dq"), *strides("q"), *strides("k"), *strides("v"), *strides("do"),
                      *strides("dq"), *sizes(variant), Param("float", "scale"), *layout, *modifier_params(variant)))


def backward_dkdv_signature(variant: Variant, wgmma: bool, fused_dq: bool) -> Signature:
    """fused_dq: the pass also adds dQ into a zeroed fp32 buffer (always on the wgmma path)."""
    fused = ((Param("float*", "dq_accum"), Param("int", "dq_rows_padded"), *(VARLEN_PADDED if variant.varlen else ()))
             if fused_dq else ())
    grads = (*pointers("elem_t*", "dk", "dv"), *fused)
    if wgmma:
        inputs = (*maps("q", "k", "v", "do"), Param("const float2*", "row_stats"), *grads)
    else:
        inputs = (*pointers("const elem_t*", "q", "k", "v", "dout"), *pointers("const float*", "lse", "delta"),
                  *grads, *strides("q"), *strides("k"), *strides("v"), *strides("do"))
    layout = KV_MAJOR_LAYOUT if variant.schedule == "runtime" else ()
    return Signature((*inputs, *strides("dk"), *strides("dv"), *sizes(variant), Param("float", "scale"), *layout,
                      *modifier_params(variant)))


# a varlen helper finds a row's sequence: seqlen_q is then all rows (total_q), batch strides are 0
VARLEN_ROWS = (Param("const int*", "cu_seqlens_q"), *VARLEN_PADDED, Param("int", "batch_size"))


def backward_delta_signature(padded: bool, varlen: bool = False) -> Signature:
    """padded (the wgmma dK/dV pass): per query row (LSE in base 2, delta), rows padded to whole steps."""
    stats = ((Param("const float*", "lse"), Param("float2*", "row_stats")) if padded else (Param("float*", "delta"),))
    return Signature((*pointers("const elem_t*", "o", "dout"), *stats, *strides("o"), *strides("do"),
                      Param("int", "seqlen_q"), Param("int", "heads_q"),
                      *((Param("int", "rows_padded"),) if padded else ()), Param("int", "rows"),
                      *(VARLEN_ROWS if padded and varlen else ())))


def dq_convert_signature(varlen: bool = False) -> Signature:
    return Signature((Param("const float*", "dq_accum"), Param("elem_t*", "dq"), *strides("dq"),
                      Param("int", "seqlen_q"), Param("int", "heads_q"), Param("int", "rows_padded"),
                      Param("float", "scale"), Param("long long", "pairs"), *(VARLEN_ROWS if varlen else ())))


DQ_CONVERT = dq_convert_signature()

# The varlen schedule (one CTA): the tiles of block_rows rows of each sequence (query tiles, or key tiles
# when tiles_over_keys), the sequences heaviest first when sort is set; offsets are checked against the totals.
# With tile_info (capacity > 0) it also writes each scheduled tile's descriptor (the kernels' VARLEN_SIZES).
VARLEN_SCHEDULE = Signature((*pointers("const int*", "cu_seqlens_q", "cu_seqlens_k"), Param("int", "batch_size"),
                             Param("int", "total_q"), Param("int", "total_k"), Param("int", "tiles_over_keys"),
                             Param("int", "block_rows"), Param("int", "sort"), Param("int", "reverse"),
                             Param("int", "tile_capacity"), *pointers("int*", "tile_order", "tile_start"),
                             Param("int4*", "tile_info")))


# ---- attention over a KV cache (layout: kvcache): the decode kernel, and the append and combine beside it
# The cache's strides are k's and v's: [page or sequence, row, head]; block_table null for a contiguous cache.
CACHE = (*pointers("const int*", "cache_seqlens", "block_table"),)
CACHE_SIZES = (Param("int", "block_table_stride"), Param("int", "capacity"))


# The forward over a KV cache (chunked prefill): sequence b's keys are its first cache_seqlens[b] + seqlen_new cache
# rows (at most capacity); there is no seqlen_k argument (each CTA finds its own)
PREFILL_SIZES = (Param("int", "seqlen_q"), *SIZES[2:], *CACHE, *CACHE_SIZES, Param("int", "seqlen_new"))


def decode_signature(variant: Variant) -> Signature:
    """o and lse, or (split keys) o_partial and lse_partial [split][batch x heads_q x seqlen_q][...]."""
    return Signature((*pointers("const elem_t*", "q", "k_cache", "v_cache"), Param("elem_t*", "o"),
                      Param("float*", "lse"), *pointers("float*", "o_partial", "lse_partial"), *CACHE,
                      *strides("q"), *strides("k"), *strides("v"), *strides("o"), *CACHE_SIZES,
                      Param("int", "seqlen_q"), Param("int", "seqlen_new"), Param("int", "heads_q"),
                      Param("int", "heads_kv"), Param("int", "group_size"), Param("int", "num_splits"),
                      Param("float", "scale_log2"), *modifier_params(variant)))


KVCACHE_APPEND = Signature((*pointers("const elem_t*", "k_new", "v_new"), *pointers("elem_t*", "k_cache", "v_cache"),
                            *CACHE, *strides("k_new"), *strides("v_new"), *strides("k"), *strides("v"),
                            *CACHE_SIZES, Param("int", "heads_kv")))
DECODE_COMBINE = Signature((*pointers("const float*", "o_partial", "lse_partial"), Param("elem_t*", "o"),
                            Param("float*", "lse"), *strides("o"), Param("int", "batch_size"), Param("int", "heads_q"),
                            Param("int", "seqlen_q"), Param("int", "num_splits")))


def kernel_signatures(kind: str, variant: Variant, plan) -> dict[str, Signature]:
    """The signatures of every kernel in one rendered source: the entry kernel of `kind` (forward,
    backward_dq, backward_dkdv) with `plan` (its Plan or BackwardPass), plus the helpers compiled beside it
    (the delta kernel; the dQ conversion beside a dK/dV pass that adds dQ with atomics)."""
    if kind == "decode":
        return {"decode": decode_signature(variant), "kvcache_append": KVCACHE_APPEND, "decode_combine": DECODE_COMBINE}
    if kind == "prefill":           # the forward template over a cache: its entry is the forward's
        return {"forward": forward_signature(variant, True, prefill_loads(variant.page_size, plan.block_n).gather)}
    wgmma = plan.path == "wgmma"
    schedule = {"varlen_schedule": VARLEN_SCHEDULE} if variant.varlen else {}
    if kind == "forward":
        transpose = {"fp8_v_transpose": FP8_V_TRANSPOSE} if variant.fp8 else {}
        return {"forward": forward_signature(variant, wgmma), **schedule, **transpose}
    if kind == "backward_dq":
        return {"backward_dq": backward_dq_signature(variant), "backward_delta": backward_delta_signature(False),
                **schedule}
    fused = bool(plan.fused_dq)
    found = {"backward_dkdv": backward_dkdv_signature(variant, wgmma, fused), **schedule}
    if fused:
        found["backward_delta"] = backward_delta_signature(wgmma, variant.varlen)
        found["backward_dq_convert"] = dq_convert_signature(variant.varlen)
    return found
