"""GPU tests of the backward kernels and autograd: dq, dk, dv against float64 with the ARCHITECTURE.md criterion
applied to each gradient (the same-dtype baseline is PyTorch's bf16/fp16 autograd of naive attention),
determinism, autograd plumbing, and a small transformer block trained beside torch SDPA."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen.tools.checking import framework_attention
from attngen.tools.reference import acceptance_check, attention_reference_backward

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def check_gradients(q, k, v, causal, scale=None, seed=0, deterministic=False):
    """attngen's gradients (through autograd) against float64, bounded by the same-dtype framework's error;
    dQ by atomics from the dK/dV pass, or (deterministic) by its own pass."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, device="cuda", dtype=q.dtype)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = attngen.attention(*leaves, causal=causal, scale=scale, deterministic=deterministic)
    out.backward(dout)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, causal, scale).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal, scale=scale)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), leaves, same, ref):
        assert mine.grad.dtype == q.dtype and mine.grad.shape == mine.shape
        ok, err, bound = acceptance_check(to64(mine.grad), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"
    return [x.grad for x in leaves]


def inputs(seed, batch, sq, sk, hq, hkv, d, dv=None, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, s, h, n, generator=gen, device="cuda", dtype=dtype)
            for s, h, n in ((sq, hq, d), (sk, hkv, d), (sk, hkv, dv or d))]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("d", [32, 64, 96, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_gradients_over_head_dims(d, dtype, causal, deterministic):
    q, k, v = inputs(d, 2, 203, 203, 4, 2, d, dtype=DTYPES[dtype])
    check_gradients(q, k, v, causal, deterministic=deterministic)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (113, 203), (203, 113), (1, 300), (300, 17), (512, 512)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_gradients_over_seqlens(sq, sk, causal, deterministic):
    q, k, v = inputs(sq + sk, 1, sq, sk, 8, 1, 64)           # MQA: dK/dV sum over 8 query heads
    check_gradients(q, k, v, causal, deterministic=deterministic)


@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (24, 56)])
def test_gradients_with_head_dim_v(d, dv):
    q, k, v = inputs(d + dv, 2, 150, 170, 4, 4, d, dv)
    check_gradients(q, k, v, causal=True)


# (head_dim, head_dim_v) -> keys as the wgmma N (columns) or M (rows) in the wgmma dK/dV pass
WGMMA_HEADS = {(32, 32): False, (96, 96): False, (128, 64): False, (160, 160): True, (192, 192): True,
               (192, 128): True, (256, 256): True, (256, 128): True}


def on_wgmma_dkdv(spec, columns):
    """The spec's backward kernels, which must take the wgmma dK/dV pass with the given layout (sm_90 only)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma dK/dV pass needs an sm_90 GPU")
    kernels = attngen.build_backward(spec)
    assert kernels.plan.dkdv.path == "wgmma" and kernels.plan.dkdv.keys_as_columns == columns, kernels
    return kernels


@pytest.mark.parametrize("d,dv", list(WGMMA_HEADS), ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True])
def test_padded_uneven_and_wide_heads_train_on_the_wgmma_pass(d, dv, causal):
    """Head dims padded to 64-column chunks, head_dim_v != head_dim, and wide heads (keys as the wgmma N, dK^T and
    dV^T accumulated): GQA, seqlen_q != seqlen_k both ways, tails of both."""
    on_wgmma_dkdv(attngen.Spec(head_dim=d, head_dim_v=dv, dtype="bf16", causal=causal), WGMMA_HEADS[d, dv])
    for sq, sk in ((113, 203), (203, 17)):
        q, k, v = inputs(d + dv + sq, 2, sq, sk, 4, 2, d, dv)
        check_gradients(q, k, v, causal)


@pytest.mark.parametrize("d", [192, 256])
def test_wide_heads_with_modifiers_window_and_block_mask(d):
    """Keys as columns under softcap and ALiBi (fp16), a sliding window, and a runtime block mask of 64 x 64
    blocks (the layout's tiles), large-magnitude inputs included."""
    on_wgmma_dkdv(attngen.Spec(head_dim=d, dtype="fp16", causal=True, softcap=5.0, alibi=True), True)
    q, k, v = inputs(d, 2, 203, 317, 4, 2, d, dtype=torch.float16)
    check_modified_gradients(q, k, v, causal=True, softcap=5.0, alibi=True)
    from attngen.masks import BlockMask, SlidingWindow

    sq = sk = 300
    q, k, v = inputs(d + 1, 1, sq, sk, 4, 1, d)
    mask = np.broadcast_to(SlidingWindow(70, 0).element(0, np.arange(sq)[:, None], np.arange(sk)[None], sq, sk), (1, sq, sk))
    check_modified_gradients(q, k, v, mask=mask, causal=True, window=(70, 0))
    sq, sk, hq, hkv = 203, 390, 4, 2
    layout = np.random.default_rng(d).random((hq, -(-sq // 64), -(-sk // 64))) < 0.4
    block_mask = BlockMask.from_dense(layout, sq, sk, block_size=64)
    q, k, v = (x * 4 for x in inputs(d + 2, 2, sq, sk, hq, hkv, d))      # logits in the hundreds
    dout = torch.randn(2, sq, hq, d, device="cuda", dtype=q.dtype)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    attngen.attention(*leaves, block_mask=block_mask).backward(dout)
    mask = block_mask.element_mask()
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, 1 / math.sqrt(d), mask=mask).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), mask=mask)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), leaves, same, ref):
        ok, err, bound = acceptance_check(to64(mine.grad), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"


def test_non_contiguous_inputs_and_gradient_layout():
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs(5, 2, 130, 130, 4, 2, 64))
    assert not q.is_contiguous()
    check_gradients(q, k, v, causal=False, scale=0.3)


def test_deterministic_bit_identical_gradients():
    q, k, v = inputs(9, 2, 1000, 1000, 8, 2, 128)
    out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
    dout = torch.randn_like(out)
    first = attngen.attention_backward(q, k, v, out, lse, dout, causal=True, deterministic=True)
    for _ in range(3):
        again = attngen.attention_backward(q, k, v, out, lse, dout, causal=True, deterministic=True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # the default adds dQ with atomics, in whatever order the CTAs finish: it agrees with the deterministic
    # pass to within fp32 summation order, rounded to bf16
    atomic = attngen.attention_backward(q, k, v, out, lse, dout, causal=True)
    for a, b in zip(atomic, first):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-3)


def test_cupy_level_backward():
    cupy = pytest.importorskip("cupy")
    q, k, v = inputs(10, 1, 77, 99, 2, 1, 64, dtype=torch.float16)
    qc, kc, vc = (cupy.asarray(x) for x in (q, k, v))
    out, lse = attngen.attention(qc, kc, vc, return_lse=True)
    dout = cupy.asarray(torch.randn(1, 77, 2, 64, device="cuda", dtype=torch.float16))
    dq, dk, dv = attngen.attention_backward(qc, kc, vc, out, lse, dout)
    assert isinstance(dq, cupy.ndarray) and dk.shape == (1, 99, 1, 64)
    ref = attention_reference_backward(*(cupy.asnumpy(x).astype(np.float64) for x in (qc, kc, vc, dout)))
    for mine, r in zip((dq, dk, dv), ref):
        assert np.max(np.abs(cupy.asnumpy(mine).astype(np.float64) - r)) < 2e-2


def test_autograd_plumbing():
    q, k, v = inputs(11, 1, 64, 64, 2, 2, 64)
    with torch.no_grad():
        out = attngen.attention(q.requires_grad_(), k, v)
    assert out.grad_fn is None
    q.requires_grad_(False)
    with pytest.raises(ValueError, match="backward"):           # refused before the forward runs
        from attngen.autograd import attention_with_grad

        attention_with_grad(attngen.Spec(head_dim=64, score_mod="score"), q, k, v, {})
    with pytest.raises(ValueError, match="dout"):
        qd = q.detach()
        o, l = attngen.attention(qd, k, v, return_lse=True)
        attngen.attention_backward(qd, k, v, o, l, torch.zeros(1, 64, 2, 32, device="cuda", dtype=q.dtype))


def test_small_transformer_block_trains_like_sdpa():
    torch.manual_seed(0)
    dim, heads, seq, batch = 256, 4, 256, 4

    class Block(torch.nn.Module):
        def __init__(self, attention):
            super().__init__()
            self.attention = attention
            self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim))

        def forward(self, x):
            q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, heads, dim // heads).unbind(2)
            x = x + self.proj(self.attention(q, k, v).reshape(batch, seq, dim))
            return x + self.mlp(self.norm2(x))

    def ours(q, k, v):
        return attngen.attention(q, k, v, causal=True)

    def sdpa(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                               is_causal=True)
        return out.transpose(1, 2)

    models = [Block(ours).cuda().bfloat16(), Block(sdpa).cuda().bfloat16()]
    models[1].load_state_dict(models[0].state_dict())
    optims = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    data = torch.randn(8, batch, seq, dim, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(8, batch, seq, dim, device="cuda", dtype=torch.bfloat16)
    losses = [[], []]
    for step in range(8):
        for i, (model, opt) in enumerate(zip(models, optims)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(data[step]).float(), target[step].float())
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    ours_l, theirs = np.array(losses[0]), np.array(losses[1])
    assert ours_l[-1] < ours_l[0]                                       # it trains
    assert np.max(np.abs(ours_l - theirs) / theirs) < 2e-2, (ours_l, theirs)


def check_modified_gradients(q, k, v, mask=None, causal=False, softcap=None, alibi=False, window=None, seed=0):
    """Gradients through attngen.attention's keywords against float64 with the same mask and modifiers."""
    hq = q.shape[2]
    slopes = np.random.default_rng(seed).uniform(0.02, 0.3, hq).astype(np.float32) if alibi else None
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    dout = torch.randn(q.shape[:3] + (v.shape[-1],), generator=gen, device="cuda", dtype=q.dtype)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    call = dict(causal=causal, window=window, softcap=softcap,
                alibi_slopes=torch.tensor(slopes, device="cuda") if alibi else None)
    attngen.attention(*leaves, **call).backward(dout)
    scale = 1 / math.sqrt(q.shape[-1])
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    torch_causal = causal and window is None
    framework_attention(*same, torch_causal, scale, mask=mask, softcap=softcap, alibi_slopes=slopes).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=torch_causal, scale=scale,
                                       mask=mask, softcap=softcap, alibi_slopes=slopes)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), leaves, same, ref):
        ok, err, bound = acceptance_check(to64(mine.grad), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_with_softcap_and_alibi(d, causal):
    q, k, v = inputs(d + causal, 2, 203, 317, 4, 2, d)
    check_modified_gradients(q, k, v, causal=causal, softcap=5.0, alibi=True)


@pytest.mark.parametrize("sq,sk", [(300, 300), (203, 517), (517, 203)])
def test_gradients_with_a_sliding_window(sq, sk):
    from attngen.masks import SlidingWindow

    q, k, v = inputs(sq, 1, sq, sk, 4, 1, 64)
    mask = np.broadcast_to(SlidingWindow(70, 0).element(0, np.arange(sq)[:, None], np.arange(sk)[None], sq, sk), (1, sq, sk))
    check_modified_gradients(q, k, v, mask=mask, causal=True, window=(70, 0))


def check_pattern_gradients(spec, kernels, qkv, mask):
    """The backward kernels of a pattern spec against float64, bounded by the framework with the same mask."""
    q, k, v = qkv
    out, lse = attngen.build(spec)(q, k, v)
    dout = torch.randn_like(out)
    dq, dk, dv = kernels(q, k, v, out, lse, dout)
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, spec.softmax_scale, mask=mask).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), mask=mask)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same, ref):
        ok, err, bound = acceptance_check(to64(mine), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("section", [
    {"kind": "bigbird", "window": 3, "global_tokens": [0, 1], "random_blocks": 2, "block_size": 128, "seed": 1},
    {"kind": "and", "of": [{"kind": "document", "seq_lens": [100, 200, 87]}, {"kind": "causal"}]},
    {"kind": "and", "of": [{"kind": "document", "seq_lens": [6] * 63 + [9]}, {"kind": "causal"}]},
    {"kind": "strided", "stride": 64},
], ids=lambda m: m["kind"] + (f"{len(m['of'][0]['seq_lens'])}docs" if m["kind"] == "and" else ""))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_gradients_with_mask_patterns(section, deterministic):
    n = 387
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask=section, deterministic=deterministic)
    pattern = spec.mask_pattern
    mask = np.broadcast_to(pattern.element(np.arange(4)[:, None, None], np.arange(n)[None, :, None],
                                           np.arange(n)[None, None, :], n, n), (4, n, n))
    check_pattern_gradients(spec, attngen.build_backward(spec), inputs(n, 2, n, n, 4, 2, 64), mask)


@pytest.mark.parametrize("d,section", [
    (128, {"kind": "sliding_window", "left": 256, "right": 0}),
    (64, {"kind": "and", "of": [{"kind": "document", "seq_lens": [100, 200, 87]}, {"kind": "causal"}]}),
    (128, {"kind": "bigbird", "window": 1, "global_tokens": [0], "random_blocks": 1, "block_size": 128, "seed": 2}),
], ids=["window_d128", "document_d64", "bigbird_d128"])
def test_pattern_masks_take_the_wgmma_dkdv_pass(d, section):
    """On Hopper, patterns compiled as code train on the wgmma dK/dV pass (unless this ptxas serialises its
    wgmma: the build then takes mma.sync, and this test says so)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma dK/dV pass needs an sm_90 GPU")
    n = 387
    spec = attngen.Spec(head_dim=d, dtype="bf16", mask=section)
    kernels = attngen.build_backward(spec)
    assert kernels.plan.dkdv.path == "wgmma", f"{spec.name}: dK/dV on {kernels.plan.dkdv.path}"
    pattern = spec.mask_pattern
    mask = np.broadcast_to(pattern.element(np.arange(4)[:, None, None], np.arange(n)[None, :, None],
                                           np.arange(n)[None, None, :], n, n), (4, n, n))
    check_pattern_gradients(spec, kernels, inputs(n + d, 2, n, n, 4, 2, d), mask)


def test_refuses_score_mod_for_training():
    with pytest.raises(ValueError, match="score_mod_grad"):
        attngen.build_backward(attngen.Spec(head_dim=64, score_mod="score * 2.0f"))


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic_dq", "deterministic"])
def test_gradients_with_runtime_block_masks(block, density, deterministic):
    """attention(block_mask=) trains through the kv-major CSR the launcher derives; per-head layouts, GQA."""
    from attngen.masks import BlockMask

    sq, sk, hq, hkv = 300, 517, 4, 2
    rng = np.random.default_rng(int(density * 10) + block)
    layout = rng.random((hq, -(-sq // block), -(-sk // block))) < density
    block_mask = BlockMask.from_dense(layout, sq, sk, block_size=block)
    q, k, v = inputs(block, 2, sq, sk, hq, hkv, 64)
    gen = torch.Generator(device="cuda").manual_seed(3)
    dout = torch.randn(2, sq, hq, 64, generator=gen, device="cuda", dtype=q.dtype)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    attngen.attention(*leaves, block_mask=block_mask, deterministic=deterministic).backward(dout)
    mask = block_mask.element_mask()
    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, False, 1 / 8, mask=mask).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), mask=mask)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), leaves, same, ref):
        ok, err, bound = acceptance_check(to64(mine.grad), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"
        if density == 0.0:
            assert torch.all(mine.grad == 0)


def test_gradients_with_a_score_mod_and_its_derivative():
    spec = attngen.Spec(head_dim=64, dtype="bf16", causal=True, score_mod="score * gain[h] + 0.02f * (float)(q_idx - kv_idx)",
                        score_mod_grad="gain[h]", tensors={"gain": {"dtype": "float32", "shape": ["heads"]}})
    gain = np.random.default_rng(4).uniform(0.5, 2.0, 4).astype(np.float32)
    tensors = {"gain": torch.tensor(gain, device="cuda")}
    q, k, v = inputs(21, 2, 211, 300, 4, 2, 64)
    out, lse = attngen.build(spec)(q, k, v, tensors=tensors)
    dout = torch.randn_like(out)
    dq, dk, dv = attngen.build_backward(spec)(q, k, v, out, lse, dout, tensors=tensors)

    def score_mod(s, b, h, q_idx, kv_idx):
        return s * gain[np.asarray(h)] + 0.02 * (q_idx - kv_idx)

    def score_mod_grad(s, b, h, q_idx, kv_idx):
        return np.broadcast_to(gain[np.asarray(h)], np.broadcast_shapes(np.shape(s), np.shape(h)))

    same = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    framework_attention(*same, True, spec.softmax_scale, score_mod=score_mod, score_mod_grad=score_mod_grad).backward(dout)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=True, score_mod=score_mod,
                                       score_mod_grad=score_mod_grad)
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), (dq, dk, dv), same, ref):
        ok, err, bound = acceptance_check(to64(mine), to64(theirs.grad), r)
        assert ok, f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}"
