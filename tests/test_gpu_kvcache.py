"""GPU tests of attention over a KV cache (attngen.attention_with_kvcache, layout: kvcache): the decode,
append and combine kernels against the float64 reference (flash_attn_with_kvcache semantics) with
ARCHITECTURE.md's criterion, the same-dtype baseline being the framework's naive attention on each sequence's
cached keys. Outputs start poisoned with NaN; cache rows past each sequence's length and the pages no sequence
owns hold NaN, so a kernel that reads a key it should not fails. Cache lengths 0, 1, 17, 1000 and 32768 in one
batch; page sizes 1 to 256 with shuffled page tables; appends that cross page boundaries; GQA ratios 1, 4, 8
and MQA; windows, softcap, ALiBi; both dtypes; split counts from 1 to 64; the cache after an append.

Marked `gpu`: skipped where no GPU is present (CI)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen.tools.checking import framework_attention
from attngen.tools.reference import acceptance_check
from attngen.tools.reference_kvcache import attention_with_kvcache_reference
from attngen.tools.reference_varlen import sequence_slopes, window_visibility

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


class Cache:
    """A KV cache holding `lengths` tokens per sequence with room for `new` more: contiguous (page_size None)
    or paged over shuffled pages. Every row no sequence holds yet is NaN, and so are the spare pages the unused
    block-table entries point at."""

    def __init__(self, gen, lengths, new, heads_kv, d, dv, dtype, page_size, scale_up=1.0):
        self.lengths, self.page_size = list(lengths), page_size
        batch, need = len(lengths), [n + new for n in lengths]
        tdtype = DTYPES[dtype]

        def rows(*shape):
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(tdtype) * scale_up
        if page_size is None:
            capacity = max(need) + 5
            self.k, self.v = rows(batch, capacity, heads_kv, d), rows(batch, capacity, heads_kv, dv)
            for b, n in enumerate(lengths):
                self.k[b, n:], self.v[b, n:] = float("nan"), float("nan")
            self.block_table = None
        else:
            per = [max(1, -(-n // page_size)) for n in need]
            max_pages = max(per) + 1
            total = sum(per) + 2                                   # two spare pages, NaN
            order = torch.randperm(total, generator=torch.Generator().manual_seed(len(lengths) * 7 + page_size))
            self.k, self.v = rows(total, page_size, heads_kv, d), rows(total, page_size, heads_kv, dv)
            spare = order[-1].item()
            table = torch.full((batch, max_pages), spare, dtype=torch.int32)
            taken = 0
            for b, n in enumerate(per):
                table[b, :n] = order[taken:taken + n].to(torch.int32)
                taken += n
            for page in order[taken:].tolist():
                self.k[page], self.v[page] = float("nan"), float("nan")
            for b, n in enumerate(lengths):                        # rows past the cached tokens
                for p in range(n, per[b] * page_size):
                    page, row = table[b, p // page_size].item(), p % page_size
                    self.k[page, row], self.v[page, row] = float("nan"), float("nan")
            self.block_table = table.cuda()
        self.seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")


def framework_kvcache(q, k_cache, v_cache, block_table, seqlens_after, causal, scale, window, softcap, alibi_slopes):
    """The same-dtype baseline: the framework's naive attention of each sequence's queries over its cached keys."""
    outs = []
    page_size = k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(seqlens_after[b])
        positions = torch.arange(n, device="cuda")
        if block_table is None:
            ks, vs = k_cache[b, :n], v_cache[b, :n]
        else:
            pages = block_table[b, positions // page_size].long()
            ks, vs = k_cache[pages, positions % page_size], v_cache[pages, positions % page_size]
        if n == 0:
            outs.append(torch.zeros(q.shape[1], q.shape[2], v_cache.shape[3], device="cuda", dtype=q.dtype))
            continue
        mask = window_visibility(window, causal, q.shape[1], n)
        outs.append(framework_attention(q[b:b + 1], ks[None], vs[None], causal, scale, mask=mask, softcap=softcap,
                                        alibi_slopes=sequence_slopes(alibi_slopes, b))[0])
    return torch.stack(outs)


def check_kvcache(lengths, *, seqlen_q=1, new=0, heads_q=8, heads_kv=2, d=128, dv=None, dtype="bf16", page_size=None,
                  causal=False, window=None, softcap=None, alibi_slopes=None, num_splits=0, scale_up=1.0, seed=0,
                  use_cupy=False):
    dv = dv or d
    gen = torch.Generator(device="cuda").manual_seed(seed)
    cache = Cache(gen, lengths, new, heads_kv, d, dv, dtype, page_size, scale_up)
    batch = len(lengths)
    q = torch.randn(batch, seqlen_q, heads_q, d, generator=gen, device="cuda", dtype=torch.float32).to(DTYPES[dtype]) * scale_up
    k_new = v_new = None
    if new:
        k_new = torch.randn(batch, new, heads_kv, d, generator=gen, device="cuda").to(DTYPES[dtype]) * scale_up
        v_new = torch.randn(batch, new, heads_kv, dv, generator=gen, device="cuda").to(DTYPES[dtype]) * scale_up
    scale = 1 / math.sqrt(d)
    mods = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    ref, ref_lse, ref_k, ref_v = attention_with_kvcache_reference(
        to64(q), to64(cache.k), to64(cache.v), None if k_new is None else to64(k_new),
        None if v_new is None else to64(v_new), cache_seqlens=np.array(lengths),
        block_table=None if cache.block_table is None else cache.block_table.cpu().numpy(), **mods)
    slopes = None if alibi_slopes is None else torch.as_tensor(alibi_slopes, device="cuda", dtype=torch.float32)
    spec = attngen.api.spec_for_inputs(q, cache.k, cache.v, causal, window=window, softcap=softcap,
                                       alibi=alibi_slopes is not None, layout="kvcache",
                                       page_size=page_size if cache.block_table is not None else None)
    kernel = attngen.build_decode(spec)
    out = torch.full((batch, seqlen_q, heads_q, dv), float("nan"), device="cuda", dtype=q.dtype)
    lse = torch.full((batch, heads_q, seqlen_q), float("nan"), device="cuda", dtype=torch.float32)
    args = (q, cache.k, cache.v, k_new, v_new)
    keywords = dict(cache_seqlens=cache.seqlens, block_table=cache.block_table)
    if use_cupy:
        import cupy

        args = tuple(None if x is None else cupy.from_dlpack(x) for x in args)
        keywords = {key: None if x is None else cupy.from_dlpack(x) for key, x in keywords.items()}
        out_c, lse_c = cupy.from_dlpack(out), cupy.from_dlpack(lse)
        kernel(*args, **keywords, scale=scale, alibi_slopes=None if slopes is None else cupy.from_dlpack(slopes),
               num_splits=num_splits, out=out_c, lse=lse_c)
        cupy.cuda.get_current_stream().synchronize()
    else:
        kernel(*args, **keywords, scale=scale, alibi_slopes=slopes, num_splits=num_splits, out=out, lse=lse)
    torch.cuda.synchronize()
    # the cache after the append: the new rows written, every other row as it was (NaN included)
    np.testing.assert_array_equal(to64(cache.k), ref_k)
    np.testing.assert_array_equal(to64(cache.v), ref_v)
    same = framework_kvcache(q, cache.k, cache.v, cache.block_table, [n + new for n in lengths], **mods)
    ok, err, bound = acceptance_check(to64(out), to64(same), ref)
    assert ok, f"out: max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    got_lse = to64(lse)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse)), "LSE -inf pattern differs"
    finite = np.isfinite(ref_lse)
    assert not finite.any() or np.max(np.abs(got_lse[finite] - ref_lse[finite])) < 2e-3 * max(1.0, scale_up ** 2)
    return out, lse


LENGTHS = [0, 1, 17, 1000, 32768]


@pytest.mark.parametrize("page_size", [None, 1, 16, 64, 128, 256])
def test_decode_over_cache_lengths_and_page_sizes(page_size):
    """One new token per sequence appended, then attended; lengths 0 to 32768 in one batch."""
    check_kvcache(LENGTHS, new=1, page_size=page_size)


@pytest.mark.parametrize("seqlen_q", [1, 2, 7, 129])
@pytest.mark.parametrize("causal", [False, True])
def test_query_lengths_append_across_pages(seqlen_q, causal):
    """Speculative decoding and chunked prefill: seqlen_q new tokens appended (crossing page boundaries:
    15 + 7 over pages of 16) and attended, causal bottom-right."""
    check_kvcache([0, 15, 17, 1000], seqlen_q=seqlen_q, new=seqlen_q, page_size=16, causal=causal)


@pytest.mark.parametrize("page_size", [None, 8, 12, 16, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_chunked_prefill_over_pages(page_size, causal):
    """seqlen_q >= PREFILL_MIN_QUERIES runs the prefill kernel on Hopper: the wgmma forward reading each key tile
    from the cache as copy-engine boxes (contiguous; 8, 16, 96, 128, 256-row pages) or gathered row by row by
    the producer warpgroup (12-row pages). Chunks of 300 tokens appended over caches of 0..5000 rows, NaN in
    every row no sequence holds (also in the last tile's spare rows)."""
    from attngen.planner.decode import PREFILL_MIN_QUERIES

    spec = attngen.api.spec_for_inputs(torch.empty(1, 1, 8, 128, device="cuda", dtype=torch.bfloat16),
                                       torch.empty(1, page_size or 8, 2, 128, device="cuda", dtype=torch.bfloat16),
                                       torch.empty(1, page_size or 8, 2, 128, device="cuda", dtype=torch.bfloat16),
                                       causal, layout="kvcache", page_size=page_size)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert (attngen.build_decode(spec).prefill is not None) == hopper
    assert 300 >= PREFILL_MIN_QUERIES
    check_kvcache([0, 130, 1000, 5000], seqlen_q=300, new=300, page_size=page_size, causal=causal)


@pytest.mark.parametrize("page_size", [None, 64])
def test_chunked_prefill_without_append_and_gqa(page_size):
    """Queries over the cached keys alone (nothing appended), 16 query heads on 2 KV heads, fp16, 129 rows."""
    check_kvcache([64, 300, 2000], seqlen_q=129, heads_q=16, heads_kv=2, dtype="fp16", page_size=page_size,
                  causal=True, seed=3)


def test_remembered_prefill_launch_swaps_every_pointer():
    """A repeated prefill call signature reuses its launch: q, both caches (re-encoded tensor maps), out, lse,
    cache_seqlens and the block table are swapped in; it equals the general path on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(9)
    # the same page counts per sequence, so both calls have one signature (the caches' shapes)
    caches = [Cache(gen, lengths, 0, 2, 128, 128, "bf16", 64) for lengths in ([100, 700, 64], [120, 650, 30])]
    queries = [torch.randn(3, 150, 8, 128, generator=gen, device="cuda").to(torch.bfloat16) for _ in caches]
    spec = attngen.api.spec_for_inputs(queries[0], caches[0].k, caches[0].v, True, layout="kvcache", page_size=64)
    kernel = attngen.build_decode(spec)
    if kernel.prefill is None:
        pytest.skip("no prefill kernel on this GPU")
    for q, cache in zip(queries, caches):        # the first call is remembered, the second swaps its pointers
        got, got_lse = kernel(q, cache.k, cache.v, cache_seqlens=cache.seqlens, block_table=cache.block_table)
        out = torch.empty_like(got)              # given outputs: the general path
        kernel(q, cache.k, cache.v, cache_seqlens=cache.seqlens, block_table=cache.block_table, out=out,
               lse=torch.empty_like(got_lse))
        assert torch.equal(got, out)
    assert len(kernel._remembered) == 1


@pytest.mark.parametrize("heads", [(8, 8), (16, 4), (16, 2), (8, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gqa_ratios_and_dtypes(heads, dtype):
    check_kvcache([3, 300, 2000], seqlen_q=2, new=1, heads_q=heads[0], heads_kv=heads[1], dtype=dtype, page_size=64)


@pytest.mark.parametrize("d,dv", [(64, 64), (96, 96), (256, 256), (59, 59), (64, 128)])
def test_head_dims(d, dv):
    check_kvcache([1, 17, 700], seqlen_q=3, new=2, d=d, dv=dv, page_size=16)


@pytest.mark.parametrize("case", ["window_causal", "window_two_sided", "softcap", "alibi", "alibi_per_sequence",
                                  "large"])
def test_modifiers(case):
    kw = dict(window_causal=dict(window=(100, 0), causal=True), window_two_sided=dict(window=(50, 20)),
              softcap=dict(softcap=30.0), alibi=dict(alibi_slopes=[2 ** -(i + 1) for i in range(8)]),
              alibi_per_sequence=dict(alibi_slopes=np.random.default_rng(0).uniform(0.01, 0.5, (4, 8)).tolist()),
              large=dict(scale_up=8.0))[case]
    check_kvcache([0, 33, 257, 1500], seqlen_q=4, new=1, page_size=16, **kw)


@pytest.mark.parametrize("num_splits", [1, 3, 64])
def test_split_counts(num_splits):
    """Splits past the keys there are (64 over 17 keys) see nothing and weigh nothing in the combine."""
    check_kvcache([17, 4096, 0], new=1, page_size=128, num_splits=num_splits)


def test_cupy_arrays():
    pytest.importorskip("cupy")
    check_kvcache([5, 900], seqlen_q=2, new=1, page_size=16, dtype="fp16", use_cupy=True)


def test_public_call_and_non_contiguous_query():
    """attngen.attention_with_kvcache on a strided q (a slice of a packed qkv tensor), without out=."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    batch, heads_q, heads_kv, d, capacity = 3, 8, 2, 128, 600
    qkv = torch.randn(batch, 1, heads_q + 2 * heads_kv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, :, :heads_q]
    k_cache = torch.randn(batch, capacity, heads_kv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn(batch, capacity, heads_kv, d, generator=gen, device="cuda", dtype=torch.bfloat16)
    lengths = torch.tensor([1, 500, 77], dtype=torch.int32, device="cuda")
    out, lse = attngen.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True, return_lse=True)
    ref, ref_lse, _, _ = attention_with_kvcache_reference(to64(q), to64(k_cache), to64(v_cache),
                                                          cache_seqlens=lengths.cpu().numpy(), causal=True)
    same = framework_kvcache(q, k_cache, v_cache, None, lengths.tolist(), True, 1 / math.sqrt(d), None, None, None)
    ok, err, bound = acceptance_check(to64(out), to64(same), ref)
    assert ok and out.shape == (batch, 1, heads_q, d), (err, bound)
    assert np.max(np.abs(to64(lse) - ref_lse)) < 2e-3


def test_cache_seqlens_as_one_int():
    """FlashAttention takes cache_seqlens as one int for every sequence: the same result as the array."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(2, 1, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(2, 300, 2, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lengths = torch.full((2,), 257, dtype=torch.int32, device="cuda")
    by_int = attngen.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=257, causal=True)
    assert torch.equal(by_int, attngen.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=lengths, causal=True))
    with pytest.raises(ValueError, match="cache_seqlens: expected an int >= 0"):
        attngen.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=-1)


def test_bad_inputs_launch_nothing():
    """Clear errors naming the argument; the output buffer stays untouched."""
    q = torch.randn(2, 1, 8, 64, device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(10, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.zeros(2, 5, dtype=torch.int32, device="cuda")
    lengths = torch.tensor([3, 4], dtype=torch.int32, device="cuda")
    cases = [
        (dict(block_table=table[:1]), "block_table: expected 2 rows"),
        (dict(block_table=table.float()), "block_table: expected an int32 array"),
        (dict(block_table=table, cache_seqlens=lengths[:1]), "cache_seqlens: expected shape"),
        (dict(block_table=table, cache_seqlens=lengths.long()), "cache_seqlens: expected an int32 array"),
        (dict(block_table=table, k=q[:, :, :2]), "k, v: give both"),
        (dict(block_table=table, num_splits=-1), "num_splits"),
        (dict(block_table=table, scale=-1.0), "scale"),
    ]
    for keywords, message in cases:
        keywords = dict(cache_seqlens=lengths) | keywords
        with pytest.raises((ValueError, TypeError), match=message):
            attngen.attention_with_kvcache(q, k_cache, k_cache, **keywords)
    with pytest.raises(ValueError, match="heads_q=8 must be a multiple of heads_kv=3"):
        attngen.attention_with_kvcache(q, torch.randn(2, 16, 3, 64, device="cuda", dtype=torch.bfloat16),
                                       torch.randn(2, 16, 3, 64, device="cuda", dtype=torch.bfloat16),
                                       cache_seqlens=lengths)
    with pytest.raises(ValueError, match="mask"):
        attngen.Spec(head_dim=64, layout="kvcache", mask={"kind": "strided", "stride": 4})
