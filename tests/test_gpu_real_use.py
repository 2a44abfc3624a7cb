"""GPU tests of what a FlashAttention user does and gets right there: per-call masks on a side stream while
the default stream is busy, BlockMasks whose partial blocks need an element predicate, large scores at
tiny sequence lengths in the backward (FlashAttention's test_flash_attn_bwd_overflow), and wrong
arguments that must be refused with the right kind of error before anything is launched."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import attngen
from attngen.tools.checking import framework_attention
from attngen.masks import Causal, SlidingWindow
from attngen.tools.reference import acceptance_check, attention_reference_backward

from test_gpu_backward import to64
from test_gpu_forward import poisoned, random_inputs
from test_gpu_sparse import run_and_check

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

SLEEP_CYCLES = 50_000_000      # ~25 ms of a busy legacy default stream


# ---- finding 1: per-call device data on the launch's stream, alive until the kernel ran -----------------

def test_masks_rebuilt_per_call_on_a_side_stream_while_the_default_stream_is_busy():
    """A new BlockMask every call, launched on a side stream while the legacy default stream sleeps: the
    layout must be written on the side stream (not on CuPy's current stream, which is the default one)."""
    sq = sk = 640
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "runtime", "block_size": 128})
    kernel = attngen.build(spec)
    side = torch.cuda.Stream()
    rng = np.random.default_rng(12)
    results = []
    with torch.cuda.stream(side):
        q, k, v = random_inputs(1201, 2, sq, sk, 4, 2, 64, 64, "bf16")
        for _ in range(12):
            layout = rng.random((4, 5, 5)) < 0.5
            layout[:, :, 0] = True
            mask = attngen.BlockMask.from_dense(layout, sq, sk, block_size=128)
            with torch.cuda.stream(torch.cuda.default_stream()):
                torch.cuda._sleep(SLEEP_CYCLES)        # anything wrongly queued there runs after the kernel
            out, lse = kernel(q, k, v, block_mask=mask)
            results.append((mask.element_mask(), out, lse))
            del mask
            gc.collect()
    torch.cuda.synchronize()
    for element, out, _ in results:
        ok, err, bound = _check_forward(q, k, v, out, element)
        assert ok, f"max|out - ref64| = {err:.3g} > bound {bound:.3g}"


def _check_forward(q, k, v, out, element):
    from attngen.tools.reference import attention_reference, attention_same_dtype_reference

    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, _ = attention_reference(q64, k64, v64, mask=element)
    same, _ = attention_same_dtype_reference(q64, k64, v64, mask=element, dtype="bf16")
    return acceptance_check(to64(out), same, ref)


def test_default_slopes_and_layouts_are_cached_per_stream():
    """The same BlockMask and default ALiBi slopes used on two streams: each stream gets its own copy, and
    both results are right."""
    from attngen.runtime.uploads import UPLOADS

    sq = sk = 300
    mask = attngen.BlockMask.from_pattern(SlidingWindow(100, 0), sq, sk, block_size=64)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    q, k, v = random_inputs(1202, 1, sq, sk, 2, 2, 64, 64, "bf16")
    outs = []
    for s in streams:
        with torch.cuda.stream(s):
            outs.append(attngen.attention(q, k, v, block_mask=mask))
    torch.cuda.synchronize()
    keys = [key for key in UPLOADS._entries if key[0] == ("csr", id(mask))]
    assert len({key[-1] for key in keys}) == 2
    for out in outs:
        assert _check_forward(q, k, v, out, mask.element_mask())[0]


# ---- finding 2: a BlockMask is computed exactly, or refused -----------------------------------------------

def test_block_mask_from_a_python_predicate_with_partial_blocks_is_refused():
    sq = sk = 300
    q, k, v = random_inputs(1203, 1, sq, sk, 2, 2, 64, 64, "bf16")
    causal = attngen.BlockMask.from_predicate(lambda h, q_idx, kv_idx: kv_idx <= q_idx, sq, sk, block_size=64)
    with pytest.raises(ValueError, match="block_mask: .*Python function"):
        attngen.attention(q, k, v, block_mask=causal)
    # block-aligned predicates have no partial blocks: computed exactly
    blocky = attngen.BlockMask.from_predicate(lambda h, q_idx, kv_idx: q_idx // 64 >= kv_idx // 64, sq, sk, block_size=64)
    out = attngen.attention(q, k, v, block_mask=blocky)
    assert _check_forward(q, k, v, out, blocky.element_mask())[0]


@pytest.mark.parametrize("combine", ["pattern", "pattern_and_dense", "dense_or_window", "window_and_pattern"])
def test_block_masks_with_element_predicates_are_exact(combine):
    sq, sk = 300, 260
    q, k, v = random_inputs(1204, 2, sq, sk, 2, 1, 64, 64, "bf16")
    causal = attngen.BlockMask.from_pattern(Causal(), sq, sk, block_size=64)
    window = attngen.BlockMask.from_pattern(SlidingWindow(70, 10), sq, sk, block_size=64)
    dense = attngen.BlockMask.from_dense(np.ones((5, 5), bool), sq, sk, block_size=64)
    some = attngen.BlockMask.from_dense(np.random.default_rng(4).random((5, 5)) < 0.4, sq, sk, block_size=64)
    mask = {"pattern": causal, "pattern_and_dense": causal & dense, "dense_or_window": some | window,
            "window_and_pattern": window & causal}[combine]
    out = attngen.attention(q, k, v, block_mask=mask)
    torch.cuda.synchronize()
    assert _check_forward(q, k, v, out, mask.element_mask())[0]
    # and the backward sees the same mask
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    dout = torch.randn_like(q)
    attngen.attention(*leaves, block_mask=mask).backward(dout)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, 1 / 8, mask=mask.element_mask()).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), mask=mask.element_mask())
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), leaves, same, ref):
        ok, err, bound = acceptance_check(to64(mine.grad), to64(theirs.grad), r)
        assert ok, f"{name}: {err:.3g} > {bound:.3g}"


def test_a_kernel_built_without_the_element_predicate_refuses_the_mask():
    sq = sk = 300
    q, k, v = random_inputs(1205, 1, sq, sk, 2, 2, 64, 64, "bf16")
    kernel = attngen.build(attngen.Spec(head_dim=64, mask={"kind": "runtime", "block_size": 64}))
    with pytest.raises(ValueError, match="block_mask: its partial blocks are masked by causal"):
        kernel(q, k, v, block_mask=attngen.BlockMask.from_pattern(Causal(), sq, sk, block_size=64))


# ---- finding 3: large scores at tiny lengths (FlashAttention's test_flash_attn_bwd_overflow) --------------

def _overflow_case(path, d, sq, sk, dtype, causal, deterministic, seed):
    q, k, v = random_inputs(seed, 2, sq, sk, 5, 5, d, d, dtype)
    q, k, v = q * 5, k * 3, v * 3
    spec = attngen.Spec(head_dim=d, dtype=dtype, causal=causal, deterministic=deterministic, backward=True)
    kernels = attngen.build_backward(spec, path=path)
    out, lse = attngen.build(spec)(q, k, v)
    gen = torch.Generator(device="cuda").manual_seed(seed + 7)      # seeded: the same dout every run
    dout = torch.randn(2, sq, 5, d, generator=gen, device="cuda", dtype=q.dtype)
    grads = [poisoned(x.shape, q.dtype) for x in (q, k, v)]
    kernels(q, k, v, out, lse, dout, dq=grads[0], dk=grads[1], dv=grads[2])
    torch.cuda.synchronize()
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, causal, 1 / d ** 0.5).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal)
    algorithm = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal,
                                             algorithm_dtype=dtype, out=to64(out))
    # FlashAttention's bound for this test (test_flash_attn_bwd_overflow): 5x the same-dtype error plus 1e-3
    # (2e-3 for dV), the floor taken relative to the gradient's scale here (these inputs scale it up to ~15x).
    # The same-dtype error is the worse of the framework's autograd and FlashAttention's algorithm at its own
    # rounding points (acceptance_check_gradient): with one or two keys the exact gradient is ~0 and the
    # algorithm's delta = rowsum(dO * O) of the rounded O errs more than the framework's autograd.
    for name, mine, theirs, a, r, floor in zip(("dq", "dk", "dv"), grads, same, algorithm, ref, (1e-3, 1e-3, 2e-3)):
        assert torch.isfinite(mine).all(), f"{path} {name}: not finite"
        err, scale = float(np.max(np.abs(to64(mine) - r))), max(1.0, float(np.max(np.abs(r))))
        baseline = max(float(np.max(np.abs(to64(theirs.grad) - r))), float(np.max(np.abs(a - r))))
        bound = 5 * baseline + floor * scale
        assert err <= bound, f"{path} {name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g} (max|ref| {scale:.3g})"


@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 17, 113, 130, 203])
@pytest.mark.parametrize("path", ["mma_sync", "wgmma"])
def test_backward_overflow_at_tiny_lengths(d, seqlen, path):
    if path == "wgmma" and (d % 32 or torch.cuda.get_device_capability() != (9, 0)):
        pytest.skip("the wgmma pass takes head dims that are multiples of 32 on sm_90")
    _overflow_case(path, d, seqlen, seqlen, "fp16", False, False, 1300 + d + seqlen)


@pytest.mark.parametrize("sq,sk", [(1, 17), (17, 1), (113, 203), (203, 113)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_overflow_tails_causal_and_deterministic(sq, sk, causal, deterministic):
    # the deterministic backward's dQ pass is mma.sync only (build_backward's path names the dK/dV pass)
    hopper = torch.cuda.get_device_capability() == (9, 0) and not deterministic
    for path in ("mma_sync", "wgmma") if hopper else ("mma_sync",):
        _overflow_case(path, 128, sq, sk, "bf16", causal, deterministic, 1400 + sq + sk)


# ---- finding 6: the right kind of error, naming the argument, nothing launched ----------------------------

def test_wrong_arguments_raise_type_or_value_errors():
    import cupy

    q, k, v = random_inputs(1206, 1, 64, 64, 2, 2, 64, 64, "bf16")
    for bad in (torch.ones(1, 1, dtype=torch.bool, device="cuda"), np.ones((1, 1), bool)):
        with pytest.raises(TypeError, match="block_mask: expected an attngen.BlockMask"):
            attngen.attention(q, k, v, block_mask=bad)
    for name, args in (("q", (q[:, :, :0], k, v)), ("k", (q, k[:, :, :0], v[:, :, :0]))):
        with pytest.raises(ValueError, match=f"{name}: expected at least 1 head"):
            attngen.attention(*args)
    kc, vc = cupy.asarray(k.float().cpu().numpy()).astype(cupy.float16), cupy.asarray(v.float().cpu().numpy()).astype(cupy.float16)
    with pytest.raises(TypeError, match="q, k, v: expected one array library"):
        attngen.attention(q.half(), kc, vc)
    with pytest.raises(TypeError, match="q, k, v: expected one array library"):
        attngen.attention(q.half().requires_grad_(True), kc, vc)
