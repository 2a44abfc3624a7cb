"""The float64 KV-cache reference (attngen.tools.reference_kvcache): a paged cache with its pages shuffled
gives what a contiguous cache gives; appending new tokens writes them where the cache's layout says and
attends to them; each sequence equals plain attention over its keys; bad inputs are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from attngen.tools.reference import attention_reference
from attngen.tools.reference_kvcache import attention_with_kvcache_reference


def case(seed, batch=3, sq=1, capacity=64, hq=4, hkv=2, d=16, dv=8, new=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, sq, hq, d))
    k_cache = rng.standard_normal((batch, capacity, hkv, d))
    v_cache = rng.standard_normal((batch, capacity, hkv, dv))
    k = rng.standard_normal((batch, new, hkv, d)) if new else None
    v = rng.standard_normal((batch, new, hkv, dv)) if new else None
    return rng, q, k_cache, v_cache, k, v


def paged(rng, k_cache, v_cache, page_size):
    """The same caches as shuffled pages and a block table."""
    batch, capacity = k_cache.shape[:2]
    per_seq = capacity // page_size
    order = rng.permutation(batch * per_seq)             # page i of sequence b lives at order[b * per_seq + i]
    table = order.reshape(batch, per_seq)
    pages_k = np.empty((batch * per_seq, page_size) + k_cache.shape[2:])
    pages_v = np.empty((batch * per_seq, page_size) + v_cache.shape[2:])
    for b in range(batch):
        for i in range(per_seq):
            pages_k[table[b, i]] = k_cache[b, i * page_size:(i + 1) * page_size]
            pages_v[table[b, i]] = v_cache[b, i * page_size:(i + 1) * page_size]
    return pages_k, pages_v, table.astype(np.int32)


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("sq,new,causal", [(1, 0, False), (1, 1, True), (4, 4, True), (3, 0, True)])
def test_paged_equals_contiguous_and_plain_attention(page_size, sq, new, causal):
    rng, q, k_cache, v_cache, k, v = case(1, sq=sq, new=new)
    cache_seqlens = np.array([0, 17, 60 - new], dtype=np.int32)
    kw = dict(cache_seqlens=cache_seqlens, causal=causal, window=(20, -1), softcap=10.0,
              alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625]))
    out, lse, k_after, v_after = attention_with_kvcache_reference(q, k_cache, v_cache, k, v, **kw)
    pages_k, pages_v, table = paged(rng, k_cache, v_cache, page_size)
    out_p, lse_p, pk_after, pv_after = attention_with_kvcache_reference(q, pages_k, pages_v, k, v,
                                                                        block_table=table, **kw)
    np.testing.assert_array_equal(out_p, out)
    np.testing.assert_array_equal(lse_p, lse)
    for b in range(3):                                    # the appended tokens landed in the right pages
        for p in range(int(cache_seqlens[b]) + new):
            page, row = table[b, p // page_size], p % page_size
            np.testing.assert_array_equal(pk_after[page, row], k_after[b, p])
            np.testing.assert_array_equal(pv_after[page, row], v_after[b, p])
    for b in range(3):
        seqlen_k = int(cache_seqlens[b]) + new
        if new:
            np.testing.assert_array_equal(k_after[b, cache_seqlens[b]:seqlen_k], k[b])
        if seqlen_k == 0:
            assert not out[b].any() and np.all(lse[b] == -np.inf)
            continue
        visible = np.ones((sq, seqlen_k), bool)
        a = np.arange(sq)[:, None] + seqlen_k - sq
        visible &= np.arange(seqlen_k)[None, :] >= a - 20
        if causal:
            visible &= np.arange(seqlen_k)[None, :] <= a
        o, l_ = attention_reference(q[b:b + 1], k_after[b:b + 1, :seqlen_k], v_after[b:b + 1, :seqlen_k],
                                    mask=visible[None], softcap=10.0, alibi_slopes=kw["alibi_slopes"])
        np.testing.assert_allclose(out[b], o[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(lse[b], l_[0], rtol=0, atol=1e-12)


def test_the_inputs_are_not_modified():
    _, q, k_cache, v_cache, k, v = case(2, new=2)
    before = k_cache.copy()
    attention_with_kvcache_reference(q, k_cache, v_cache, k, v, cache_seqlens=np.array([1, 2, 3]))
    np.testing.assert_array_equal(k_cache, before)


@pytest.mark.parametrize("change,message", [
    (dict(cache_seqlens=np.array([0, 63, 1])), "cache_seqlens: each plus the 2 new tokens"),
    (dict(cache_seqlens=np.array([0.0, 1.0, 2.0])), "cache_seqlens: expected an int array"),
    (dict(k=None), "k, v: give both"),
    (dict(block_table=np.array([[0], [1]])), "block_table: expected 3 rows"),
    (dict(block_table=np.array([[0], [1], [99]])), "block_table: page indices must lie in 0..2"),
])
def test_refusals_name_the_argument(change, message):
    _, q, k_cache, v_cache, k, v = case(3, new=2)
    kw = dict(k=k, v=v, cache_seqlens=np.array([0, 1, 2]))
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        attention_with_kvcache_reference(q, k_cache, v_cache, **kw)
