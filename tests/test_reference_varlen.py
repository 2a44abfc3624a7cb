"""The float64 varlen reference (attngen.tools.reference_varlen) against the dense reference: equal lengths
are a batch; mixed lengths (0, 1, 17, 113 and one long) are each sequence on its own; the packing order does
not matter; bad cu_seqlens are refused naming the argument. No GPU."""

from __future__ import annotations

import numpy as np
import pytest

from attngen.tools.reference import attention_reference, attention_reference_backward
from attngen.tools.reference_varlen import (window_visibility, attention_varlen_reference,
                                            attention_varlen_reference_backward, check_cu_seqlens)


def packed(rng, lens_q, lens_k, hq=4, hkv=2, d=16, dv=8):
    q = rng.standard_normal((sum(lens_q), hq, d))
    k = rng.standard_normal((sum(lens_k), hkv, d))
    v = rng.standard_normal((sum(lens_k), hkv, dv))
    cu = lambda lens: np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


MODS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(5, 2)),
    "causal_window": dict(causal=True, window=(7, -1)),
    "softcap_alibi": dict(softcap=5.0, alibi_slopes=np.array([0.5, 0.25, 0.125, 0.0625])),
}


@pytest.mark.parametrize("mods", sorted(MODS))
def test_equal_lengths_are_a_dense_batch(mods):
    rng = np.random.default_rng(1)
    batch, sq, sk = 3, 13, 21                    # seqlen_q != seqlen_k in every sequence
    q, k, v, cu_q, cu_k = packed(rng, [sq] * batch, [sk] * batch)
    kw = MODS[mods]
    out, lse = attention_varlen_reference(q, k, v, cu_q, cu_k, **kw)
    window = kw.get("window")
    dense_kw = {key: value for key, value in kw.items() if key != "window"}
    mask = None if window is None else window_visibility(window, kw.get("causal", False), sq, sk)
    dense_q, dense_k, dense_v = (x.reshape(batch, -1, *x.shape[1:]) for x in (q, k, v))
    ref_out, ref_lse = attention_reference(dense_q, dense_k, dense_v, mask=mask, **dense_kw)
    np.testing.assert_allclose(out, ref_out.reshape(out.shape), rtol=0, atol=1e-12)
    np.testing.assert_allclose(lse, ref_lse.transpose(1, 0, 2).reshape(lse.shape), rtol=0, atol=1e-12)
    dout = rng.standard_normal(out.shape)
    grads = attention_varlen_reference_backward(q, k, v, dout, cu_q, cu_k, **kw)
    dense = attention_reference_backward(dense_q, dense_k, dense_v, dout.reshape(batch, sq, *dout.shape[1:]),
                                         mask=mask, **dense_kw)
    for mine, theirs in zip(grads, dense):
        np.testing.assert_allclose(mine, theirs.reshape(mine.shape), rtol=0, atol=1e-12)


def test_mixed_lengths_are_each_sequence_alone():
    rng = np.random.default_rng(2)
    lens_q, lens_k = [0, 1, 17, 113, 5, 300, 4], [3, 1, 17, 90, 0, 300, 9]
    q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k)
    out, lse = attention_varlen_reference(q, k, v, cu_q, cu_k, causal=True)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = attention_varlen_reference_backward(q, k, v, dout, cu_q, cu_k, causal=True)
    for b in range(len(lens_q)):
        (q0, q1), (k0, k1) = cu_q[b:b + 2], cu_k[b:b + 2]
        if q1 == q0:
            continue
        if k1 == k0:                              # queries that see no key: out 0, lse -inf, no gradient
            assert not out[q0:q1].any() and np.all(lse[:, q0:q1] == -np.inf) and not dq[q0:q1].any()
            continue
        o, l_ = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=True)
        np.testing.assert_allclose(out[q0:q1], o[0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(lse[:, q0:q1], l_[0], rtol=0, atol=1e-12)
        g = attention_reference_backward(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1],
                                         causal=True)
        for mine, theirs, rows in zip((dq, dk, dv), g, ((q0, q1), (k0, k1), (k0, k1))):
            np.testing.assert_allclose(mine[rows[0]:rows[1]], theirs[0], rtol=0, atol=1e-12)
    # keys of a sequence without queries get no gradient
    k0, k1 = cu_k[0:2]
    assert not dk[k0:k1].any() and not dv[k0:k1].any()


def test_packing_order_does_not_matter():
    rng = np.random.default_rng(3)
    lens_q, lens_k = [7, 30, 1], [9, 30, 12]
    q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k)
    out, lse = attention_varlen_reference(q, k, v, cu_q, cu_k, causal=True, window=(4, 0))
    order = [2, 0, 1]
    pick = lambda x, cu: np.concatenate([x[cu[b]:cu[b + 1]] for b in order])  # noqa: E731
    cu = lambda lens: np.concatenate([[0], np.cumsum([lens[b] for b in order])])  # noqa: E731
    out2, lse2 = attention_varlen_reference(pick(q, cu_q), pick(k, cu_k), pick(v, cu_k), cu(lens_q), cu(lens_k),
                                            causal=True, window=(4, 0))
    np.testing.assert_array_equal(out2, pick(out, cu_q))
    np.testing.assert_array_equal(lse2.T, pick(lse.T, cu_q))


@pytest.mark.parametrize("cu,message", [
    (np.array([0, 5, 3, 10]), "non-decreasing"),
    (np.array([1, 5, 10]), "0 first"),
    (np.array([0, 5, 9]), "10 \\(the packed rows\\) last"),
    (np.array([[0, 10]]), "expected an int array"),
    (np.array([0.0, 10.0]), "expected an int array"),
    (np.array([0]), "expected an int array"),
])
def test_bad_cu_seqlens_are_refused_by_name(cu, message):
    with pytest.raises(ValueError, match=f"cu_seqlens_q: .*{message}"):
        check_cu_seqlens(cu, 10, "cu_seqlens_q")
    rng = np.random.default_rng(4)
    q, k, v, _, cu_k = packed(rng, [10], [10])
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        attention_varlen_reference(q, k, v, cu, cu_k)


def test_batches_must_agree():
    rng = np.random.default_rng(5)
    q, k, v, cu_q, _ = packed(rng, [4, 6], [10])
    with pytest.raises(ValueError, match="batch 2 and 1 differ"):
        attention_varlen_reference(q, k, v, cu_q, np.array([0, 10]))
