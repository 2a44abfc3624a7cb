"""attngen.merge_attention: attention over two key sets merged from each part's (out, lse) equals attention
over all the keys (float64 reference), including rows that see keys in one part only or in neither; the
varlen layout; dtypes; refusals. NumPy here; torch (autograd included) where torch is installed."""

from __future__ import annotations

import numpy as np
import pytest

from attngen import merge_attention
from attngen.tools.reference import attention_reference


def split_case(seed, batch=2, sq=37, sk=53, hq=4, hkv=2, d=16, dv=8, split=20, causal=True):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, sq, hq, d))
    k = rng.standard_normal((batch, sk, hkv, d))
    v = rng.standard_normal((batch, sk, hkv, dv))
    visible = np.ones((hq, sq, sk), bool)
    if causal:
        visible &= np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)
    visible[:, 3, :] = False                           # a row that sees no key at all
    visible[:, 5, split:] = False                      # a row that sees keys of the first part only
    visible[:, 7, :split] = False                      # and one of the second part only
    full = attention_reference(q, k, v, mask=visible)
    a = attention_reference(q, k[:, :split], v[:, :split], mask=visible[:, :, :split])
    b = attention_reference(q, k[:, split:], v[:, split:], mask=visible[:, :, split:])
    return full, a, b


@pytest.mark.parametrize("causal", [False, True])
def test_merged_halves_are_attention_over_all_keys(causal):
    (out, lse), (out_a, lse_a), (out_b, lse_b) = split_case(1, causal=causal)
    merged, merged_lse = merge_attention(out_a, lse_a.astype(np.float32), out_b, lse_b.astype(np.float32))
    assert merged.dtype == out_a.dtype and merged_lse.dtype == np.float64      # float64 outs: merged in float64
    np.testing.assert_allclose(merged, out, rtol=0, atol=1e-5)
    finite = np.isfinite(lse)
    np.testing.assert_allclose(merged_lse[finite], lse[finite], rtol=0, atol=1e-5)
    assert np.all(merged_lse[~finite] == -np.inf) and not merged[:, 3].any()     # no key anywhere: 0, -inf


def test_the_merge_is_symmetric_and_associative():
    rng = np.random.default_rng(2)
    outs = [rng.standard_normal((3, 5, 2, 4)).astype(np.float32) for _ in range(3)]
    lses = [rng.standard_normal((3, 2, 5)).astype(np.float32) * 3 for _ in range(3)]
    lses[1][0, 1, 2] = -np.inf
    ab, lab = merge_attention(outs[0], lses[0], outs[1], lses[1])
    ba, lba = merge_attention(outs[1], lses[1], outs[0], lses[0])
    np.testing.assert_allclose(ab, ba, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lab, lba, rtol=1e-6, atol=1e-6)
    left, l_left = merge_attention(ab, lab, outs[2], lses[2])
    bc, lbc = merge_attention(outs[1], lses[1], outs[2], lses[2])
    right, l_right = merge_attention(outs[0], lses[0], bc, lbc)
    np.testing.assert_allclose(left, right, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l_left, l_right, rtol=1e-5, atol=1e-5)


def test_varlen_layout_and_half_precision():
    (out, lse), (out_a, lse_a), (out_b, lse_b) = split_case(3, batch=1)
    packed = lambda o: o[0]                              # noqa: E731  [total, heads, dv]
    packed_lse = lambda x: x[0].astype(np.float32)       # noqa: E731  [heads, total]
    merged, merged_lse = merge_attention(packed(out_a).astype(np.float16), packed_lse(lse_a),
                                         packed(out_b).astype(np.float16), packed_lse(lse_b))
    assert merged.dtype == np.float16 and merged.shape == packed(out).shape
    np.testing.assert_allclose(merged.astype(np.float64), packed(out), rtol=0, atol=2e-3)


def test_refusals_name_the_argument():
    out, lse = np.zeros((2, 5, 3, 4), np.float32), np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ValueError, match=r"lse_b: expected shape \[2, 3, 5\]"):
        merge_attention(out, lse, out, lse.transpose(0, 2, 1))
    with pytest.raises(ValueError, match="out_a, out_b: expected one shape"):
        merge_attention(out, lse, out[:, :4], lse)
    with pytest.raises(TypeError, match="out_b: expected a torch tensor, a CuPy or a NumPy array, got list"):
        merge_attention(out, lse, out.tolist(), lse)


def test_torch_tensors_with_autograd():
    torch = pytest.importorskip("torch")
    (out, lse), (out_a, lse_a), (out_b, lse_b) = split_case(4)
    leaves = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (out_a, lse_a, out_b, lse_b)]
    merged, merged_lse = merge_attention(*leaves)
    np.testing.assert_allclose(merged.detach().numpy(), out, rtol=0, atol=1e-5)
    merged.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in leaves)
    with pytest.raises(TypeError, match="one array library"):
        merge_attention(leaves[0], lse_a, leaves[2], lse_b)
