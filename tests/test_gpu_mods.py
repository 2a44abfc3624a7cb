"""GPU tests of the score modifiers (softcap, ALiBi, score_mod) and mask_mod, with named tensors,
against the float64 reference given the same modifiers as numpy functions (ARCHITECTURE.md criterion)."""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen.masks import BlockMask, SlidingWindow
from attngen.tools.reference import alibi_slopes

from test_gpu_sparse import element_mask, inputs, run_and_check, to64

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")

from attngen.tools.reference import acceptance_check, attention_reference, attention_same_dtype_reference  # noqa: E402


def check(kernel, q, k, v, mask=None, causal=False, call=None, **mods):
    """Poisoned outputs, the references given the same modifiers as numpy functions (test_gpu_sparse)."""
    return run_and_check(kernel, q, k, v, mask, causal=causal, call=call, lse_tol=5e-3, **mods)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(head_dim, causal):
    # A scale of 1 makes scores large enough that the cap matters.
    spec = attngen.Spec(head_dim=head_dim, dtype="bf16", causal=causal, softcap=20.0, scale=0.5)
    q, k, v = inputs(1, 2, 203, 317, 4, 2, head_dim)
    check(attngen.build(spec), q, k, v, causal=causal, scale=0.5, softcap=20.0)


@pytest.mark.parametrize("slopes_shape", ["default", "heads", "batch_heads"])
def test_alibi(slopes_shape):
    spec = attngen.Spec(head_dim=64, dtype="fp16", alibi=True, causal=True)
    q, k, v = inputs(2, 2, 113, 300, 6, 3, 64, torch.float16)
    if slopes_shape == "default":
        slopes, call = alibi_slopes(6), {}
    else:
        shape = (6,) if slopes_shape == "heads" else (2, 6)
        slopes = np.random.default_rng(0).uniform(0.01, 0.5, shape).astype(np.float32)
        call = {"alibi_slopes": torch.tensor(slopes, device="cuda")}
    check(attngen.build(spec), q, k, v, causal=True, call=call, alibi_slopes=slopes)


def test_softcap_alibi_and_window_together():
    spec = attngen.Spec(head_dim=128, dtype="bf16", softcap=30.0, alibi=True,
                        mask={"kind": "sliding_window", "left": 96, "right": 0})
    q, k, v = inputs(3, 1, 400, 400, 4, 4, 128)
    pattern = SlidingWindow(96, 0)
    check(attngen.build(spec), q, k, v, mask=element_mask(pattern, 4, 400, 400), softcap=30.0,
          alibi_slopes=alibi_slopes(4))


def test_score_mod_with_per_head_and_per_batch_tensors():
    spec = attngen.Spec(head_dim=64, dtype="bf16", score_mod="score * gain[h] + bias[b * num_heads + h] * "
                        "(kv_idx % 7 == 0 ? 1.0f : 0.0f)",
                        tensors={"gain": {"dtype": "float32", "shape": ["heads"]},
                                 "bias": {"dtype": "float32", "shape": ["batch", "heads"]}})
    rng = np.random.default_rng(1)
    gain, bias = rng.uniform(0.5, 2.0, 4).astype(np.float32), rng.normal(0, 2, (2, 4)).astype(np.float32)
    q, k, v = inputs(4, 2, 150, 260, 4, 1, 64)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score * gain[h.ravel()].reshape(h.shape) + bias[b][h.ravel()].reshape(h.shape) * (kv_idx % 7 == 0)

    tensors = {"gain": torch.tensor(gain, device="cuda"), "bias": torch.tensor(bias, device="cuda")}
    check(attngen.build(spec), q, k, v, call={"tensors": tensors}, score_mod=score_mod)


def test_mask_mod_document_ids_with_fully_masked_rows():
    # Packed documents given as an int32 tensor; rows of document -1 see nothing (out 0, lse -inf).
    n = 333
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask_mod="doc[q_idx] >= 0 && doc[q_idx] == doc[kv_idx]",
                        tensors={"doc": {"dtype": "int32", "shape": ["seqlen_q"]}})
    doc = np.repeat(np.arange(4), [90, 110, 33, 100]).astype(np.int32)
    doc[200:233] = -1
    q, k, v = inputs(5, 1, n, n, 2, 2, 64)
    mask = (doc[:, None] >= 0) & (doc[:, None] == doc[None, :])
    out, lse = check(attngen.build(spec), q, k, v, mask=mask, call={"tensors": {"doc": torch.tensor(doc, device="cuda")}})
    assert torch.all(out[:, 200:233] == 0) and torch.all(torch.isneginf(lse[:, :, 200:233]))


def test_mask_mod_with_a_pattern_and_with_a_runtime_block_mask():
    n = 400
    checker = "(q_idx / 16) % 2 == (kv_idx / 16) % 2"
    element = (np.arange(n)[:, None] // 16 % 2) == (np.arange(n)[None, :] // 16 % 2)
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "causal"}, mask_mod=checker)
    q, k, v = inputs(6, 1, n, n, 2, 2, 64)
    check(attngen.build(spec), q, k, v, mask=element & np.tri(n, dtype=bool))
    # The runtime layout keeps the lower block triangle; its partial blocks evaluate the mask_mod.
    runtime = attngen.build(attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "runtime", "block_size": 128},
                                         mask_mod=checker))
    layout = np.tril(np.ones((1, 4, 4), dtype=bool))
    block_mask = BlockMask.from_dense(layout, n, n, block_size=128)
    check(runtime, q, k, v, mask=element & block_mask.element_mask()[0], call={"block_mask": block_mask})


def test_tensor_arguments_are_checked_before_launch():
    spec = attngen.Spec(head_dim=64, dtype="bf16", score_mod="score + bias[h]",
                        tensors={"bias": {"dtype": "float32", "shape": ["heads"]}})
    kernel = attngen.build(spec)
    q, k, v = inputs(7, 1, 64, 64, 2, 2, 64)
    with pytest.raises(ValueError, match="tensors: expected"):
        kernel(q, k, v)
    with pytest.raises(ValueError, match=r"tensors\['bias'\]: expected a contiguous torch float32 array of shape \[2\]"):
        kernel(q, k, v, tensors={"bias": torch.zeros(3, device="cuda")})
    with pytest.raises(ValueError, match="tensors"):
        kernel(q, k, v, tensors={"bias": torch.zeros(2, device="cuda"), "extra": torch.zeros(2, device="cuda")})
    with pytest.raises(ValueError, match="alibi_slopes"):
        kernel(q, k, v, tensors={"bias": torch.zeros(2, device="cuda")}, alibi_slopes=torch.zeros(2, device="cuda"))


def test_attention_keywords_like_flash_attention():
    q, k, v = inputs(8, 2, 211, 300, 4, 2, 64)
    slopes = np.random.default_rng(2).uniform(0.05, 0.3, 4).astype(np.float32)
    out, lse = attngen.attention(q, k, v, causal=True, window=(50, 7), softcap=15.0,
                                 alibi_slopes=torch.tensor(slopes, device="cuda"), return_lse=True)
    torch.cuda.synchronize()
    mask = element_mask(SlidingWindow(50, 0), 4, 211, 300)             # causal clips the right side to 0
    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, ref_lse = attention_reference(q64, k64, v64, mask=mask, softcap=15.0, alibi_slopes=slopes)
    same, _ = attention_same_dtype_reference(q64, k64, v64, mask=mask, dtype="bf16", softcap=15.0, alibi_slopes=slopes)
    ok, err, bound = acceptance_check(to64(out), same, ref)
    assert ok, f"max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    unbounded = attngen.attention(q, k, v, window=(-1, -1))             # FlashAttention's "no window"
    torch.cuda.synchronize()
    assert (unbounded.float() - attngen.attention(q, k, v).float()).abs().max().item() < 1e-2
    with pytest.raises(ValueError, match="window"):
        attngen.attention(q, k, v, window=(3,))
