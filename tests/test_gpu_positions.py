"""Shards of one longer sequence on the GPU (context parallelism): attention with position_offsets=(q_start,
kv_start) against the float64 reference of the same shifted mask, forward and backward, both forward paths; and
ring attention emulated on one GPU: every (query chunk, key chunk) pair of a zig-zag sharding computed with its
offsets and merged with merge_attention, each pair's gradients from the merged out and lse, summed, against the
whole sequence's float64 reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen.calls import position_shift, spec_for_inputs
from attngen.tools.checking import framework_attention
from attngen.tools.reference import (acceptance_check, attention_reference, attention_reference_backward,
                                     attention_same_dtype_reference)

from test_gpu_sparse import check_output

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def inputs(seed, batch, sq, sk, hq, hkv, d, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randn(batch, s, h, d, generator=gen, device="cuda") * scale).to(torch.bfloat16)
            for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def shifted_mask(sq, sk, offsets, causal, window=None):
    """[1, sq, sk]: key kv_start + j visible to query q_start + i under causal and window (left, right)."""
    q_pos = offsets[0] + np.arange(sq)[:, None]
    k_pos = offsets[1] + np.arange(sk)[None, :]
    visible = np.ones((sq, sk), dtype=bool)
    if causal:
        visible &= k_pos <= q_pos
    if window is not None:
        left, right = window
        if left >= 0:
            visible &= k_pos >= q_pos - left
        if right >= 0:
            visible &= k_pos <= q_pos + right
    return visible[None]


def check_forward(out, lse, q, k, v, mask, **mods):
    check_output(out, lse, q, k, v, mask, "bf16", lse_tol=5e-3, **mods)


# (q_start, kv_start) for q of 203 rows and k of 317: top-left (SDPA's alignment), a later query shard, an
# earlier one (its first rows see nothing), one past every key, and the default's own value (bottom-right)
OFFSETS = [(0, 0), (1000, 600), (600, 1000), (5000, 0), (114, 0)]


@pytest.mark.parametrize("path", ["mma_sync", "wgmma"])
@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: f"q{o[0]}_k{o[1]}")
@pytest.mark.parametrize("mask", ["causal", "causal_window", "window"])
def test_forward_with_position_offsets(path, offsets, mask):
    causal = mask.startswith("causal")
    window = {"causal": None, "causal_window": (150, 0), "window": (180, 40)}[mask]
    sq, sk = 203, 317
    q, k, v = inputs(sum(offsets) + len(mask), 2, sq, sk, 4, 2, 128)
    kernel = attngen.build(spec_for_inputs(q, k, v, causal, window=window), path=path)
    assert kernel.plan.path == path
    shift = position_shift(offsets, q, k)
    out = torch.full((2, sq, 4, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    lse = torch.full((2, 4, sq), float("nan"), device="cuda")
    kernel(q, k, v, out=out, lse=lse, position_shift=shift)
    torch.cuda.synchronize()
    check_forward(out, lse, q, k, v, shifted_mask(sq, sk, offsets, causal, window))
    # the public call says the same, and the default alignment is offsets (seqlen_k - seqlen_q, 0)
    api_out, api_lse = attngen.attention(q, k, v, causal=causal, window=window, position_offsets=offsets,
                                         return_lse=True)
    check_forward(api_out, api_lse, q, k, v, shifted_mask(sq, sk, offsets, causal, window))
    if offsets == (sk - sq, 0):
        assert shift == 0 and torch.equal(api_out, attngen.attention(q, k, v, causal=causal, window=window))


def test_alibi_distances_follow_the_offsets():
    sq, sk, offsets = 150, 260, (700, 500)
    q, k, v = inputs(3, 1, sq, sk, 4, 4, 64)
    slopes = np.random.default_rng(3).uniform(0.02, 0.3, 4).astype(np.float32)
    out, lse = attngen.attention(q, k, v, causal=True, alibi_slopes=torch.tensor(slopes, device="cuda"),
                                 position_offsets=offsets, return_lse=True)

    def alibi(score, b, h, q_idx, kv_idx):          # the distance between global positions
        return score - slopes[h.ravel()].reshape(h.shape) * np.abs(offsets[0] + q_idx - offsets[1] - kv_idx)
    check_forward(out, lse, q, k, v, shifted_mask(sq, sk, offsets, True), score_mod=alibi)


@pytest.mark.parametrize("path", ["mma_sync", "wgmma"])
@pytest.mark.parametrize("offsets,window", [((0, 0), None), ((1000, 600), None), ((600, 1000), None),
                                            ((900, 700), (120, 0))], ids=str)
def test_gradients_with_position_offsets(path, offsets, window):
    sq, sk = 203, 317
    q, k, v = inputs(7 + sum(offsets), 2, sq, sk, 4, 2, 64)
    spec = spec_for_inputs(q, k, v, True, window=window)
    shift = position_shift(offsets, q, k)
    out, lse = attngen.build(spec)(q, k, v, position_shift=shift)
    gen = torch.Generator(device="cuda").manual_seed(11)
    dout = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    poison = [torch.full_like(x, float("nan")) for x in (q, k, v)]
    backward = attngen.build_backward(spec, path=path)
    assert backward.plan.dkdv.path == path
    dq, dk, dv = backward(q, k, v, out, lse, dout, dq=poison[0], dk=poison[1], dv=poison[2], position_shift=shift)
    torch.cuda.synchronize()
    mask = shifted_mask(sq, sk, offsets, True, window)
    scale = 1 / math.sqrt(64)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, scale, mask=mask).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), scale=scale, mask=mask)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same, ref):
        ok, err, bound = acceptance_check(to64(mine), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"
    # autograd through the public call: the same gradients (dQ by atomics: compared closely, not bitwise)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    attngen.attention(*leaves, causal=True, window=window, position_offsets=offsets).backward(dout)
    for mine, direct in zip(leaves, (dq, dk, dv)):
        torch.testing.assert_close(mine.grad, direct, atol=2e-2, rtol=2e-2)


def zigzag_chunks(world: int, chunk: int):
    """Rank r holds chunks r and 2 * world - 1 - r (head and tail), so causal work is even across ranks."""
    return [(r, 2 * world - 1 - r) for r in range(world)], [(c * chunk, (c + 1) * chunk) for c in range(2 * world)]


def pair_visible(q_rows, k_rows, window):
    """Whether any key of chunk k_rows is visible to a query of q_rows (causal, window (left, 0)): the ring's
    block skipping."""
    if k_rows[0] > q_rows[1] - 1:
        return False
    return window is None or k_rows[1] - 1 >= q_rows[0] - window[0]


@pytest.mark.parametrize("world,chunk,window", [(2, 203, None), (3, 128, None), (4, 113, (300, 0))], ids=str)
def test_ring_attention_over_zigzag_shards(world, chunk, window):
    """Every rank's chunks against every chunk that ring steps bring, merged: the whole sequence's attention;
    each pair's backward from the merged (global) out and lse, summed: its gradients."""
    n = 2 * world * chunk
    q, k, v = inputs(world * 100 + chunk, 1, n, n, 4, 2, 64)
    ranks, rows = zigzag_chunks(world, chunk)
    out, lse = torch.empty_like(q), torch.empty(1, 4, n, device="cuda")
    pairs = []
    for held in ranks:
        for c in held:
            qc = q[:, slice(*rows[c])]
            merged = None
            for j in range(2 * world):         # the K/V chunks every ring step brings, in ring order
                if not pair_visible(rows[c], rows[j], window):
                    continue
                part = attngen.attention(qc, k[:, slice(*rows[j])], v[:, slice(*rows[j])], causal=True, window=window,
                                         position_offsets=(rows[c][0], rows[j][0]), return_lse=True)
                merged = part if merged is None else attngen.merge_attention(*merged, *part)
                pairs.append((c, j))
            out[:, slice(*rows[c])], lse[:, :, slice(*rows[c])] = merged
    mask = shifted_mask(n, n, (0, 0), True, window)
    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, ref_lse = attention_reference(q64, k64, v64, mask=mask)
    same, _ = attention_same_dtype_reference(q64, k64, v64, mask=mask, dtype="bf16")
    # each partial out is rounded to bf16 before the merge: up to one more rounding (2^-9 relative) per step
    steps = max(sum(1 for c2, _ in pairs if c2 == c) for c in range(2 * world))
    rounding = steps * 2.0 ** -9 * np.max(np.abs(ref))
    err, bound = np.max(np.abs(to64(out) - ref)), 2 * np.max(np.abs(same - ref)) + rounding
    assert err <= bound, f"ring out: max|out - ref64| = {err:.3g} > {bound:.3g}"
    assert np.max(np.abs(to64(lse) - ref_lse)) < 5e-3
    whole = attngen.attention(q, k, v, causal=True, window=window)
    assert np.max(np.abs(to64(out) - to64(whole))) <= bound

    gen = torch.Generator(device="cuda").manual_seed(5)
    dout = torch.randn(q.shape, generator=gen, device="cuda", dtype=torch.bfloat16)
    grads = [torch.zeros(x.shape, device="cuda") for x in (q, k, v)]
    for c, j in pairs:
        qs, ks = slice(*rows[c]), slice(*rows[j])
        dq, dk, dv = attngen.attention_backward(q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs].contiguous(),
                                                dout[:, qs], causal=True, window=window,
                                                position_offsets=(rows[c][0], rows[j][0]))
        grads[0][:, qs] += dq.float()
        grads[1][:, ks] += dk.float()
        grads[2][:, ks] += dv.float()
    scale = 1 / math.sqrt(64)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, scale, mask=mask).backward(dout)
    ref = attention_reference_backward(q64, k64, v64, to64(dout), scale=scale, mask=mask)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), grads, same, ref):
        err = np.max(np.abs(to64(mine) - r))
        bound = 2 * np.max(np.abs(to64(theirs.grad) - r)) + 1e-5 + 2 * world * 2.0 ** -9 * np.max(np.abs(r))
        assert err <= bound, f"ring {name}: max|grad - ref64| = {err:.3g} > {bound:.3g}"
