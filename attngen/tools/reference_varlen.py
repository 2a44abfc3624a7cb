"""The float64 reference of variable-length (packed) attention, FlashAttention's varlen layout (issue 14).

- q [total_q, heads_q, head_dim], k [total_k, heads_kv, head_dim], v [total_k, heads_kv, head_dim_v]: the
  sequences of a batch packed one after another, no padding.
- cu_seqlens_q, cu_seqlens_k: int [batch + 1], 0 first, non-decreasing, the last equal to total_q (total_k).
  Sequence b has queries cu_seqlens_q[b]:cu_seqlens_q[b + 1] and keys cu_seqlens_k[b]:cu_seqlens_k[b + 1];
  a sequence may have no queries or no keys.
- Each sequence is attention on its own (attention_reference with batch 1): causal aligned bottom-right per
  sequence; window (left, right) around each query's aligned position, -1 for no limit, right clipped to 0
  under causal (FlashAttention's window_size); softcap; alibi_slopes [heads_q] or [batch, heads_q].
- Returns out [total_q, heads_q, head_dim_v] and lse [heads_q, total_q] (FlashAttention's varlen LSE layout),
  float64. A query of a sequence without keys gets out 0 and lse -inf.

The kernels are checked against this on fresh inputs with ARCHITECTURE.md's criterion.
"""

from __future__ import annotations

import numpy as np

from ..masks import SlidingWindow
from .reference import attention_reference, attention_reference_backward

UNBOUNDED = 1 << 30


def check_cu_seqlens(cu_seqlens, total: int, name: str) -> np.ndarray:
    """cu_seqlens as int64 [batch + 1]; ValueError naming `name` unless it starts at 0, never decreases and
    ends at total (the packed tensor's rows)."""
    cu = np.asarray(cu_seqlens)
    if cu.ndim != 1 or cu.size < 2 or not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"{name}: expected an int array [batch + 1] (batch >= 1), got {cu.dtype} {list(cu.shape)}")
    cu = cu.astype(np.int64)
    if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] != total:
        raise ValueError(f"{name}: expected 0 first, non-decreasing, and {total} (the packed rows) last; "
                         f"got {cu[:4].tolist()}{'...' if cu.size > 4 else ''} ending {int(cu[-1])}")
    return cu


def window_visibility(window, causal: bool, seqlen_q: int, seqlen_k: int):
    """The window's visibility [1, sq, sk] for one sequence, or None (no window)."""
    if window is None:
        return None
    left, right = (UNBOUNDED if w == -1 else int(w) for w in window)
    pattern = SlidingWindow(left, 0 if causal else right)
    return pattern.element(0, np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :], seqlen_q, seqlen_k)[None]


def _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    for name, x, what in (("q", q, "total_q, heads_q, head_dim"), ("k", k, "total_k, heads_kv, head_dim"),
                          ("v", v, "total_k, heads_kv, head_dim_v")):
        if x.ndim != 3:
            raise ValueError(f"{name}: expected [{what}], got shape {list(x.shape)}")
    cu_q = check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    cu_k = check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if cu_q.size != cu_k.size:
        raise ValueError(f"cu_seqlens_q, cu_seqlens_k: batch {cu_q.size - 1} and {cu_k.size - 1} differ")
    return q, k, v, cu_q, cu_k


def sequence_slopes(alibi_slopes, b: int):
    if alibi_slopes is None:
        return None
    slopes = np.asarray(alibi_slopes, dtype=np.float64)
    return slopes if slopes.ndim == 1 else slopes[b]


def attention_varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False,
                               scale: float | None = None, window=None, softcap=None, alibi_slopes=None):
    """(out [total_q, heads_q, head_dim_v], lse [heads_q, total_q]) in float64 (module doc)."""
    q, k, v, cu_q, cu_k = _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k)
    heads_q = q.shape[1]
    out = np.zeros((q.shape[0], heads_q, v.shape[2]))
    lse = np.full((heads_q, q.shape[0]), -np.inf)
    for b in range(cu_q.size - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2], cu_k[b:b + 2]
        if q1 == q0 or k1 == k0:       # no queries, or queries that see no key: out 0, lse -inf
            continue
        o, l_ = attention_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, scale=scale,
                                    mask=window_visibility(window, causal, q1 - q0, k1 - k0), softcap=softcap,
                                    alibi_slopes=sequence_slopes(alibi_slopes, b))
        out[q0:q1], lse[:, q0:q1] = o[0], l_[0]
    return out, lse


def attention_varlen_reference_backward(q, k, v, dout, cu_seqlens_q, cu_seqlens_k, *, causal: bool = False,
                                        scale: float | None = None, window=None, softcap=None, alibi_slopes=None,
                                        algorithm_dtype: str | None = None, out=None):
    """float64 (dq, dk, dv) of attention_varlen_reference against dout [total_q, heads_q, head_dim_v]; the
    sequences' gradients are independent. algorithm_dtype / out: as attention_reference_backward's (the
    algorithm's same-dtype baseline, delta from the output the backward was given)."""
    q, k, v, cu_q, cu_k = _sequences(q, k, v, cu_seqlens_q, cu_seqlens_k)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != (q.shape[0], q.shape[1], v.shape[2]):
        raise ValueError(f"dout: expected the output's shape {[q.shape[0], q.shape[1], v.shape[2]]}, got {list(dout.shape)}")
    given = None if out is None else np.asarray(out, dtype=np.float64)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in range(cu_q.size - 1):
        (q0, q1), (k0, k1) = cu_q[b:b + 2], cu_k[b:b + 2]
        if q1 == q0 or k1 == k0:
            continue
        grads = attention_reference_backward(
            q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], dout[None, q0:q1], causal=causal, scale=scale,
            mask=window_visibility(window, causal, q1 - q0, k1 - k0), softcap=softcap,
            alibi_slopes=sequence_slopes(alibi_slopes, b), algorithm_dtype=algorithm_dtype,
            out=None if given is None else given[None, q0:q1])
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv
