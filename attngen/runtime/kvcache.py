"""DecodeKernel: attention over a KV cache, FlashAttention's `flash_attn_with_kvcache` (issue 15).

One compiled module holds three kernels, launched in order on the caller's stream:
- kvcache_append (when new k, v are given): writes them into the cache at cache_seqlens[b] .. + seqlen_new;
- decode: one CTA per (split, KV head x row block, sequence) over the cache after the append;
- decode_combine (when the keys are split): merges the splits' partial (O, LSE).
On Hopper a second module holds the prefill kernel: the tiled wgmma forward reading its key tiles from the
cache's pages (planner/decode.py, make_prefill_plan); calls with at least PREFILL_MIN_QUERIES new tokens per
sequence (chunked prefill) run it after the append instead of decode and combine.
cache_seqlens and the block table stay on the GPU (never read on the host); the grid follows from the input
shapes and the cache's capacity, so a call can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..codegen import render
from ..codegen.compile import Binary
from ..codegen.signature import DECODE_COMBINE, KVCACHE_APPEND, decode_signature, forward_signature
from ..planner.decode import PREFILL_MIN_QUERIES, DecodePlan, decode_splits, prefill_loads
from ..planner.forward import Plan, tile_list_bytes
from ..spec import Spec
from ..variant import variant_of
from .arguments import modifier_args, stride_args
from .interop import _empty_like, _view
from .launch import ArgumentBlock, _stream_handle, check_layout, ensure_dynamic_smem, output_views
from .tma import TensorMapArgument
from .uploads import stream_handle

COMBINE_THREADS = 128     # 4 warps, one output row each
APPEND_THREADS = 128


def _int32_array(name: str, x, shape_text: str, ndim: int, ref):
    """The view of an int32 device array of ndim dims on ref's device and library, last dim contiguous."""
    view = _view(name, x)
    if view.kind != ref.kind or view.device != ref.device:
        raise ValueError(f"{name}: expected a {ref.kind} array on device {ref.device} (q's), got a {view.kind} "
                         f"array on device {view.device}")
    if view.dtype not in ("int32", "torch.int32") or len(view.shape) != ndim or view.strides[-1] != 1:
        raise ValueError(f"{name}: expected an int32 array {shape_text} with a contiguous last dim, got "
                         f"{view.dtype} of shape {list(view.shape)}")
    return view


class DecodeKernel:
    """The append, decode and combine kernels of one `layout: kvcache` spec. Call it as
    kernel(q, k_cache, v_cache, k, v, cache_seqlens=..., block_table=...) -> (out, lse)."""

    def __init__(self, spec: Spec, plan: DecodePlan, source: str, binary: Binary, cubin_path, sm_count: int,
                 prefill: "Prefill | None" = None):
        import cupy

        self.spec, self.plan, self.source, self.binary, self.sm_count = spec, plan, source, binary, sm_count
        self.prefill = prefill
        self.variant = variant_of(spec)
        self.signature = decode_signature(self.variant)
        module = cupy.RawModule(path=str(cubin_path))
        functions = {kind: module.get_function(render.kernel_name(spec, kind))
                     for kind in ("decode", "kvcache_append", "decode_combine")}
        functions["decode"].max_dynamic_shared_size_bytes = plan.smem_bytes
        self._module = module                              # the functions live as long as their module
        self._handles = {kind: f.kernel.ptr for kind, f in functions.items()}
        self._remembered = {}                              # torch call signature -> Remembered launches
        # a remembered launch swaps the leading pointer arguments of each kernel
        assert self.signature.names[:9] == ("q", "k_cache", "v_cache", "o", "lse", "o_partial", "lse_partial",
                                            "cache_seqlens", "block_table")
        assert KVCACHE_APPEND.names[:6] == ("k_new", "v_new", "k_cache", "v_cache", "cache_seqlens", "block_table")
        assert DECODE_COMBINE.names[:4] == ("o_partial", "lse_partial", "o", "lse")

    @property
    def resources(self):
        return self.binary.resources

    def __repr__(self):
        p = self.plan
        return (f"<attngen.DecodeKernel {render.kernel_name(self.spec, 'decode')}: {p.block_m} rows x {p.cta_keys} keys "
                f"per stage, {p.stages} stages, {p.smem_bytes} B smem, {self.resources.registers} regs>")

    def __call__(self, q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                 scale: float | None = None, alibi_slopes=None, num_splits: int = 0, out=None, lse=None):
        """out [batch, seqlen_q, heads_q, head_dim_v] and lse [batch, heads_q, seqlen_q] fp32 may be given to
        write into (contiguous, q's library and device)."""
        fast = out is None and lse is None and alibi_slopes is None
        signature = _call_signature(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, num_splits) if fast else None
        if signature is not None:
            remembered = self._remembered.get(signature)
            if remembered is not None:
                return self._launch_again(remembered, q, k_cache, v_cache, k, v, cache_seqlens, block_table)
        spec, variant, plan = self.spec, self.variant, self.plan
        vector = variant.global_vector
        qv, kcv, vcv = (check_layout(spec, name, _view(name, x), vector)
                        for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)))
        if len({qv.kind, kcv.kind, vcv.kind}) > 1 or len({qv.device, kcv.device, vcv.device}) > 1:
            raise ValueError("q, k_cache, v_cache: expected one array library and one device")
        batch, seqlen_q, heads_q, d = qv.shape
        pages_or_batch, rows_per, heads_kv, d_cache = kcv.shape
        if d != spec.head_dim or d_cache != spec.head_dim:
            raise ValueError(f"q, k_cache: head_dim must be the built kernel's {spec.head_dim}, got {d} and {d_cache}")
        if vcv.shape[:3] != kcv.shape[:3] or vcv.shape[3] != spec.head_dim_v:
            raise ValueError(f"v_cache: expected shape [{pages_or_batch}, {rows_per}, {heads_kv}, {spec.head_dim_v}], "
                             f"got {list(vcv.shape)}")
        if heads_kv < 1 or heads_q % heads_kv:
            raise ValueError(f"q/k_cache: heads_q={heads_q} must be a multiple of heads_kv={heads_kv} (GQA/MQA)")
        for name, n, want in (("q", heads_q, spec.num_heads), ("k_cache", heads_kv, spec.num_kv_heads)):
            if want is not None and n != want:
                raise ValueError(f"{name}: expected {want} heads (the spec's), got {n}")
        if not 1 <= seqlen_q < 2**30 or not 1 <= batch < 2**30:
            raise ValueError(f"q: expected [batch >= 1, seqlen_q >= 1, heads, head_dim], got {list(qv.shape)}")
        if spec.page_size:
            if block_table is None:
                raise ValueError(f"block_table: this kernel reads a paged cache (page_size={spec.page_size}); give "
                                 "the int32 [batch, max_pages] block table")
            if rows_per != spec.page_size:
                raise ValueError(f"k_cache: expected pages of {spec.page_size} rows (dim 1: the built kernel's "
                                 f"page_size), got {rows_per}")
            tv = _int32_array("block_table", block_table, "[batch, max_pages]", 2, qv)
            if tv.shape[0] != batch:
                raise ValueError(f"block_table: expected {batch} rows (q's batch), got {tv.shape[0]}")
            capacity, table, table_stride = tv.shape[1] * spec.page_size, tv.ptr, tv.strides[0]
        else:
            if block_table is not None:
                raise ValueError("block_table: this kernel reads a contiguous cache; build a spec with page_size "
                                 "(attention_with_kvcache does, from a given block table)")
            if pages_or_batch != batch:
                raise ValueError(f"k_cache: expected {batch} sequences (q's batch) in a contiguous cache, got "
                                 f"{pages_or_batch}")
            capacity, table, table_stride = rows_per, 0, 0
        if capacity >= 2**30:
            raise ValueError(f"k_cache: a capacity of {capacity} rows per sequence is out of range (< 2^30)")
        seqlens = _int32_array("cache_seqlens", cache_seqlens, f"[{batch}]", 1, qv)
        if seqlens.shape != (batch,):
            raise ValueError(f"cache_seqlens: expected shape [{batch}] (q's batch), got {list(seqlens.shape)}")
        if (k is None) != (v is None):
            raise ValueError("k, v: give both new keys and values, or neither")
        seqlen_new = 0
        if k is not None:
            kv_, vv_ = (check_layout(spec, name, _view(name, x), vector) for name, x in (("k", k), ("v", v)))
            if kv_.shape[0] != batch or kv_.shape[2:] != (heads_kv, spec.head_dim) or vv_.shape[:3] != kv_.shape[:3] \
                    or vv_.shape[3] != spec.head_dim_v or {kv_.kind, vv_.kind, kv_.device, vv_.device} != {qv.kind, qv.device}:
                raise ValueError(f"k, v: expected [{batch}, seqlen_new, {heads_kv}, {spec.head_dim}] and "
                                 f"[..., {spec.head_dim_v}] arrays like q's, got {list(kv_.shape)} and {list(vv_.shape)}")
            seqlen_new = kv_.shape[1]
            if not 1 <= seqlen_new <= capacity:
                raise ValueError(f"k: seqlen_new={seqlen_new} must lie in 1..{capacity} (the cache's capacity)")
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
            raise ValueError(f"num_splits: expected an int >= 0 (0: the planner chooses), got {num_splits!r}")
        scale = spec.softmax_scale if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")

        keep = []
        mods = modifier_args(spec, variant, scale, alibi_slopes, None, (batch, heads_q, seqlen_q, capacity), qv, keep)
        group = heads_q // heads_kv
        row_blocks = -(-group * seqlen_q // plan.block_m)
        splits = decode_splits(plan, self.sm_count, batch, heads_kv, row_blocks, capacity, num_splits)
        out_shape, lse_shape = (batch, seqlen_q, heads_q, spec.head_dim_v), (batch, heads_q, seqlen_q)
        out, lse, ov, lv = output_views(spec, qv, out, lse, out_shape, lse_shape)
        rows = batch * heads_q * seqlen_q
        if splits > 1:
            o_partial = _empty_like(qv, (splits, rows, plan.head_dim_v_padded), "fp32")
            lse_partial = _empty_like(qv, (splits, rows), "fp32")
            keep += [o_partial, lse_partial]
            partial = (_view("o_partial", o_partial).ptr, _view("lse_partial", lse_partial).ptr)
        else:
            partial = (0, 0)
        stream = _stream_handle(qv)
        import cupy

        with cupy.cuda.Device(qv.device):
            if seqlen_new:
                args = KVCACHE_APPEND.pack({
                    "k_new": kv_.ptr, "v_new": vv_.ptr, "k_cache": kcv.ptr, "v_cache": vcv.ptr,
                    "cache_seqlens": seqlens.ptr, "block_table": table, **stride_args("k_new", kv_),
                    **stride_args("v_new", vv_), **stride_args("k", kcv), **stride_args("v", vcv),
                    "block_table_stride": table_stride, "capacity": capacity, "heads_kv": heads_kv})
                appending = ArgumentBlock(self._handles["kvcache_append"], (seqlen_new, batch, 1),
                                          (APPEND_THREADS, 1, 1), 0, args)
                appending.launch(stream)
            else:
                appending = None
            if self._prefills(qv):
                prefilling = self.prefill.launch(qv, kcv, vcv, ov, lv, seqlens, table, table_stride, capacity,
                                                 seqlen_new, scale, mods, stream)
                if signature is not None:
                    self._remember(signature, Remembered(appending, prefilling, None, out_shape, lse_shape, (1, 0, 0),
                                                         self.prefill.cache_slots))
                return out, lse
            args = self.signature.pack({
                "q": qv.ptr, "k_cache": kcv.ptr, "v_cache": vcv.ptr, "o": ov.ptr, "lse": lv.ptr,
                "o_partial": partial[0], "lse_partial": partial[1], "cache_seqlens": seqlens.ptr, "block_table": table,
                **stride_args("q", qv), **stride_args("k", kcv), **stride_args("v", vcv), **stride_args("o", ov),
                "block_table_stride": table_stride, "seqlen_q": seqlen_q, "seqlen_new": seqlen_new,
                "capacity": capacity, "heads_q": heads_q, "heads_kv": heads_kv, "group_size": group,
                "num_splits": splits,
                # Modified scores are already in natural units; otherwise the kernel scales raw q.k.
                "scale_log2": (1.0 if variant.score_mods else scale) * math.log2(math.e), **mods})
            decoding = ArgumentBlock(self._handles["decode"], (splits, heads_kv * row_blocks, batch), (plan.threads, 1, 1),
                                     plan.smem_bytes, args)
            decoding.launch(stream)
            combining = None
            if splits > 1:
                args = DECODE_COMBINE.pack({"o_partial": partial[0], "lse_partial": partial[1], "o": ov.ptr,
                                            "lse": lv.ptr, **stride_args("o", ov), "batch_size": batch,
                                            "heads_q": heads_q, "seqlen_q": seqlen_q, "num_splits": splits})
                combining = ArgumentBlock(self._handles["decode_combine"], (-(-rows // (COMBINE_THREADS // 32)), 1, 1),
                                          (COMBINE_THREADS, 1, 1), 0, args)
                combining.launch(stream)
        if signature is not None:
            self._remember(signature, Remembered(appending, decoding, combining, out_shape, lse_shape,
                                                 (splits, rows, plan.head_dim_v_padded)))
        return out, lse

    def _remember(self, signature, launches: "Remembered") -> None:
        if len(self._remembered) >= MAX_REMEMBERED:
            self._remembered.clear()
        self._remembered[signature] = launches

    def _prefills(self, q) -> bool:
        """Whether this call runs the prefill kernel: one is built, and each sequence brings enough new tokens."""
        return self.prefill is not None and len(q.shape) == 4 and q.shape[1] >= PREFILL_MIN_QUERIES

    def _launch_again(self, r: "Remembered", q, k_cache, v_cache, k, v, cache_seqlens, block_table):
        """A call whose torch signature was launched before: fresh outputs (and partial buffers), the new
        pointers swapped into the remembered launches; only their alignment is checked again."""
        import torch

        pointers = [x.data_ptr() for x in (q, k_cache, v_cache) + ((k, v) if k is not None else ())]
        if any(p % (2 * self.variant.global_vector) for p in pointers):
            self._remembered.clear()                      # the general path explains the misalignment
            return self(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, block_table=block_table)
        device = q.device
        out = torch.empty(r.out_shape, dtype=q.dtype, device=device)
        lse = torch.empty(r.lse_shape, dtype=torch.float32, device=device)
        splits, rows, dv = r.partial
        if splits > 1:       # held by this frame until the launches are queued (stream-ordered allocator)
            o_partial = torch.empty((splits, rows, dv), dtype=torch.float32, device=device)
            lse_partial = torch.empty((splits, rows), dtype=torch.float32, device=device)
            partial = (o_partial.data_ptr(), lse_partial.data_ptr())
        else:
            partial = (0, 0)
        cache = (cache_seqlens.data_ptr(), 0 if block_table is None else block_table.data_ptr())
        index = q.get_device()
        import cupy

        with cupy.cuda.Device(index):
            stream = stream_handle("torch", index)
            if r.appending is not None:
                r.appending.launch(stream, (k.data_ptr(), v.data_ptr(), pointers[1], pointers[2], *cache))
            if r.cache_slots is not None:      # the prefill: q, k, v maps, o, lse lead; the cache's arrays by index
                r.decoding.launch(stream, (*pointers[:3], out.data_ptr(), lse.data_ptr()),
                                  tuple(zip(r.cache_slots, cache)))
            else:
                r.decoding.launch(stream, (*pointers[:3], out.data_ptr(), lse.data_ptr(), *partial, *cache))
            if r.combining is not None:
                r.combining.launch(stream, (*partial, out.data_ptr(), lse.data_ptr()))
        return out, lse


MAX_REMEMBERED = 256


class Prefill:
    """The forward over a KV cache (chunked prefill): the wgmma forward kernel whose producer reads each key
    tile from the cache as one copy-engine box (a contiguous cache, pages of whole tiles) or gathers it row by
    row with cp.async (smaller pages; planner/decode.py, prefill_loads). A call signature's launch is remembered
    like the decode kernel's: a repeat swaps q, the caches (tensor maps re-encode by address), o, lse,
    cache_seqlens and the block table. (The general path costs ~250 us of host time on the H200.)"""

    def __init__(self, spec: Spec, plan: Plan, source: str, binary: Binary, cubin_path):
        import cupy

        self.spec, self.plan, self.source, self.binary = spec, plan, source, binary
        self.variant = variant_of(spec)
        self.loads = prefill_loads(spec.page_size, plan.block_n)
        self.signature = forward_signature(self.variant, True, self.loads.gather)
        names = self.signature.names
        assert names[3:5] == ("o", "lse") and names[0] == "q_map"       # what a remembered launch swaps first
        self.cache_slots = (names.index("cache_seqlens"), names.index("block_table"))
        self._module = cupy.RawModule(path=str(cubin_path))
        self._function = self._module.get_function(render.kernel_name(spec, "prefill"))
        self._function.max_dynamic_shared_size_bytes = plan.smem_bytes
        self._handle = self._function.kernel.ptr

    def _cache_arguments(self, kcv, vcv) -> dict:
        """The caches as the kernel reads them: pointers and strides (the producer gathers rows), or tensor maps
        with one box per key tile."""
        if self.loads.gather:
            return {"k": kcv.ptr, "v": vcv.ptr, **stride_args("k", kcv), **stride_args("v", vcv)}
        return {"k_map": TensorMapArgument("k_cache", self.spec.dtype, kcv.ptr, kcv.shape, kcv.strides, self.loads.box_rows),
                "v_map": TensorMapArgument("v_cache", self.spec.dtype, vcv.ptr, vcv.shape, vcv.strides, self.loads.box_rows)}

    def launch(self, qv, kcv, vcv, ov, lv, seqlens, table: int, table_stride: int, capacity: int, seqlen_new: int,
               scale: float, mods: dict, stream: int) -> ArgumentBlock:
        p, spec = self.plan, self.spec
        batch, seqlen_q, heads_q, _ = qv.shape
        heads_kv = kcv.shape[2]
        smem = ensure_dynamic_smem(self._function, p.smem_bytes + tile_list_bytes(spec, p.warps, p.block_n, capacity),
                                   f"k_cache: a capacity of {capacity} rows needs")
        args = self.signature.pack({
            "q_map": TensorMapArgument("q", spec.dtype, qv.ptr, qv.shape, qv.strides, p.block_m),
            **self._cache_arguments(kcv, vcv),
            "o": ov.ptr, "lse": lv.ptr, **stride_args("o", ov), "seqlen_q": seqlen_q, "heads_q": heads_q,
            "group_size": heads_q // heads_kv,
            # Modified scores are already in natural units; otherwise the kernel scales raw q.k.
            "scale_log2": (1.0 if self.variant.score_mods else scale) * math.log2(math.e), "position_shift": 0,
            "cache_seqlens": seqlens.ptr, "block_table": table, "block_table_stride": table_stride,
            "capacity": capacity, "seqlen_new": seqlen_new, **mods})
        block = ArgumentBlock(self._handle, (math.ceil(seqlen_q / p.block_m), heads_q, batch), (p.threads, 1, 1),
                              smem, args)
        block.launch(stream)
        return block


@dataclass(frozen=True)
class Remembered:
    """The launches of one call signature: append (or None), decode or prefill, combine (or None); output
    shapes; (splits, rows, padded head_dim_v) of the partial buffers; for a prefill, where its arguments hold
    cache_seqlens and the block table (a decode launch leads with them)."""

    appending: ArgumentBlock | None
    decoding: ArgumentBlock
    combining: ArgumentBlock | None
    out_shape: tuple
    lse_shape: tuple
    partial: tuple
    cache_slots: tuple | None = None


def _call_signature(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, num_splits):
    """What fixes a call's launches for torch tensors (shapes, strides, dtypes, devices of every array; scale,
    num_splits), or None for anything else; the pointers are left out."""
    arrays = [x for x in (q, k_cache, v_cache, k, v, cache_seqlens, block_table) if x is not None]
    if type(q).__module__ != "torch" or any(type(x) is not type(q) for x in arrays) or (k is None) != (v is None):
        return None
    if not all(x.is_cuda for x in arrays):
        return None
    return (tuple((x.shape, x.stride(), x.dtype, x.get_device()) for x in arrays), k is None, block_table is None,
            scale, type(scale), num_splits, type(num_splits))
