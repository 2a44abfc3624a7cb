"""GPU tests of the block-sparse forward: runtime block layouts (block-CSR read by the kernel) and mask
patterns compiled into the kernel as code, against the float64 reference (ARCHITECTURE.md criterion)."""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen import masks
from attngen.masks import BlockMask
from attngen.tools.reference import acceptance_check, attention_reference, attention_same_dtype_reference

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def inputs(seed, batch, sq, sk, hq, hkv, d, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, s, h, d, generator=gen, device="cuda", dtype=dtype)
            for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]


def to64(x):
    return x.detach().to("cpu", torch.float64).numpy()


def run_and_check(kernel, q, k, v, element_mask, block_mask=None, causal=False, call=None, lse_tol=2e-3,
                  scale=None, **mods):
    """Run with poisoned outputs (call: more keyword arguments); compare with the float64 and same-dtype
    references given the same mask and modifiers (mods: softcap, alibi_slopes, score_mod, mask_mod)."""
    b, sq, hq, _ = q.shape
    out = torch.full((b, sq, hq, kernel.spec.head_dim_v), float("nan"), device="cuda", dtype=q.dtype)
    lse = torch.full((b, hq, sq), float("nan"), device="cuda", dtype=torch.float32)
    kernel(q, k, v, out=out, lse=lse, **({"block_mask": block_mask} if block_mask is not None else {}), **(call or {}))
    torch.cuda.synchronize()
    check_output(out, lse, q, k, v, element_mask, kernel.spec.dtype, causal=causal, lse_tol=lse_tol, scale=scale, **mods)
    return out, lse


def check_output(out, lse, q, k, v, element_mask, dtype, causal=False, lse_tol=2e-3, scale=None, **mods):
    """out and lse against the float64 reference (the DESIGN criterion, the same-dtype reference's error the
    baseline) given the mask and modifiers; -inf LSE exactly where the reference has it."""
    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, scale=scale, mask=element_mask, **mods)
    same, _ = attention_same_dtype_reference(q64, k64, v64, causal=causal, scale=scale, mask=element_mask,
                                             dtype=dtype, **mods)
    ok, err, bound = acceptance_check(to64(out), same, ref)
    assert ok, f"max|out - ref64| = {err:.3g} > bound {bound:.3g}"
    got_lse = to64(lse)
    assert np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    if finite.any():
        assert np.max(np.abs(got_lse[finite] - ref_lse[finite])) < lse_tol


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize("density", [0.0, 0.25, 0.6, 1.0])
def test_random_runtime_layouts(block, density):
    rng = np.random.default_rng(int(density * 100) + block)
    sq, sk, hq, hkv = 300, 1000, 4, 2
    spec = attngen.Spec(head_dim=128, dtype="bf16", mask={"kind": "runtime", "block_size": block})
    kernel = attngen.build(spec)
    layout = rng.random((hq, -(-sq // block), -(-sk // block))) < density     # per-head layout
    mask = BlockMask.from_dense(layout, sq, sk, block_size=(block, block))
    q, k, v = inputs(block, 2, sq, sk, hq, hkv, 128)
    out, lse = run_and_check(kernel, q, k, v, mask.element_mask(), block_mask=mask)
    if density == 0.0:
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_runtime_layout_shared_across_heads_with_full_blocks():
    sq = sk = 513
    layout = np.tril(np.ones((1, 5, 5), dtype=bool))
    full = np.tril(np.ones((1, 5, 5), dtype=bool), k=-1)
    mask = BlockMask.from_dense(layout, sq, sk, block_size=(128, 128), full=full)
    kernel = attngen.build(attngen.Spec(head_dim=64, dtype="fp16", mask={"kind": "runtime"}))
    q, k, v = inputs(3, 1, sq, sk, 8, 1, 64, torch.float16)
    run_and_check(kernel, q, k, v, mask.element_mask(), block_mask=mask)


PATTERNS = [
    {"kind": "causal"},
    {"kind": "sliding_window", "left": 100, "right": 0},
    {"kind": "sliding_window", "left": 64, "right": 64, "block_size": 64},
    {"kind": "longformer", "window": 96, "global_tokens": [0, 5, 200]},
    {"kind": "bigbird", "window": 3, "global_tokens": [0, 1], "random_blocks": 2, "block_size": 64, "seed": 3},
    {"kind": "bigbird", "window": 1, "global_tokens": [], "random_blocks": 1, "block_size": 128, "seed": 0},
    {"kind": "dilated", "window": 16, "dilation": 3},
    {"kind": "strided", "stride": 64},
    {"kind": "fixed", "stride": 50, "summary": 4},
    {"kind": "or", "of": [{"kind": "sliding_window", "left": 30, "right": 0}, {"kind": "strided", "stride": 97}]},
]


def element_mask(pattern, heads, sq, sk):
    element = pattern.element(np.arange(heads)[:, None, None], np.arange(sq)[None, :, None],
                              np.arange(sk)[None, None, :], sq, sk)
    return np.broadcast_to(element, (heads, sq, sk))


@pytest.mark.parametrize("seqlens", [(387, 387), (300, 517), (517, 203), (1, 113)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("mask_section", PATTERNS, ids=lambda m: m["kind"] + str(m.get("block_size", "")))
def test_patterns_compiled_as_code(mask_section, seqlens):
    sq, sk = seqlens
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask=mask_section)
    kernel = attngen.build(spec)
    assert "full_row_ptr" not in kernel.source                   # no index tensor: the mask is code
    q, k, v = inputs(17, 2, sq, sk, 4, 2, 64)                     # GQA 2:1
    run_and_check(kernel, q, k, v, element_mask(spec.mask_pattern, 4, sq, sk))


def test_document_and_layout_patterns_compiled_as_code(tmp_path):
    n = 451
    doc = attngen.Spec(head_dim=128, dtype="fp16", mask={"kind": "and", "of": [
        {"kind": "document", "seq_lens": [100, 250, 101]}, {"kind": "causal"}]})
    q, k, v = inputs(2, 1, n, n, 2, 2, 128, torch.float16)
    run_and_check(attngen.build(doc), q, k, v, element_mask(doc.mask_pattern, 2, n, n))
    layout = np.random.default_rng(0).random((2, 8, 8)) < 0.4           # per-head, 64 x 64 blocks
    np.save(tmp_path / "layout.npy", layout)
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "layout", "path": str(tmp_path / "layout.npy"),
                                                       "block_size": 64})
    q, k, v = inputs(4, 2, n, n, 2, 1, 64)
    out, lse = run_and_check(attngen.build(spec), q, k, v, element_mask(spec.mask_pattern, 2, n, n))


def test_many_documents_compiled_as_code():
    """64 documents of random lengths (1 to 40 tokens, the conditional search 6 deep), causal: forward."""
    lens = np.random.default_rng(3).integers(1, 41, 64).tolist()
    n = sum(lens)
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "and", "of": [
        {"kind": "document", "seq_lens": lens}, {"kind": "causal"}]})
    q, k, v = inputs(6, 1, n, n, 2, 2, 64)
    run_and_check(attngen.build(spec), q, k, v, element_mask(spec.mask_pattern, 2, n, n))


def test_pattern_kernel_and_runtime_kernel_agree():
    # A sliding window as code, and as a block-CSR from the same pattern with the window as a mask_mod.
    sq = sk = 640
    section = {"kind": "sliding_window", "left": 128, "right": 0}
    coded = attngen.build(attngen.Spec(head_dim=128, dtype="bf16", mask=section))
    runtime = attngen.build(attngen.Spec(head_dim=128, dtype="bf16", mask={"kind": "runtime"},
                                         mask_mod="kv_idx >= q_idx + seqlen_k - seqlen_q - 128 && "
                                                  "kv_idx <= q_idx + seqlen_k - seqlen_q"))
    q, k, v = inputs(5, 1, sq, sk, 2, 2, 128)
    elements = element_mask(coded.spec.mask_pattern, 2, sq, sk)
    out_code, lse_code = run_and_check(coded, q, k, v, elements)
    block_mask = BlockMask.from_pattern(coded.spec.mask_pattern, sq, sk, block_size=(128, 128))
    out_csr, lse_csr = run_and_check(runtime, q, k, v, elements, block_mask=block_mask)
    assert (out_code.float() - out_csr.float()).abs().max().item() < 2e-2
    assert (lse_code - lse_csr).abs().max().item() < 1e-3
    with pytest.raises(ValueError, match="as code"):
        coded(q, k, v, block_mask=block_mask)


def test_fully_masked_query_tiles_write_zero_and_neg_inf():
    # seqlen_q > seqlen_k with causal alignment: the first 300 rows see no key at all.
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "causal"})
    q, k, v = inputs(9, 1, 500, 200, 2, 2, 64)
    out, lse = run_and_check(attngen.build(spec), q, k, v, element_mask(spec.mask_pattern, 2, 500, 200))
    assert torch.all(out[:, :300] == 0) and torch.all(torch.isneginf(lse[:, :, :300]))


def test_long_sequence_tile_list():
    # 16384 keys: 512 key tiles listed in shared memory per CTA.
    spec = attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "sliding_window", "left": 700, "right": 0})
    q, k, v = inputs(6, 1, 64, 16384, 1, 1, 64)
    run_and_check(attngen.build(spec), q, k, v, element_mask(spec.mask_pattern, 1, 64, 16384))


def test_runtime_kernel_refuses_pattern_masks_with_partial_blocks():
    kernel = attngen.build(attngen.Spec(head_dim=64, dtype="bf16", mask={"kind": "runtime"}))
    q, k, v = inputs(1, 1, 256, 256, 2, 2, 64)
    window = BlockMask.from_pattern(masks.SlidingWindow(100, 0), 256, 256)
    with pytest.raises(ValueError, match="partial blocks are masked by sliding_window_100_0.*'element'"):
        kernel(q, k, v, block_mask=window)
