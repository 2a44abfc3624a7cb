"""NumPy reference attention: the float64 ground truth the kernels are checked against.

Semantics (ARCHITECTURE.md, "Public contract"):

- q [batch, seqlen_q, heads_q, head_dim], k [batch, seqlen_k, heads_kv, head_dim],
  v [batch, seqlen_k, heads_kv, head_dim_v]; query head h reads kv head h // (heads_q // heads_kv).
- Default scale 1/sqrt(head_dim).
- Causal is aligned bottom-right: query i sees key j iff j <= i + seqlen_k - seqlen_q.
- An optional ``mask=`` (bool, broadcastable to [heads_q, seqlen_q, seqlen_k], or an
  attngen.masks.BlockMask) hides the pairs where it is False; it is ANDed with causal.
- Score modifiers (the naive references), applied to score = scale * q.k in this order:
  ``softcap`` (score -> softcap * tanh(score / softcap)), ``alibi_slopes`` ([heads_q] or
  [batch, heads_q]: score -= slope * |q_idx + seqlen_k - seqlen_q - kv_idx|), ``score_mod``
  (fn(score, b, h, q_idx, kv_idx), vectorised); ``mask_mod`` (fn(b, h, q_idx, kv_idx) -> bool) hides
  pairs like ``mask``.
- Returns (out [batch, seqlen_q, heads_q, head_dim_v], lse [batch, heads_q, seqlen_q]) as float64;
  lse is the natural log of the softmax denominator. A row that sees no key gives out 0 and lse -inf.

Three implementations share validation, the visibility rule and the guarded normalisation:
``attention_reference`` (naive, full score matrix), ``attention_same_dtype_reference`` (naive,
emulating a bf16/fp16 framework) and ``attention_tiled`` (FlashAttention's tiled online softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codegen.modifiers import reference_scores, standard_alibi_slopes

__all__ = [
    "attention_reference",
    "attention_reference_backward",
    "attention_same_dtype_reference",
    "attention_tiled",
    "acceptance_check",
    "acceptance_check_gradient",
    "alibi_slopes",
    "lse_check",
    "round_to_dtype",
    "round_to_e4m3",
    "attention_fp8_reference",
    "visibility_mask",
]

# Upper bound on the elements of one score block in the naive reference (32 MiB of float64;
# large enough for BLAS, small enough to stay out of page-fault-bound territory).
MAX_SCORE_ELEMENTS = 1 << 22

_LOW_PRECISION_DTYPES = ("fp16", "bf16")


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Dims:
    """Sizes of one attention problem, read off validated q, k, v."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    heads_q: int
    heads_kv: int
    head_dim: int
    head_dim_v: int

    @property
    def group(self) -> int:
        """Query heads per kv head (1: MHA, heads_q: MQA)."""
        return self.heads_q // self.heads_kv


def _as_float_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {arr.dtype}")
    return arr


def _check_rank4(arr: np.ndarray, name: str, layout: str) -> None:
    if arr.ndim != 4:
        raise ValueError(f"{name} must have shape {layout} (rank 4), got shape {arr.shape}")
    if 0 in arr.shape:
        raise ValueError(f"{name} must have no empty dimension, got shape {arr.shape}")


def _check_inputs(q, k, v) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Dims]:
    """Validate q, k, v shapes; return them as arrays with their sizes."""
    q = _as_float_array(q, "q")
    k = _as_float_array(k, "k")
    v = _as_float_array(v, "v")
    _check_rank4(q, "q", "[batch, seqlen_q, heads_q, head_dim]")
    _check_rank4(k, "k", "[batch, seqlen_k, heads_kv, head_dim]")
    _check_rank4(v, "v", "[batch, seqlen_k, heads_kv, head_dim_v]")
    batch, seqlen_q, heads_q, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k must have shape [batch={batch}, seqlen_k, heads_kv, head_dim={head_dim}] "
            f"matching q {q.shape}, got {k.shape}"
        )
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if v.shape[:3] != (batch, seqlen_k, heads_kv):
        raise ValueError(
            f"v must have shape [batch={batch}, seqlen_k={seqlen_k}, heads_kv={heads_kv}, head_dim_v] "
            f"matching k {k.shape}, got {v.shape}"
        )
    if heads_q % heads_kv != 0:
        raise ValueError(
            f"heads_q ({heads_q}, q.shape[2]) must be a multiple of heads_kv ({heads_kv}, k.shape[2])"
        )
    dims = _Dims(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, v.shape[3])
    return q, k, v, dims


def _resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: 1/sqrt(head_dim) by default; must be positive and finite."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    return scale


def _check_block(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- visibility


def _last_visible_key(row, seqlen_q: int, seqlen_k: int):
    """Index of the last key a query row may see under bottom-right causal alignment."""
    return row + (seqlen_k - seqlen_q)


def visibility_mask(q_start: int, q_stop: int, k_start: int, k_stop: int, *,
                    seqlen_q: int, seqlen_k: int, causal: bool) -> np.ndarray:
    """Boolean [q_stop - q_start, k_stop - k_start]: True where query row i may see key j."""
    rows = np.arange(q_start, q_stop)[:, None]
    cols = np.arange(k_start, k_stop)[None, :]
    if not causal:
        return np.ones((rows.size, cols.size), dtype=bool)
    return cols <= _last_visible_key(rows, seqlen_q, seqlen_k)


def _visible_key_stop(q_stop: int, *, seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """Exclusive end of the keys seen by any row before q_stop (key tiles past it are skipped)."""
    if not causal:
        return seqlen_k
    return int(min(max(_last_visible_key(q_stop - 1, seqlen_q, seqlen_k) + 1, 0), seqlen_k))


def _mask_regions(mask, dims: _Dims):
    """The user mask as regions(r0, r1, c0, c1) -> bool [heads_kv or 1, group or 1, r, c]; None if no mask.

    A BlockMask is evaluated one region at a time (never its whole [H, Sq, Sk] element mask).
    """
    if mask is None:
        return None
    from ..masks import BlockMask  # masks imports nothing from here; local to keep the module light

    target = (dims.heads_q, dims.seqlen_q, dims.seqlen_k)
    if isinstance(mask, BlockMask):
        if (mask.seqlen_q, mask.seqlen_k) != target[1:] or mask.num_heads not in (1, dims.heads_q):
            raise ValueError(f"mask (BlockMask) must have num_heads 1 or {dims.heads_q}, seqlen_q="
                             f"{dims.seqlen_q}, seqlen_k={dims.seqlen_k}, got {mask!r}")
        heads = mask.num_heads
        region = lambda r0, r1, c0, c1: mask.element_mask((r0, r1), (c0, c1))  # noqa: E731
    else:
        arr = np.asarray(mask)
        if arr.dtype != bool:
            raise TypeError(f"mask must be a bool array or a BlockMask, got dtype {arr.dtype}")
        if arr.ndim > 3 or any(n not in (1, t) for n, t in zip(arr.shape[::-1], target[::-1])):
            raise ValueError(f"mask must be broadcastable to [heads_q, seqlen_q, seqlen_k] = "
                             f"{list(target)}, got shape {arr.shape}")
        arr = arr.reshape((1,) * (3 - arr.ndim) + arr.shape)
        heads = arr.shape[0]
        arr = np.broadcast_to(arr, (heads,) + target[1:])
        region = lambda r0, r1, c0, c1: arr[:, r0:r1, c0:c1]  # noqa: E731

    def grouped(r0, r1, c0, c1):
        shape = (dims.heads_kv, dims.group) if heads > 1 else (1, 1)
        return region(r0, r1, c0, c1).reshape(shape + (r1 - r0, c1 - c0))

    return grouped


def _tile_fully_visible(q_start: int, k_stop: int, *, seqlen_q: int, seqlen_k: int,
                        causal: bool) -> bool:
    """True when every row from q_start on sees every key before k_stop (no mask needed)."""
    return not causal or k_stop - 1 <= _last_visible_key(q_start, seqlen_q, seqlen_k)


# ----------------------------------------------------------------------------- shared helpers


def _group_heads(q: np.ndarray, heads_kv: int) -> np.ndarray:
    """View q [b, s, heads_q, d] as [b, s, heads_kv, group, d]."""
    b, s, h, d = q.shape
    return q.reshape(b, s, heads_kv, h // heads_kv, d)


def _ungroup_out(out: np.ndarray) -> np.ndarray:
    """[b, heads_kv, group, s, dv] -> [b, s, heads_q, dv]."""
    b, hkv, g, s, dv = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, hkv * g, dv)


def _scores(q_rows: np.ndarray, k_cols: np.ndarray) -> np.ndarray:
    """Unscaled q.k for q [..., r, hkv, g, d] and k [..., c, hkv, d] -> [..., hkv, g, r, c]."""
    qt = np.moveaxis(q_rows, -4, -2)                    # [..., hkv, g, r, d]
    kt = np.moveaxis(k_cols, -3, -1)[..., :, None, :, :]  # [..., hkv, 1, d, c]
    return np.matmul(qt, kt)


def _apply_values(p: np.ndarray, v_cols: np.ndarray) -> np.ndarray:
    """p [..., hkv, g, r, c] @ v [..., c, hkv, dv] -> [..., hkv, g, r, dv]."""
    vt = np.moveaxis(v_cols, -3, -2)[..., :, None, :, :]  # [..., hkv, 1, c, dv]
    return np.matmul(p, vt)


def _masked(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Scores with invisible positions set to -inf."""
    return np.where(mask, scores, -np.inf)


def _finite_shift(row_max: np.ndarray) -> np.ndarray:
    """The softmax shift: the row max, or 0 for rows that see no key (keeps exp free of inf - inf)."""
    return np.where(np.isneginf(row_max), 0.0, row_max).astype(row_max.dtype)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den[..., None], and 0 for rows whose denominator is 0 (rows that see no key)."""
    den = den[..., None]
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, den.shape), num.dtype),
                     where=den > 0)


def _log_sum_exp(shift: np.ndarray, row_sum: np.ndarray, log, to_natural: float) -> np.ndarray:
    """(shift + log(row_sum)) * to_natural, and -inf where row_sum is 0."""
    logs = log(row_sum, out=np.full(row_sum.shape, -np.inf, row_sum.dtype), where=row_sum > 0)
    return (shift + logs) * to_natural


# ----------------------------------------------------------------------------- naive


@dataclass(frozen=True)
class ScoreMods:
    """The score modifiers of one reference call (module doc); all optional."""

    softcap: float | None = None
    alibi_slopes: np.ndarray | None = None      # [batch or 1, heads_q]
    score_mod: object = None
    mask_mod: object = None

    @classmethod
    def of(cls, dims: _Dims, softcap=None, alibi_slopes=None, score_mod=None, mask_mod=None):
        if softcap is not None and not (math.isfinite(float(softcap)) and float(softcap) > 0):
            raise ValueError(f"softcap must be a positive finite number or None, got {softcap}")
        if alibi_slopes is not None:
            alibi_slopes = np.asarray(alibi_slopes, dtype=np.float64)
            alibi_slopes = alibi_slopes[None] if alibi_slopes.ndim == 1 else alibi_slopes
            if alibi_slopes.ndim != 2 or alibi_slopes.shape[1] != dims.heads_q or \
                    alibi_slopes.shape[0] not in (1, dims.batch):
                raise ValueError(f"alibi_slopes must have shape [heads_q={dims.heads_q}] or [batch={dims.batch}, "
                                 f"heads_q], got {alibi_slopes.shape}")
        return cls(softcap, alibi_slopes, score_mod, mask_mod)

    def apply(self, s: np.ndarray, b: int, r0: int, dims: _Dims, score_mod_grad=None):
        """Modified scores [hkv, g, r, c] of rows r0.. of batch b (the chain of modifiers.py after the scale),
        the mask_mod's visibility (or None), and d(modified)/d(s) (or None for 1; score_mod_grad enters it)."""
        h = np.arange(dims.heads_q).reshape(dims.heads_kv, dims.group, 1, 1)
        q_idx = np.arange(r0, r0 + s.shape[-2])[:, None]
        kv_idx = np.arange(s.shape[-1])[None, :]
        values = {"softcap": self.softcap, "alibi_slopes": self.alibi_slopes, "score_mod": self.score_mod,
                  "score_mod_grad": score_mod_grad}
        dtype = s.dtype
        s, grad = reference_scores(np, s, values, (b, h, q_idx, kv_idx, dims.seqlen_q, dims.seqlen_k))
        s = np.asarray(s, dtype=dtype)
        grad = None if grad is None else np.asarray(grad, dtype=np.float64)
        visible = None
        if self.mask_mod is not None:
            visible = np.broadcast_to(np.asarray(self.mask_mod(b, h, q_idx, kv_idx), dtype=bool), s.shape)
        return s, visible, grad


alibi_slopes = standard_alibi_slopes     # ALiBi's default per-head slopes (modifiers.py defines them)


def _rows_per_chunk(dims: _Dims) -> int:
    return max(1, MAX_SCORE_ELEMENTS // (dims.heads_q * dims.seqlen_k))


def _naive_attention(q, k, v, *, causal, scale, compute_dtype, round_probs=None, mask=None, mods=None,
                     round_weights=None):
    """Naive attention in compute_dtype, per batch and per chunk of query rows.

    Normalises P before P @ V so ``round_probs`` (if given) sees the softmax output, as a
    framework running softmax then a low-precision matmul does. ``round_weights`` (instead) rounds the
    unnormalised exp(s - max) before P @ V and divides by the unrounded row sum, as a flash kernel does.
    """
    q, k, v, dims = _check_inputs(q, k, v)
    scale = np.asarray(_resolve_scale(scale, dims.head_dim), dtype=compute_dtype)
    regions = _mask_regions(mask, dims)
    mods = ScoreMods.of(dims, **(mods or {}))
    qg = _group_heads(q.astype(compute_dtype), dims.heads_kv)
    k = k.astype(compute_dtype)
    v = v.astype(compute_dtype)
    out = np.empty((dims.batch, dims.heads_kv, dims.group, dims.seqlen_q, dims.head_dim_v),
                   dtype=compute_dtype)
    lse = np.empty((dims.batch, dims.heads_kv, dims.group, dims.seqlen_q), dtype=compute_dtype)
    step = _rows_per_chunk(dims)
    for b in range(dims.batch):
        for r0 in range(0, dims.seqlen_q, step):
            r1 = min(r0 + step, dims.seqlen_q)
            visible = visibility_mask(r0, r1, 0, dims.seqlen_k, seqlen_q=dims.seqlen_q,
                                      seqlen_k=dims.seqlen_k, causal=causal)
            if regions is not None:
                visible = visible & regions(r0, r1, 0, dims.seqlen_k)
            s, mod_visible, _ = mods.apply(_scores(qg[b, r0:r1], k[b]) * scale, b, r0, dims)
            if mod_visible is not None:
                visible = visible & mod_visible
            s = _masked(s, visible)
            row_max = _finite_shift(s.max(axis=-1))
            p = np.exp(s - row_max[..., None])
            row_sum = p.sum(axis=-1)
            probs = _safe_divide(p if round_weights is None else round_weights(p), row_sum)
            if round_probs is not None:
                probs = round_probs(probs)
            out[b, ..., r0:r1, :] = _apply_values(probs, v[b])
            lse[b, ..., r0:r1] = _log_sum_exp(row_max, row_sum, np.log, 1.0)
    return _ungroup_out(out), lse.reshape(dims.batch, dims.heads_q, dims.seqlen_q)


def attention_reference(q, k, v, *, causal: bool = False, scale: float | None = None,
                        compute_dtype=np.float64, mask=None, **mods):
    """Naive attention (full score rows) computed in compute_dtype; returns float64 (out, lse).
    ``mods``: softcap, alibi_slopes, score_mod, mask_mod (module doc)."""
    out, lse = _naive_attention(q, k, v, causal=causal, scale=scale,
                                compute_dtype=np.dtype(compute_dtype), mask=mask, mods=mods)
    return out.astype(np.float64), lse.astype(np.float64)


def attention_reference_backward(q, k, v, dout, *, causal: bool = False, scale: float | None = None,
                                 mask=None, softcap=None, alibi_slopes=None, mask_mod=None, score_mod=None,
                                 score_mod_grad=None, algorithm_dtype: str | None = None, out=None):
    """float64 gradients (dq, dk, dv) of attention_reference's output against dout [b, sq, hq, dv]:
    with s = scale q.k (masked) and P = softmax(s): dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)),
    dQ = scale dS K, dK = scale dS^T Q; the query heads of a GQA group add into their kv head. Rows that
    see no key contribute nothing. With a softcap, dS is multiplied by d(softcap tanh(u/softcap))/du =
    1 - tanh^2(u/softcap) at u = scale q.k; ALiBi adds a constant; a score_mod multiplies dS by
    score_mod_grad(x, b, h, q_idx, kv_idx) at its input x; a mask_mod only hides pairs.
    algorithm_dtype ('fp16' | 'bf16'): FlashAttention's backward evaluated at its own rounding points in that
    dtype instead: delta from the stored (rounded) O, P and dS rounded before their matmuls, the gradients
    rounded; the rest exact. The same-dtype baseline of acceptance_check_gradient. `out` [b, sq, hq, dv]:
    the forward output the backward was given (delta = rowsum(dO * out), as the kernels compute it), so the
    forward's own rounding enters the baseline too; default: the exact O (rounded with algorithm_dtype)."""
    if score_mod is not None and score_mod_grad is None:
        raise ValueError("score_mod_grad: required with a score_mod (its derivative)")
    q, k, v, dims = _check_inputs(q, k, v)
    dout = np.asarray(dout, dtype=np.float64)
    if dout.shape != (dims.batch, dims.seqlen_q, dims.heads_q, dims.head_dim_v):
        raise ValueError(f"dout must have the output's shape {(dims.batch, dims.seqlen_q, dims.heads_q, dims.head_dim_v)}, "
                         f"got {dout.shape}")
    scale = _resolve_scale(scale, dims.head_dim)
    regions = _mask_regions(mask, dims)
    mods = ScoreMods.of(dims, softcap=softcap, alibi_slopes=alibi_slopes, score_mod=score_mod, mask_mod=mask_mod)
    rounded = (lambda x: x) if algorithm_dtype is None else (  # noqa: E731
        lambda x: round_to_dtype(x, algorithm_dtype).astype(np.float64))
    qg = _group_heads(q.astype(np.float64), dims.heads_kv)            # [b, s, hkv, g, d]
    dog = _group_heads(dout, dims.heads_kv)
    given_out = None if out is None else _group_heads(np.asarray(out, dtype=np.float64), dims.heads_kv)
    k, v = k.astype(np.float64), v.astype(np.float64)
    dq = np.zeros(qg.shape)
    dk, dv = np.zeros(k.shape), np.zeros(v.shape)
    step = _rows_per_chunk(dims)
    for b in range(dims.batch):
        for r0 in range(0, dims.seqlen_q, step):
            r1 = min(r0 + step, dims.seqlen_q)
            visible = visibility_mask(r0, r1, 0, dims.seqlen_k, seqlen_q=dims.seqlen_q, seqlen_k=dims.seqlen_k,
                                      causal=causal)
            if regions is not None:
                visible = visible & regions(r0, r1, 0, dims.seqlen_k)
            u = _scores(qg[b, r0:r1], k[b]) * scale                         # [hkv, g, r, c]
            s, mod_visible, mod_grad = mods.apply(u, b, r0, dims, score_mod_grad)   # the chain's derivative
            if mod_visible is not None:
                visible = visible & mod_visible
            s = _masked(s, visible)
            row_max = _finite_shift(s.max(axis=-1))
            p = np.exp(s - row_max[..., None])
            p = _safe_divide(p, p.sum(axis=-1))
            do = np.moveaxis(dog[b, r0:r1], 0, -2)                           # [hkv, g, r, dv]
            vt = np.moveaxis(v[b], 0, -2)[:, None]                           # [hkv, 1, c, dv]
            dp = do @ np.swapaxes(vt, -1, -2)                                # [hkv, g, r, c]
            o = rounded(p @ vt) if given_out is None else np.moveaxis(given_out[b, r0:r1], 0, -2)   # [hkv, g, r, dv]
            ds = p * (dp - (do * o).sum(axis=-1, keepdims=True))
            if mod_grad is not None:
                ds = ds * mod_grad
            ds, p = rounded(ds), rounded(p)
            kt = np.moveaxis(k[b], 0, -2)[:, None]                           # [hkv, 1, c, d]
            qt = np.moveaxis(qg[b, r0:r1], 0, -2)                            # [hkv, g, r, d]
            dq[b, r0:r1] += np.moveaxis(scale * ds @ kt, -2, 0)
            dk[b] += np.moveaxis(scale * (np.swapaxes(ds, -1, -2) @ qt).sum(axis=1), -2, 0)
            dv[b] += np.moveaxis((np.swapaxes(p, -1, -2) @ do).sum(axis=1), -2, 0)
    return rounded(dq.reshape(q.shape)), rounded(dk), rounded(dv)


# ----------------------------------------------------------------------------- same dtype


def _check_low_precision(dtype: str) -> str:
    if dtype not in _LOW_PRECISION_DTYPES:
        raise ValueError(f"dtype must be one of {_LOW_PRECISION_DTYPES}, got {dtype!r}")
    return dtype


def _round_bf16(x32: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest, ties to even) on the bit pattern; NaN stays NaN."""
    bits = x32.view(np.uint32)
    nan = np.isnan(x32)
    safe = np.where(nan, np.uint32(0), bits)  # keeps the uint32 addition below from wrapping
    bias = ((safe >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    rounded = (safe + bias) & np.uint32(0xFFFF0000)
    quiet_nan = (bits | np.uint32(0x00400000)) & np.uint32(0xFFFF0000)
    return np.where(nan, quiet_nan, rounded).view(np.float32)


def round_to_dtype(x, dtype: str) -> np.ndarray:
    """Round x to 'fp16' or 'bf16' and return the values as a float32 array.

    bf16 rounds via float32 first (as a float32 -> bf16 cast does).
    """
    dtype = _check_low_precision(dtype)
    x = np.asarray(x)
    with np.errstate(over="ignore"):  # out-of-range values become inf, as the hardware cast does
        if dtype == "fp16":
            return x.astype(np.float16).astype(np.float32)
        return _round_bf16(np.array(x, dtype=np.float32, order="C"))


E4M3_MAX, E4M3_MIN_NORMAL_EXP, E4M3_MANTISSA_BITS = 448.0, -6, 3


def round_to_e4m3(x) -> np.ndarray:
    """Round to float8 e4m3 (finite-only "fn": 4 exponent bits, bias 7, 3 mantissa bits, subnormals down to
    2^-9), to nearest with ties to even, saturating at +-448 as cvt.rn.satfinite does; float64 values."""
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    with np.errstate(divide="ignore"):
        exponent = np.maximum(np.floor(np.log2(np.where(a > 0, a, 1.0))), E4M3_MIN_NORMAL_EXP)
    step = np.exp2(exponent - E4M3_MANTISSA_BITS)
    return np.sign(x) * np.minimum(np.rint(a / step) * step, E4M3_MAX)


def attention_fp8_reference(q, k, v, *, causal: bool = False, scale: float | None = None, mask=None,
                            p_scale: float = 256.0, **mods):
    """The FP8 forward's algorithm at its rounding points (the acceptance criterion's baseline for e4m3
    inputs, as FlashAttention-3 tests its FP8 path): q, k, v are the dequantised values (e4m3 values times
    their descale factors); scores and softmax exact; the unnormalised weights exp(s - max) are rounded to
    e4m3 as p_scale * weight (the kernel packs P scaled into e4m3's range); output rounded to bf16.
    Returns float64 (out, lse)."""
    out, lse = _naive_attention(q, k, v, causal=causal, scale=scale, compute_dtype=np.dtype(np.float64), mask=mask,
                                mods=mods, round_weights=lambda p: round_to_e4m3(p * p_scale) / p_scale)
    return round_to_dtype(out, "bf16").astype(np.float64), lse


def attention_same_dtype_reference(q, k, v, *, causal: bool = False, scale: float | None = None,
                                   dtype: str, mask=None, **mods):
    """Naive attention as a bf16/fp16 framework computes it (the acceptance criterion's baseline).

    Inputs rounded to dtype; scores and softmax in float32; P rounded to dtype before P @ V
    (float32 accumulation); output rounded to dtype. Returns float64 (out, lse).
    """
    dtype = _check_low_precision(dtype)
    q, k, v, _ = _check_inputs(q, k, v)
    out, lse = _naive_attention(
        round_to_dtype(q, dtype), round_to_dtype(k, dtype), round_to_dtype(v, dtype),
        causal=causal, scale=scale, compute_dtype=np.dtype(np.float32),
        round_probs=lambda p: round_to_dtype(p, dtype), mask=mask, mods=mods,
    )
    return round_to_dtype(out, dtype).astype(np.float64), lse.astype(np.float64)


# ----------------------------------------------------------------------------- tiled


@dataclass
class _TileState:
    """Online-softmax state of one query tile: running max (raw score units), sum, accumulator."""

    row_max: np.ndarray  # [b, hkv, g, rows]
    row_sum: np.ndarray  # [b, hkv, g, rows]
    acc: np.ndarray      # [b, hkv, g, rows, dv]


def _online_softmax_step(state: _TileState, s: np.ndarray, v_tile: np.ndarray,
                         scale_log2: float) -> None:
    """Fold one key tile's raw scores s [b, hkv, g, rows, cols] into the state (base-2 exps)."""
    new_max = np.maximum(state.row_max, s.max(axis=-1))
    shift = _finite_shift(new_max)
    p = np.exp2(s * scale_log2 - (shift * scale_log2)[..., None])
    alpha = np.exp2((state.row_max - shift) * scale_log2)
    state.row_sum = alpha * state.row_sum + p.sum(axis=-1)
    state.acc = alpha[..., None] * state.acc + _apply_values(p, v_tile)
    state.row_max = new_max


def _attend_query_tile(q_tile, k, v, q_start, dims: _Dims, *, causal, block_n, scale_log2, regions):
    """Stream key tiles past one query tile; return (out [b, hkv, g, rows, dv], lse [b, hkv, g, rows])."""
    rows = q_tile.shape[1]
    q_stop = q_start + rows
    state = _TileState(
        row_max=np.full((dims.batch, dims.heads_kv, dims.group, rows), -np.inf),
        row_sum=np.zeros((dims.batch, dims.heads_kv, dims.group, rows)),
        acc=np.zeros((dims.batch, dims.heads_kv, dims.group, rows, dims.head_dim_v)),
    )
    geometry = dict(seqlen_q=dims.seqlen_q, seqlen_k=dims.seqlen_k, causal=causal)
    for k_start in range(0, _visible_key_stop(q_stop, **geometry), block_n):
        k_stop = min(k_start + block_n, dims.seqlen_k)
        visible = None
        if not _tile_fully_visible(q_start, k_stop, **geometry):
            visible = visibility_mask(q_start, q_stop, k_start, k_stop, **geometry)
        if regions is not None:
            region = regions(q_start, q_stop, k_start, k_stop)
            visible = region if visible is None else visible & region
            if not visible.any():
                continue  # no visible element: the kernel skips this key tile too
        s = _scores(q_tile, k[:, k_start:k_stop])
        if visible is not None:
            s = _masked(s, visible)
        _online_softmax_step(state, s, v[:, k_start:k_stop], scale_log2)
    shift = _finite_shift(state.row_max) * scale_log2
    lse = _log_sum_exp(shift, state.row_sum, np.log2, math.log(2.0))
    return _safe_divide(state.acc, state.row_sum), lse


def attention_tiled(q, k, v, *, causal: bool = False, scale: float | None = None,
                    block_m: int, block_n: int, mask=None):
    """FlashAttention (FA2 loop order) in float64: query tiles outer, key tiles streamed inner.

    Online softmax in base 2 with scale*log2(e) folded in; key tiles wholly above the causal
    diagonal, or with no element visible under ``mask``, are skipped; only tiles that need it
    are masked. Returns float64 (out, lse).
    """
    q, k, v, dims = _check_inputs(q, k, v)
    scale_log2 = _resolve_scale(scale, dims.head_dim) * math.log2(math.e)
    block_m = _check_block(block_m, "block_m")
    block_n = _check_block(block_n, "block_n")
    regions = _mask_regions(mask, dims)
    qg = _group_heads(q.astype(np.float64), dims.heads_kv)
    k = k.astype(np.float64)
    v = v.astype(np.float64)
    out = np.empty((dims.batch, dims.heads_kv, dims.group, dims.seqlen_q, dims.head_dim_v))
    lse = np.empty((dims.batch, dims.heads_kv, dims.group, dims.seqlen_q))
    for q_start in range(0, dims.seqlen_q, block_m):
        q_stop = min(q_start + block_m, dims.seqlen_q)
        out[..., q_start:q_stop, :], lse[..., q_start:q_stop] = _attend_query_tile(
            qg[:, q_start:q_stop], k, v, q_start, dims,
            causal=causal, block_n=block_n, scale_log2=scale_log2, regions=regions,
        )
    return _ungroup_out(out), lse.reshape(dims.batch, dims.heads_q, dims.seqlen_q)


# ----------------------------------------------------------------------------- checks


def _same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} must have the shape of {name_b} {b.shape}, got {a.shape}")


def acceptance_check_gradient(grad, framework_grad, algorithm_grad, ref64) -> tuple[bool, float, float]:
    """acceptance_check for a gradient, its same-dtype baseline the worse of the framework's autograd and
    FlashAttention's algorithm at its own rounding points (attention_reference_backward(algorithm_dtype=)).
    The algorithm's delta = rowsum(dO * O) uses the stored, rounded O where the framework's uses its own
    P: at head dims below 8 (no averaging over columns) that alone puts the exact algorithm past twice the
    framework's error for ~20 % of random inputs (d = 1; none at d = 64), so the framework alone is no bound
    there. Returns (ok, err, bound)."""
    algorithm_error = float(np.max(np.abs(np.asarray(algorithm_grad, dtype=np.float64) - np.asarray(ref64))))
    framework_error = float(np.max(np.abs(np.asarray(framework_grad, dtype=np.float64) - np.asarray(ref64))))
    baseline = algorithm_grad if algorithm_error > framework_error else framework_grad
    return acceptance_check(grad, baseline, ref64)


def acceptance_check(out, out_same_dtype, ref64) -> tuple[bool, float, float]:
    """FlashAttention's criterion: max|out - ref64| <= 2 * max|out_same_dtype - ref64| + 1e-5.

    Returns (ok, err, bound). Any NaN in out fails (err is then NaN).
    """
    out = np.asarray(out, dtype=np.float64)
    out_same_dtype = np.asarray(out_same_dtype, dtype=np.float64)
    ref64 = np.asarray(ref64, dtype=np.float64)
    _same_shape(out, ref64, "out", "ref64")
    _same_shape(out_same_dtype, ref64, "out_same_dtype", "ref64")
    with np.errstate(invalid="ignore"):
        err = float(np.max(np.abs(out - ref64)))
    bound = 2.0 * float(np.max(np.abs(out_same_dtype - ref64))) + 1e-5
    ok = bool(not np.isnan(out).any() and err <= bound)
    return ok, err, bound


def lse_check(lse, lse_ref, *, atol: float = 1e-4, rtol: float = 0.0) -> tuple[bool, float]:
    """Compare log-sum-exps: finite reference entries within atol + rtol*|ref|, -inf exactly where
    the reference is -inf. Returns (ok, max abs error over the finite reference entries)."""
    lse = np.asarray(lse, dtype=np.float64)
    lse_ref = np.asarray(lse_ref, dtype=np.float64)
    _same_shape(lse, lse_ref, "lse", "lse_ref")
    masked = np.isneginf(lse_ref)
    finite = ~masked
    with np.errstate(invalid="ignore"):
        diff = np.abs(lse[finite] - lse_ref[finite])
    err = float(diff.max()) if diff.size else 0.0
    within = bool(np.all(diff <= atol + rtol * np.abs(lse_ref[finite])))  # NaN compares False
    return bool(within and np.all(np.isneginf(lse[masked]))), err
