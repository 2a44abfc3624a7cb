"""The float64 reference of attention over a KV cache, FlashAttention's `flash_attn_with_kvcache` semantics
(issue 15): what the decode and paged-prefill kernels are checked against.

- q [batch, seqlen_q, heads_q, head_dim]: the new queries (decode: seqlen_q = 1; speculative decoding or
  chunked prefill: more).
- The cache, contiguous: k_cache [batch, capacity, heads_kv, head_dim], v_cache [..., head_dim_v]; or paged:
  k_cache [num_pages, page_size, heads_kv, head_dim] with block_table int [batch, max_pages], logical
  position p of sequence b living in page block_table[b, p // page_size] at row p % page_size.
- cache_seqlens int [batch]: the tokens already cached per sequence.
- k, v [batch, seqlen_new, heads_kv, ...] (optional, together): new tokens, written into the cache at positions
  cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1 before attending (the kernel does it in place; this
  reference returns the updated caches as copies).
- Sequence b attends to its first cache_seqlens[b] + seqlen_new keys; causal aligned bottom-right (the last
  query sits at the last key); window (left, right) as FlashAttention's window_size (-1: no limit; causal
  clips right to 0); softcap; alibi_slopes [heads_q] or [batch, heads_q].
- Returns (out [batch, seqlen_q, heads_q, head_dim_v], lse [batch, heads_q, seqlen_q], k_cache, v_cache), all
  float64; a sequence with no key gives out 0 and lse -inf.
"""

from __future__ import annotations

import numpy as np

from .reference import attention_reference
from .reference_varlen import sequence_slopes, window_visibility


def _as_ints(name: str, x, shape_text: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected an int array {shape_text}, got {arr.dtype} {list(arr.shape)}")
    return arr.astype(np.int64)


class _CacheLayout:
    """Where logical position p of sequence b lives in the cache: (page or batch row, row in it)."""

    def __init__(self, k_cache, block_table, batch: int):
        self.paged = block_table is not None
        if self.paged:
            pages, self.page_size = k_cache.shape[:2]
            self.table = _as_ints("block_table", block_table, "[batch, max_pages]", 2)
            if self.table.shape[0] != batch:
                raise ValueError(f"block_table: expected {batch} rows (the batch), got {self.table.shape[0]}")
            if self.table.size and (self.table.min() < 0 or self.table.max() >= pages):
                raise ValueError(f"block_table: page indices must lie in 0..{pages - 1}")
            self.capacity = self.table.shape[1] * self.page_size
        else:
            if k_cache.shape[0] != batch:
                raise ValueError(f"k_cache: expected {batch} sequences (q's batch) in a contiguous cache, "
                                 f"got {k_cache.shape[0]}")
            self.capacity = k_cache.shape[1]

    def rows(self, b: int, positions: np.ndarray):
        """(first index, second index) arrays addressing the cache rows of these positions of sequence b."""
        if self.paged:
            return self.table[b, positions // self.page_size], positions % self.page_size
        return np.full_like(positions, b), positions


def attention_with_kvcache_reference(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                                     causal: bool = False, scale: float | None = None, window=None, softcap=None,
                                     alibi_slopes=None):
    """(out, lse, k_cache, v_cache) in float64 (module doc)."""
    q, k_cache, v_cache = (np.asarray(x, dtype=np.float64) for x in (q, k_cache, v_cache))
    if q.ndim != 4 or k_cache.ndim != 4 or v_cache.shape[:3] != k_cache.shape[:3] or v_cache.ndim != 4:
        raise ValueError(f"q, k_cache, v_cache: expected 4 dims each, caches of one layout; got {list(q.shape)}, "
                         f"{list(k_cache.shape)}, {list(v_cache.shape)}")
    batch = q.shape[0]
    layout = _CacheLayout(k_cache, block_table, batch)
    cached = _as_ints("cache_seqlens", np.broadcast_to(cache_seqlens, (batch,)), f"[{batch}]", 1)
    if (k is None) != (v is None):
        raise ValueError("k, v: give both new keys and values, or neither")
    new = 0 if k is None else np.asarray(k).shape[1]
    if k is not None:
        k, v = np.asarray(k, dtype=np.float64), np.asarray(v, dtype=np.float64)
        if k.shape[0] != batch or k.shape[2:] != k_cache.shape[2:] or v.shape[:2] != k.shape[:2] \
                or v.shape[2:] != v_cache.shape[2:]:
            raise ValueError(f"k, v: expected [{batch}, seqlen_new, heads_kv, head_dim(_v)] like the cache, got "
                             f"{list(k.shape)} and {list(v.shape)}")
    if cached.min() < 0 or (cached + new).max() > layout.capacity:
        raise ValueError(f"cache_seqlens: each plus the {new} new tokens must lie in 0..{layout.capacity} (the "
                         f"cache's capacity), got {cached.tolist()}")
    k_cache, v_cache = k_cache.copy(), v_cache.copy()
    out = np.zeros(q.shape[:3] + (v_cache.shape[3],))
    lse = np.full((batch, q.shape[2], q.shape[1]), -np.inf)
    for b in range(batch):
        if new:
            index = layout.rows(b, cached[b] + np.arange(new))
            k_cache[index], v_cache[index] = k[b], v[b]
        seqlen_k = int(cached[b]) + new
        if seqlen_k == 0:
            continue
        index = layout.rows(b, np.arange(seqlen_k))
        o, l_ = attention_reference(q[b:b + 1], k_cache[index][None], v_cache[index][None], causal=causal,
                                    scale=scale, mask=window_visibility(window, causal, q.shape[1], seqlen_k),
                                    softcap=softcap, alibi_slopes=sequence_slopes(alibi_slopes, b))
        out[b], lse[b] = o[0], l_[0]
    return out, lse, k_cache, v_cache
