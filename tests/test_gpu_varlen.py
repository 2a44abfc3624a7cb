"""GPU tests of packed variable-length batches (layout: varlen, attngen.attention_varlen): forward and
backward against the float64 varlen reference with ARCHITECTURE.md's criterion, the same-dtype baseline
being the framework's naive attention run on each sequence alone (and, for gradients, the worse of its
autograd and FlashAttention's algorithm at its rounding points). Outputs and gradients start poisoned with
NaN; lengths mix 0, 1, 17, 113 and one sequence far longer than the rest, with seqlen_q != seqlen_k per
sequence, on both kernel paths (wgmma and mma.sync).

Marked `gpu`: skipped where no GPU is present (CI)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen.tools.checking import framework_attention
from attngen.tools.reference import acceptance_check, acceptance_check_gradient
from attngen.tools.reference_varlen import (attention_varlen_reference, attention_varlen_reference_backward,
                                            sequence_slopes, window_visibility)

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (query lengths, key lengths) per sequence: empty sequences, tails, one long sequence, unequal q/k
MIX = ([17, 0, 1, 113, 600, 5, 64, 0], [17, 3, 0, 203, 650, 5, 40, 0])
LONG_MIX = ([1, 2048, 17, 113, 3], [1, 2100, 17, 113, 9])


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def cu_of(lengths):
    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")


def packed_inputs(seed, lens_q, lens_k, hq, hkv, d, dv=None, dtype="bf16", scale_up=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(t, h, n, generator=gen, device="cuda", dtype=DTYPES[dtype]) * scale_up
               for t, h, n in ((tq, hq, d), (tk, hkv, d), (tk, hkv, dv or d)))
    return q, k, v, cu_of(lens_q), cu_of(lens_k)


def framework_varlen(q, k, v, cu_q, cu_k, causal, scale, window=None, softcap=None, alibi_slopes=None):
    """The same-dtype baseline: the framework's naive attention on each sequence, packed again."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs = []
    for b in range(len(cq) - 1):
        qs, ks, vs = q[cq[b]:cq[b + 1]][None], k[ck[b]:ck[b + 1]][None], v[ck[b]:ck[b + 1]][None]
        if qs.shape[1] == 0 or ks.shape[1] == 0:
            outs.append(torch.zeros(qs.shape[1], q.shape[1], v.shape[2], device="cuda", dtype=q.dtype) * qs.sum())
            continue
        mask = window_visibility(window, causal, qs.shape[1], ks.shape[1])
        outs.append(framework_attention(qs, ks, vs, causal, scale, mask=mask, softcap=softcap,
                                        alibi_slopes=sequence_slopes(alibi_slopes, b))[0])
    return torch.cat(outs)


def check_varlen(q, k, v, cu_q, cu_k, *, causal=False, window=None, softcap=None, alibi_slopes=None,
                 deterministic=False, path=None, grads=True, seed=0):
    """attngen's varlen forward (into poisoned out/lse) and, with grads, backward (into poisoned dq/dk/dv)
    against float64. path forces a kernel path; None lets the planner choose."""
    scale = 1 / math.sqrt(q.shape[-1])
    spec = attngen.api.spec_for_inputs(q, k, v, causal, window=window, softcap=softcap,
                                       alibi=alibi_slopes is not None, deterministic=deterministic, layout="varlen")
    slopes = None if alibi_slopes is None else torch.as_tensor(alibi_slopes, device="cuda", dtype=torch.float32)
    kernel = attngen.build(spec.forward_spec, path=path)
    out = torch.full((q.shape[0], q.shape[1], v.shape[2]), float("nan"), device="cuda", dtype=q.dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"), device="cuda", dtype=torch.float32)
    kernel(q, k, v, out=out, lse=lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=slopes)
    torch.cuda.synchronize()
    mods = dict(causal=causal, scale=scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes)
    ref, ref_lse = attention_varlen_reference(to64(q), to64(k), to64(v), cu_q.cpu(), cu_k.cpu(), **mods)
    same = framework_varlen(q, k, v, cu_q, cu_k, causal, scale, window, softcap, alibi_slopes)
    ok, err, bound = acceptance_check(to64(out), to64(same), ref)
    assert ok, f"out: max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    got_lse = to64(lse)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse)), "LSE -inf pattern differs"
    finite = np.isfinite(ref_lse)
    assert not finite.any() or np.max(np.abs(got_lse[finite] - ref_lse[finite])) < 2e-3
    if not grads:
        return out
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(out.shape, generator=gen, device="cuda", dtype=q.dtype)
    backward = attngen.build_backward(spec, path=path)
    dq, dk, dv = (torch.full(x.shape, float("nan"), device="cuda", dtype=x.dtype) for x in (q, k, v))
    backward(q, k, v, out, lse, dout, dq=dq, dk=dk, dv=dv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, alibi_slopes=slopes)
    torch.cuda.synchronize()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_varlen(*leaves, cu_q, cu_k, causal, scale, window, softcap, alibi_slopes).backward(dout)
    ref_grads = attention_varlen_reference_backward(to64(q), to64(k), to64(v), to64(dout), cu_q.cpu(), cu_k.cpu(),
                                                    **mods)
    algorithm = attention_varlen_reference_backward(to64(q), to64(k), to64(v), to64(dout), cu_q.cpu(), cu_k.cpu(),
                                                    algorithm_dtype=spec.dtype, out=to64(out), **mods)
    for name, mine, leaf, alg, r in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves, algorithm, ref_grads):
        framework_grad = to64(leaf.grad) if leaf.grad is not None else np.zeros_like(r)
        ok, err, bound = acceptance_check_gradient(to64(mine), framework_grad, alg, r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"
    return out, (dq, dk, dv)


PATHS = ["auto", "mma_sync"]


def path_of(name):
    return None if name == "auto" else name


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_length_mix(path, causal, dtype):
    q, k, v, cu_q, cu_k = packed_inputs(1, *MIX, 8, 2, 128, dtype=dtype)
    check_varlen(q, k, v, cu_q, cu_k, causal=causal, path=path_of(path))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_long_sequence(path, causal):
    q, k, v, cu_q, cu_k = packed_inputs(2, *LONG_MIX, 4, 1, 64)        # MQA
    check_varlen(q, k, v, cu_q, cu_k, causal=causal, path=path_of(path))


@pytest.mark.parametrize("d,dv", [(32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (33, 33), (59, 59),
                                  (64, 128), (192, 128)])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_head_dims(d, dv, deterministic):
    q, k, v, cu_q, cu_k = packed_inputs(d + dv, [113, 1, 17, 0, 300], [200, 7, 17, 5, 130], 4, 2, d, dv)
    check_varlen(q, k, v, cu_q, cu_k, causal=True, deterministic=deterministic)


@pytest.mark.parametrize("path", PATHS)
def test_window_softcap_alibi(path):
    q, k, v, cu_q, cu_k = packed_inputs(3, *MIX, 4, 2, 64)
    check_varlen(q, k, v, cu_q, cu_k, causal=True, window=(48, 0), path=path_of(path))
    check_varlen(q, k, v, cu_q, cu_k, causal=False, window=(32, 16), path=path_of(path))
    check_varlen(q, k, v, cu_q, cu_k, causal=True, softcap=20.0, path=path_of(path))
    slopes = np.array([0.5, 0.25, 0.125, 0.0625])
    check_varlen(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes, path=path_of(path))
    per_sequence = np.random.default_rng(0).uniform(0.01, 0.5, size=(len(MIX[0]), 4))
    check_varlen(q, k, v, cu_q, cu_k, causal=False, alibi_slopes=per_sequence, path=path_of(path))


def test_large_magnitude_inputs():
    q, k, v, cu_q, cu_k = packed_inputs(4, [1, 2, 3, 17, 113, 203], [1, 2, 3, 17, 130, 203], 4, 4, 64, scale_up=8.0)
    check_varlen(q, k, v, cu_q, cu_k, causal=True)
    check_varlen(q, k, v, cu_q, cu_k, causal=True, deterministic=True)


def test_uniform_batch_matches_the_batch_kernel_bit_for_bit():
    """A batch of equal lengths packed: the varlen kernels compute exactly what the batch kernels do."""
    batch, s, h = 4, 515, 8
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(batch, s, h, 128, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cu = cu_of([s] * batch)
    dense, dense_lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    flat = [x.reshape(batch * s, h, 128) for x in (q, k, v)]
    packed, packed_lse = attngen.attention_varlen(*flat, cu, cu, s, s, causal=True, return_lse=True)
    assert torch.equal(packed, dense.reshape(batch * s, h, 128))
    assert torch.equal(packed_lse, dense_lse.permute(1, 0, 2).reshape(h, batch * s))
    dout = torch.randn(batch, s, h, 128, generator=gen, device="cuda", dtype=torch.bfloat16)
    grads = attngen.attention_backward(q, k, v, dense, dense_lse, dout, causal=True, deterministic=True)
    spec = attngen.api.spec_for_inputs(*flat, True, deterministic=True, layout="varlen")
    packed_grads = attngen.build_backward(spec)(*flat, packed, packed_lse, dout.reshape(batch * s, h, 128),
                                                cu_seqlens_q=cu, cu_seqlens_k=cu)
    for a, b in zip(packed_grads, grads):
        assert torch.equal(a, b.reshape(a.shape))


def test_autograd_and_packed_qkv_slices():
    """FlashAttention's usual call: q, k, v slices of one packed qkv projection (strided rows), autograd."""
    lens = [100, 3, 250, 0, 64]
    total, h, d = sum(lens), 4, 64
    gen = torch.Generator(device="cuda").manual_seed(6)
    qkv = torch.randn(total, 3, h, d, generator=gen, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = cu_of(lens)
    out = attngen.attention_varlen(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max(lens), max(lens), causal=True)
    dout = torch.randn(out.shape, generator=gen, device="cuda", dtype=out.dtype)
    out.backward(dout)
    leaf = qkv.detach().clone().requires_grad_(True)
    framework_varlen(leaf[:, 0], leaf[:, 1], leaf[:, 2], cu, cu, True, 1 / math.sqrt(d)).backward(dout)
    ref = attention_varlen_reference_backward(*(to64(qkv[:, i]) for i in range(3)), to64(dout), cu.cpu(), cu.cpu(),
                                              causal=True)
    for i, r in enumerate(ref):
        ok, err, bound = acceptance_check(to64(qkv.grad[:, i]), to64(leaf.grad[:, i]), r)
        assert ok, f"grad {i}: {err:.3g} > {bound:.3g}"


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    q, k, v, cu_q, cu_k = packed_inputs(7, [30, 0, 77], [40, 9, 77], 2, 1, 64, dtype="fp16")
    out, lse = attngen.attention_varlen(*(cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)), return_lse=True)
    assert isinstance(out, cupy.ndarray) and out.shape == (107, 2, 64) and lse.shape == (2, 107)
    ref, _ = attention_varlen_reference(to64(q), to64(k), to64(v), cu_q.cpu(), cu_k.cpu())
    assert np.max(np.abs(cupy.asnumpy(out).astype(np.float64) - ref)) < 1e-2


def test_many_sequences_past_the_sorted_schedule():
    """More sequences than the schedule kernel sorts (1024): placed in order, every one still computed."""
    rng = np.random.default_rng(8)
    lens_q = rng.integers(0, 9, size=1500).tolist()
    lens_k = rng.integers(0, 9, size=1500).tolist()
    q, k, v, cu_q, cu_k = packed_inputs(8, lens_q, lens_k, 2, 2, 64)
    check_varlen(q, k, v, cu_q, cu_k, causal=True)


def test_bad_offsets_touch_nothing():
    """Offsets that fall, or pass the packed rows, run no tile: outputs stay as they were, nothing is read or
    written out of bounds, and the next call is exact."""
    q, k, v, cu_q, cu_k = packed_inputs(9, [64, 64], [64, 64], 2, 2, 64)
    kernel = attngen.build(attngen.api.spec_for_inputs(q, k, v, False, layout="varlen"))
    for bad in ([0, 100, 64], [0, 64, 4096], [5, 64, 128]):
        out = torch.full((128, 2, 64), 7.0, device="cuda", dtype=q.dtype)
        kernel(q, k, v, out=out, cu_seqlens_q=torch.tensor(bad, dtype=torch.int32, device="cuda"), cu_seqlens_k=cu_k)
        torch.cuda.synchronize()
        assert torch.all(out == 7.0)
    check_varlen(q, k, v, cu_q, cu_k)


def test_argument_errors():
    q, k, v, cu_q, cu_k = packed_inputs(10, [8, 8], [8, 8], 2, 2, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q.*int32"):
        attngen.attention_varlen(q, k, v, cu_q.long(), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_q, cu_seqlens_k: expected one length"):
        attngen.attention_varlen(q, k, v, cu_q, cu_k[:2])
    with pytest.raises(ValueError, match="q, v: expected 3 dims"):
        attngen.attention_varlen(q[None], k[None], v[None], cu_q, cu_k)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        attngen.attention_varlen(q, k, v, cu_q, cu_k, max_seqlen_q=-1)
    kernel = attngen.build(attngen.api.spec_for_inputs(q, k, v, False, layout="varlen"))
    with pytest.raises(ValueError, match="cu_seqlens_q, cu_seqlens_k: this kernel's layout is varlen"):
        kernel(q, k, v)
    with pytest.raises(ValueError, match="cu_seqlens_q: this kernel was built for the batch layout"):
        attngen.build(attngen.Spec(head_dim=64))(q[None], k[None], v[None], cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def test_repeated_calls_swap_offsets_and_inputs():
    """A second call with the same shapes takes the remembered launch (schedule and kernel): new inputs,
    new offsets (same batch size, other lengths) and fresh outputs must all be swapped in."""
    h, d = 4, 128
    for seed, (lens_q, lens_k) in enumerate((([70, 0, 300, 30], [70, 5, 280, 45]), ([1, 200, 99, 100], [3, 300, 30, 67]),
                                             ([400, 0, 0, 0], [400, 0, 0, 0]))):
        gen = torch.Generator(device="cuda").manual_seed(100 + seed)
        q = torch.randn(400, h, d, generator=gen, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(400, 2, d, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
        out, lse = attngen.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
        ref, ref_lse = attention_varlen_reference(to64(q), to64(k), to64(v), cu_q.cpu(), cu_k.cpu(), causal=True)
        same = framework_varlen(q, k, v, cu_q, cu_k, True, 1 / math.sqrt(d))
        ok, err, bound = acceptance_check(to64(out), to64(same), ref)
        assert ok, f"call {seed}: {err:.3g} > {bound:.3g}"
        assert np.array_equal(np.isneginf(to64(lse)), np.isneginf(ref_lse))
