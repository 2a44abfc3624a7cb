"""Variant: what a spec asks of the kernel beyond plain attention, in the terms the templates, the
planner and the launcher share (the key-tile schedule, the predicates, the score modifiers and the
run-time arguments they need). A pure function of the spec.

Schedules:
- ``dense``: key tiles 0..n-1 in order (bounded by causality); only tails and the diagonal are masked.
- ``pattern``: the mask is code. Each CTA classifies every key tile with the pattern's tile predicates
  (kept / full) and lists the kept ones in shared memory; no index tensor is read.
- ``runtime``: the kept blocks come from a BlockMask's block-CSR tensors given at call time.

Layouts (``varlen``): a batch layout's CTA takes its (batch, query tile) from the grid; a varlen layout's
CTA takes a place in a schedule the launch computes from cu_seqlens (the tiles of the heaviest sequences
first), and its sequence's lengths and first rows from cu_seqlens.

Global I/O (``global_vector``): head dims that are multiples of 8 move 16 bytes per access; any other head
dim (FlashAttention takes 1..256) moves single elements, bounded by the real head dim, so nothing past it
is read or written and no padded copy is made.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .expressions import TensorDecl, tensor_decls
from .masks import cuda_helpers
from .spec import Spec

VECTOR_ELEMENTS = 8     # a 16-byte global access moves 8 fp16/bf16 elements


@dataclass(frozen=True)
class Variant:
    schedule: str                       # "dense" | "pattern" | "runtime"
    mask_expr: str                      # the pattern's element predicate ("true": none)
    tile_kept: str                      # the pattern's tile predicates (schedule "pattern")
    tile_full: str
    mask_helpers: str                   # C definitions the predicates call (masks.cuda_helpers), or ""
    mask_spans: tuple[str, str, str, str] | None   # the element predicate as spans per row (Pattern.cuda_spans)
    mask_block: tuple[int, int]         # block-CSR block size (schedule "runtime"), else (0, 0)
    block_table: bool                   # the pattern reads a block table through block_bit()
    mask_mod: str | None
    score_mod: str | None
    score_mod_grad: str | None
    softcap: float | None
    alibi: bool
    tensors: tuple[TensorDecl, ...]
    global_vector: int                  # elements per global load/store of q, k, v, o and the gradients (below)
    varlen: bool                        # packed sequences: each CTA finds its sequence through cu_seqlens
    kvcache: bool                       # keys in a KV cache (contiguous or paged), lengths from cache_seqlens
    page_size: int | None               # a paged cache's rows per page
    reverse_query_tiles: bool           # query tiles run last first: the heavy ones under causal-like masks
    fp8: bool = False                   # e4m3 inputs (V as V^T in P's key order), descale factors, bf16 output

    @property
    def score_mods(self) -> bool:
        """Scores are modified before the softmax (the kernel then works in natural units)."""
        return self.softcap is not None or self.alibi or self.score_mod is not None

    @property
    def predicate_everywhere(self) -> bool:
        """A user mask_mod has no tile predicate: every visited tile evaluates the element predicate, unless
        a runtime BlockMask says which blocks are full (as FlexAttention, full blocks skip the mask_mod)."""
        return self.mask_mod is not None and self.schedule != "runtime"

    @property
    def partial_tiles_need_predicate(self) -> bool:
        """A partial tile evaluates an element predicate only if there is one (the pattern's or a mask_mod):
        without one, a runtime layout's partial blocks are visible everywhere inside."""
        return self.mask_expr != "true" or self.mask_mod is not None

    @property
    def predicate_cost(self) -> int:
        """Integer divisions/remainders in the predicates (each holds registers in masked tiles)."""
        text = self.mask_expr + (self.mask_mod or "")
        return text.count("/") + text.count("%")


@functools.lru_cache(maxsize=256)
def variant_of(spec: Spec) -> Variant:
    pattern = spec.mask_pattern
    element = pattern if pattern is not None else spec.mask_element
    if spec.mask is None:
        schedule, mask_expr, kept, full = "dense", "true", "true", "true"
    elif pattern is None:     # a runtime layout: its partial blocks evaluate the element pattern, if any
        schedule, mask_expr, kept, full = "runtime", "true" if element is None else element.cuda_expr(), "true", "true"
    else:
        schedule, mask_expr = "pattern", pattern.cuda_expr()
        kept, full = pattern.cuda_tile_expr()
    return Variant(
        schedule=schedule, mask_expr=mask_expr, tile_kept=kept, tile_full=full,
        mask_helpers=cuda_helpers(element),
        mask_spans=element.cuda_spans() if spec.mask is not None and element is not None else None,
        mask_block=spec.mask_block_size if schedule == "runtime" else (0, 0),
        block_table=pattern is not None and pattern.table_block_size is not None,
        mask_mod=spec.mask_mod, score_mod=spec.score_mod, score_mod_grad=spec.score_mod_grad, softcap=spec.softcap, alibi=spec.alibi,
        tensors=tensor_decls(spec.tensors), global_vector=global_vector(spec),
        varlen=spec.layout == "varlen", kvcache=spec.layout == "kvcache", page_size=spec.page_size,
        reverse_query_tiles=spec.causal or schedule == "pattern", fp8=spec.fp8)


def global_vector(spec: Spec) -> int:
    """Elements per global access of the head-dim rows: VECTOR_ELEMENTS (16-byte cp.async and stores; rows
    16-byte aligned) when both head dims are multiples of it, else 1 (element by element, bounded by the real
    head dim; rows need only the element's alignment). Shared memory is padded to 16 columns either way."""
    if spec.head_dim % VECTOR_ELEMENTS == 0 and spec.head_dim_v % VECTOR_ELEMENTS == 0:
        return VECTOR_ELEMENTS
    return 1
