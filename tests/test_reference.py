"""CPU tests of the numpy references (attngen/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import no_float_warnings

from attngen.tools.reference import (
    acceptance_check,
    attention_reference,
    attention_same_dtype_reference,
    attention_tiled,
    lse_check,
    round_to_dtype,
    visibility_mask,
)

SEQLENS = (1, 17, 113, 203)
BLOCKS = ((16, 16), (64, 32), (128, 64))
# (heads_q, heads_kv, head_dim, head_dim_v): MHA, GQA 4:1, MQA; head_dim != head_dim_v in two.
HEAD_CONFIGS = ((2, 2, 16, 16), (4, 1, 16, 8), (8, 2, 8, 24))


def random_qkv(seed, *, batch=2, seqlen_q=17, seqlen_k=17, heads_q=2, heads_kv=2,
               head_dim=16, head_dim_v=None, dtype=np.float64):
    """Fresh standard-normal q, k, v."""
    rng = np.random.default_rng(seed)
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    q = rng.standard_normal((batch, seqlen_q, heads_q, head_dim))
    k = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim))
    v = rng.standard_normal((batch, seqlen_k, heads_kv, head_dim_v))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)




def loop_attention(q, k, v, *, causal, scale=None):
    """Per-element loops straight from the definition: the slowest, most obvious reference."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = np.zeros((batch, seqlen_q, heads_q, v.shape[3]))
    lse = np.full((batch, heads_q, seqlen_q), -np.inf)
    for b in range(batch):
        for h in range(heads_q):
            kvh = h // (heads_q // heads_kv)
            for i in range(seqlen_q):
                keys = [j for j in range(seqlen_k)
                        if not causal or j <= i + seqlen_k - seqlen_q]
                if not keys:
                    continue
                scores = [scale * sum(q[b, i, h, d] * k[b, j, kvh, d] for d in range(head_dim))
                          for j in keys]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for j, w in zip(keys, weights):
                    out[b, i, h] += (w / total) * v[b, j, kvh]
                lse[b, h, i] = top + math.log(total)
    return out, lse


def assert_lse_close(lse, lse_ref, atol):
    ok, err = lse_check(lse, lse_ref, atol=atol)
    assert ok, f"lse error {err}"


# ----------------------------------------------------------------------------- naive


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(5, 5), (3, 6), (6, 3), (1, 4)])
@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2), (3, 1)])
def test_naive_matches_loops(causal, seqlen_q, seqlen_k, heads_q, heads_kv):
    q, k, v = random_qkv(seqlen_q * 100 + seqlen_k * 10 + heads_q, batch=2, seqlen_q=seqlen_q,
                         seqlen_k=seqlen_k, heads_q=heads_q, heads_kv=heads_kv,
                         head_dim=4, head_dim_v=3)
    out, lse = attention_reference(q, k, v, causal=causal)
    out_ref, lse_ref = loop_attention(q, k, v, causal=causal)
    assert out.dtype == lse.dtype == np.float64
    assert out.shape == (2, seqlen_q, heads_q, 3) and lse.shape == (2, heads_q, seqlen_q)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-13)
    assert_lse_close(lse, lse_ref, atol=1e-13)


def test_naive_explicit_scale():
    q, k, v = random_qkv(1, seqlen_q=4, seqlen_k=6, head_dim=4)
    out, lse = attention_reference(q, k, v, causal=True, scale=0.3)
    out_ref, lse_ref = loop_attention(q, k, v, causal=True, scale=0.3)
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-13)
    assert_lse_close(lse, lse_ref, atol=1e-13)


def test_naive_row_chunking(monkeypatch):
    """Chunked rows (tiny score budget) give the same result as one block, to float64 rounding (BLAS may
    block a 5-row product differently from a 37-row one)."""
    import attngen.tools.reference as reference

    q, k, v = random_qkv(2, seqlen_q=37, seqlen_k=29, heads_q=4, heads_kv=2)
    whole = attention_reference(q, k, v, causal=True)
    monkeypatch.setattr(reference, "MAX_SCORE_ELEMENTS", 5 * 4 * 29)  # 5 rows per chunk
    chunked = attention_reference(q, k, v, causal=True)
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_naive_low_precision_inputs_and_compute(dtype):
    q, k, v = random_qkv(3, seqlen_q=9, seqlen_k=11, dtype=dtype)
    ref = attention_reference(q, k, v, causal=True)          # cast up to float64
    ref_loop = loop_attention(q.astype(np.float64), k.astype(np.float64),
                              v.astype(np.float64), causal=True)
    np.testing.assert_allclose(ref[0], ref_loop[0], rtol=0, atol=1e-13)
    low = attention_reference(q, k, v, causal=True, compute_dtype=dtype)
    assert low[0].dtype == np.float64
    tol = 1e-2 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(low[0], ref[0], rtol=0, atol=tol)
    assert_lse_close(low[1], ref[1], atol=tol)


# ----------------------------------------------------------------------------- tiled


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_m,block_n", BLOCKS)
@pytest.mark.parametrize("seqlen_k", SEQLENS)
@pytest.mark.parametrize("seqlen_q", SEQLENS)
def test_tiled_matches_naive(seqlen_q, seqlen_k, block_m, block_n, causal):
    index = SEQLENS.index(seqlen_q) * len(SEQLENS) + SEQLENS.index(seqlen_k)
    heads_q, heads_kv, head_dim, head_dim_v = HEAD_CONFIGS[index % len(HEAD_CONFIGS)]
    q, k, v = random_qkv(1000 + index * 7 + block_m + causal, batch=2, seqlen_q=seqlen_q,
                         seqlen_k=seqlen_k, heads_q=heads_q, heads_kv=heads_kv,
                         head_dim=head_dim, head_dim_v=head_dim_v)
    out_ref, lse_ref = attention_reference(q, k, v, causal=causal)
    out, lse = attention_tiled(q, k, v, causal=causal, block_m=block_m, block_n=block_n)
    assert out.shape == out_ref.shape and lse.shape == lse_ref.shape
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-12)
    assert_lse_close(lse, lse_ref, atol=1e-12)


@pytest.mark.parametrize("heads_q,heads_kv,head_dim,head_dim_v", HEAD_CONFIGS)
def test_tiled_head_configs(heads_q, heads_kv, head_dim, head_dim_v):
    """Every head configuration with both seqlen orders, causal, odd tiles."""
    for seed, (seqlen_q, seqlen_k) in enumerate([(113, 17), (17, 113), (50, 50)]):
        q, k, v = random_qkv(seed + heads_q, seqlen_q=seqlen_q, seqlen_k=seqlen_k,
                             heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim,
                             head_dim_v=head_dim_v)
        out_ref, lse_ref = attention_reference(q, k, v, causal=True, scale=0.2)
        out, lse = attention_tiled(q, k, v, causal=True, scale=0.2, block_m=24, block_n=40)
        np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-12)
        assert_lse_close(lse, lse_ref, atol=1e-12)


def test_gqa_equals_repeated_kv_heads():
    """GQA is MHA with each kv head repeated for its group of query heads."""
    q, k, v = random_qkv(4, seqlen_q=13, seqlen_k=19, heads_q=6, heads_kv=2)
    k_rep, v_rep = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    for fn in (attention_reference,
               lambda *a, **kw: attention_tiled(*a, **kw, block_m=8, block_n=8)):
        out, lse = fn(q, k, v, causal=True)
        out_rep, lse_rep = attention_reference(q, k_rep, v_rep, causal=True)
        np.testing.assert_allclose(out, out_rep, rtol=0, atol=1e-13)
        assert_lse_close(lse, lse_rep, atol=1e-13)


# ----------------------------------------------------------------------------- masking


def test_visibility_mask_bottom_right():
    mask = visibility_mask(0, 4, 0, 3, seqlen_q=4, seqlen_k=3, causal=True)
    expected = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    block = visibility_mask(2, 4, 1, 3, seqlen_q=4, seqlen_k=3, causal=True)
    np.testing.assert_array_equal(block, expected[2:4, 1:3])
    wide = visibility_mask(0, 2, 0, 4, seqlen_q=2, seqlen_k=4, causal=True)
    np.testing.assert_array_equal(wide, [[1, 1, 1, 0], [1, 1, 1, 1]])
    assert visibility_mask(0, 2, 0, 3, seqlen_q=5, seqlen_k=3, causal=False).all()


@pytest.mark.parametrize("block_m,block_n", [(1, 1), (4, 3), (64, 64)])
def test_fully_masked_rows_zero_and_neg_inf(block_m, block_n):
    seqlen_q, seqlen_k = 11, 4          # rows 0..6 see no key (j <= i - 7)
    q, k, v = random_qkv(5, seqlen_q=seqlen_q, seqlen_k=seqlen_k, heads_q=4, heads_kv=2)
    with no_float_warnings():
        results = [
            attention_reference(q, k, v, causal=True),
            attention_reference(q, k, v, causal=True, compute_dtype=np.float32),
            attention_reference(q.astype(np.float16), k.astype(np.float16),
                                v.astype(np.float16), causal=True, compute_dtype=np.float16),
            attention_tiled(q, k, v, causal=True, block_m=block_m, block_n=block_n),
            attention_same_dtype_reference(q, k, v, causal=True, dtype="bf16"),
            attention_same_dtype_reference(q, k, v, causal=True, dtype="fp16"),
        ]
    dead = seqlen_q - seqlen_k
    for out, lse in results:
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert np.all(out[:, :dead] == 0.0)
        assert np.all(np.isneginf(lse[..., :dead]))
        assert np.all(np.isfinite(lse[..., dead:]))
        assert np.all(np.abs(out[:, dead:]).max(axis=-1) > 0)


def test_no_warnings_on_ordinary_inputs():
    q, k, v = random_qkv(6, seqlen_q=40, seqlen_k=70, heads_q=4, heads_kv=1)
    with no_float_warnings():
        attention_reference(q, k, v, causal=True)
        attention_tiled(q, k, v, causal=True, block_m=16, block_n=32)
        attention_same_dtype_reference(q, k, v, causal=False, dtype="bf16")


def test_large_scores_do_not_overflow():
    q, k, v = random_qkv(7, seqlen_q=20, seqlen_k=30)
    q = q * 300.0                        # scaled scores in the hundreds
    with no_float_warnings():
        out_ref, lse_ref = attention_reference(q, k, v, causal=True)
        out, lse = attention_tiled(q, k, v, causal=True, block_m=8, block_n=8)
    assert np.all(np.isfinite(out_ref)) and lse_ref.max() > 100
    np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-11)
    assert_lse_close(lse, lse_ref, atol=1e-10)


# ----------------------------------------------------------------------------- same dtype


@pytest.mark.parametrize("dtype,low,high", [("bf16", 1e-4, 3e-2), ("fp16", 1e-5, 4e-3)])
@pytest.mark.parametrize("causal", [False, True])
def test_same_dtype_reference_error_is_real_and_bounded(dtype, low, high, causal):
    q, k, v = random_qkv(8 + causal, batch=2, seqlen_q=96, seqlen_k=128, heads_q=4,
                         heads_kv=2, head_dim=64)
    q, k, v = (round_to_dtype(x, dtype) for x in (q, k, v))   # the kernel's actual inputs
    out_ref, lse_ref = attention_reference(q, k, v, causal=causal)
    out, lse = attention_same_dtype_reference(q, k, v, causal=causal, dtype=dtype)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(round_to_dtype(out, dtype), out)  # representable in dtype
    err = np.abs(out - out_ref).max()
    assert low < err < high, err      # differs from ref64 (criterion not vacuous), but not by much
    assert_lse_close(lse, lse_ref, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_same_dtype_reference_matches_explicit_emulation(dtype):
    """One head written out step by step: fp32 scores/softmax, P rounded, output rounded."""
    q, k, v = random_qkv(17, batch=1, seqlen_q=32, seqlen_k=48, heads_q=1, heads_kv=1,
                         head_dim=32)
    q32, k32, v32 = (round_to_dtype(x, dtype)[0, :, 0] for x in (q, k, v))
    scores = (q32 @ k32.T) * np.float32(1 / math.sqrt(32))
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p = round_to_dtype(p / p.sum(axis=-1, keepdims=True), dtype)
    expected = round_to_dtype(p @ v32, dtype)
    out, _ = attention_same_dtype_reference(q, k, v, causal=False, dtype=dtype)
    # float32 summation order may flip a rare rounding; skipping the P rounding flips many.
    assert np.mean(out[0, :, 0] == expected) > 0.98


def test_same_dtype_reference_rounds_inputs():
    q, k, v = random_qkv(10, seqlen_q=8, seqlen_k=8)
    a = attention_same_dtype_reference(q, k, v, dtype="bf16")
    b = attention_same_dtype_reference(*(round_to_dtype(x, "bf16") for x in (q, k, v)),
                                       dtype="bf16")
    np.testing.assert_array_equal(a[0], b[0])


# ----------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("value,expected", [
    (1.0, 1.0),
    (1.00390625, 1.0),                    # 1 + 2^-8: tie, rounds to even (1.0)
    (1.01171875, 1.015625),               # 1 + 3*2^-8: tie, rounds to even (1 + 2^-6)
    (1.005, 1.0078125),                   # above the tie: up
    (1.0038, 1.0),                        # below the tie: down
    (-1.00390625, -1.0),
    (3.140625, 3.140625),                 # exactly representable
    (math.pi, 3.140625),
    (65504.0, 65536.0),
    (3.4028234663852886e38, math.inf),    # float32 max rounds past bf16 max
    (1e-40, 2.0 ** -133),                 # float32 subnormal 0x000116C2 -> 0x00010000
    (0.0, 0.0),
    (math.inf, math.inf),
    (-math.inf, -math.inf),
])
def test_bf16_rounding_known_values(value, expected):
    got = round_to_dtype(np.array([value]), "bf16")
    assert got.dtype == np.float32
    assert got[0] == np.float32(expected)


def test_bf16_rounding_nan_and_shape():
    x = np.array([[np.nan, 1.0], [-np.nan, 2.0]], dtype=np.float32)
    nan_payload = np.array([0x7F800001], dtype=np.uint32).view(np.float32)  # low-bit NaN
    got = round_to_dtype(x, "bf16")
    assert got.shape == (2, 2) and np.isnan(got[:, 0]).all()
    assert np.isnan(round_to_dtype(nan_payload, "bf16")).all()
    assert round_to_dtype(np.float64(1.00390625), "bf16").shape == ()


def test_bf16_rounding_agrees_with_mantissa_truncation_grid():
    """Every result has zero low 16 bits and is one of the two bf16 neighbours."""
    rng = np.random.default_rng(11)
    x = (rng.standard_normal(10_000) * 10.0 ** rng.integers(-30, 30, 10_000)).astype(np.float32)
    got = round_to_dtype(x, "bf16")
    bits = got.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    down = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    assert np.all((got == down) | (got == up))
    nearer = np.where(np.abs(x - down) <= np.abs(up - x), down, up)
    ties = np.abs(x - down) == np.abs(up - x)
    np.testing.assert_array_equal(got[~ties], nearer[~ties])


@pytest.mark.parametrize("value,expected", [
    (1.00048828125, 1.0),                 # 1 + 2^-11: tie, rounds to even
    (1.00146484375, 1.001953125),         # 1 + 3*2^-11: tie, rounds to even
    (65504.0, 65504.0),
    (65520.0, math.inf),
    (math.inf, math.inf),
])
def test_fp16_rounding_known_values(value, expected):
    got = round_to_dtype(np.array([value]), "fp16")
    assert got.dtype == np.float32 and got[0] == np.float32(expected)


# ----------------------------------------------------------------------------- acceptance


def _criterion_inputs(seed):
    q, k, v = random_qkv(seed, seqlen_q=64, seqlen_k=64, heads_q=2, heads_kv=2, head_dim=32)
    q, k, v = (round_to_dtype(x, "bf16") for x in (q, k, v))
    ref64, _ = attention_reference(q, k, v, causal=True)
    same, _ = attention_same_dtype_reference(q, k, v, causal=True, dtype="bf16")
    return ref64, same


def test_acceptance_accepts_good_outputs():
    ref64, same = _criterion_inputs(12)
    ok, err, bound = acceptance_check(same, same, ref64)
    assert ok and err < bound
    ok, err, bound = acceptance_check(round_to_dtype(ref64, "bf16"), same, ref64)
    assert ok and err > 0
    assert bound == pytest.approx(2 * np.abs(same - ref64).max() + 1e-5)


def test_acceptance_rejects_perturbed_output():
    ref64, same = _criterion_inputs(13)
    _, _, bound = acceptance_check(same, same, ref64)
    bad = same.copy()
    bad[1, 30, 1, 7] += 1.5 * bound
    ok, err, _ = acceptance_check(bad, same, ref64)
    assert not ok and err > bound


def test_acceptance_rejects_nan_and_inf():
    ref64, same = _criterion_inputs(14)
    for poison in (np.nan, np.inf):
        bad = same.copy()
        bad[0, 0, 0, 0] = poison
        with no_float_warnings():
            ok, _, _ = acceptance_check(bad, same, ref64)
        assert not ok


def test_acceptance_shape_mismatch():
    ref64, same = _criterion_inputs(15)
    with pytest.raises(ValueError, match="out"):
        acceptance_check(same[:, :-1], same, ref64)


def test_lse_check_requires_neg_inf_where_reference_has_it():
    ref = np.array([[-np.inf, 1.0, 2.0]])
    assert lse_check(ref.copy(), ref) == (True, 0.0)
    assert not lse_check(np.array([[0.0, 1.0, 2.0]]), ref)[0]
    assert not lse_check(np.array([[-np.inf, 1.1, 2.0]]), ref, atol=1e-3)[0]
    assert not lse_check(np.array([[-np.inf, np.nan, 2.0]]), ref)[0]
    assert not lse_check(np.array([[-np.inf, -np.inf, 2.0]]), ref)[0]


# ----------------------------------------------------------------------------- errors


def _shapes(**overrides):
    shapes = dict(q=(2, 5, 4, 8), k=(2, 6, 2, 8), v=(2, 6, 2, 8))
    shapes.update(overrides)
    rng = np.random.default_rng(16)
    return [rng.standard_normal(shapes[name]) for name in ("q", "k", "v")]


ALL_VARIANTS = [
    pytest.param(lambda q, k, v: attention_reference(q, k, v), id="naive"),
    pytest.param(lambda q, k, v: attention_tiled(q, k, v, block_m=4, block_n=4), id="tiled"),
    pytest.param(lambda q, k, v: attention_same_dtype_reference(q, k, v, dtype="fp16"),
                 id="same_dtype"),
]


@pytest.mark.parametrize("fn", ALL_VARIANTS)
@pytest.mark.parametrize("overrides,match", [
    (dict(q=(2, 5, 4)), r"q must have shape \[batch, seqlen_q, heads_q, head_dim\]"),
    (dict(k=(2, 6, 2, 8, 1)), r"k must have shape \[batch, seqlen_k, heads_kv, head_dim\]"),
    (dict(v=(6, 2, 8)), r"v must have shape \[batch, seqlen_k, heads_kv, head_dim_v\]"),
    (dict(k=(2, 6, 2, 16)), r"k must have shape .*head_dim=8"),
    (dict(k=(3, 6, 2, 8), v=(3, 6, 2, 8)), r"k must have shape \[batch=2"),
    (dict(v=(2, 7, 2, 8)), r"v must have shape .*seqlen_k=6"),
    (dict(v=(2, 6, 1, 8)), r"v must have shape .*heads_kv=2"),
    (dict(k=(2, 6, 3, 8), v=(2, 6, 3, 8)), r"heads_q \(4.*multiple of heads_kv \(3"),
    (dict(q=(2, 0, 4, 8)), r"q must have no empty dimension"),
])
def test_shape_errors_name_the_argument(fn, overrides, match):
    with pytest.raises(ValueError, match=match):
        fn(*_shapes(**overrides))


def test_option_errors():
    q, k, v = _shapes()
    with pytest.raises(ValueError, match="block_m"):
        attention_tiled(q, k, v, block_m=0, block_n=16)
    with pytest.raises(ValueError, match="block_n"):
        attention_tiled(q, k, v, block_m=16, block_n=2.5)
    with pytest.raises(ValueError, match="scale"):
        attention_reference(q, k, v, scale=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        attention_same_dtype_reference(q, k, v, dtype="fp32")
    with pytest.raises(ValueError, match="dtype"):
        round_to_dtype(q, "float16")
    with pytest.raises(TypeError, match="q must be a floating-point array"):
        attention_reference(q.astype(np.int32), k, v)


def test_algorithm_baseline_of_the_backward():
    """attention_reference_backward(algorithm_dtype=) rounds where FlashAttention's backward does (O for delta,
    P and dS before their matmuls, the gradients); acceptance_check_gradient bounds by the worse baseline. At
    head dim 1 the algorithm alone errs past twice the framework's error for some inputs (issue 12)."""
    from attngen.tools.reference import acceptance_check_gradient, attention_reference_backward, round_to_dtype

    rng = np.random.default_rng(12)
    q, k, v, dout = (rng.standard_normal(s) for s in ((2, 40, 2, 1), (2, 60, 2, 1), (2, 60, 2, 1), (2, 40, 2, 1)))
    q, k, v, dout = (round_to_dtype(x, "bf16").astype(np.float64) for x in (q, k, v, dout))
    exact = attention_reference_backward(q, k, v, dout, causal=True)
    algorithm = attention_reference_backward(q, k, v, dout, causal=True, algorithm_dtype="bf16")
    for e, a in zip(exact, algorithm):
        assert np.array_equal(a, round_to_dtype(a, "bf16"))               # every gradient is a bf16 value
        assert 0 < np.max(np.abs(a - e)) < 0.05 * max(1.0, np.max(np.abs(e)))
    # the worse baseline bounds: the algorithm's own result passes, a gradient off by 10 % fails
    ok, _, _ = acceptance_check_gradient(algorithm[0], exact[0], algorithm[0], exact[0])
    assert ok
    ok, _, _ = acceptance_check_gradient(exact[0] * 1.1, exact[0], algorithm[0], exact[0])
    assert not ok


def test_algorithm_baseline_takes_delta_from_the_given_output():
    """out=: delta = rowsum(dO * out) of the output the backward was given (the forward's rounding enters)."""
    from attngen.tools.reference import attention_reference, attention_reference_backward

    rng = np.random.default_rng(13)
    q, k, v, dout = (rng.standard_normal(s) for s in ((1, 9, 2, 7), (1, 11, 1, 7), (1, 11, 1, 7), (1, 9, 2, 7)))
    exact_out, _ = attention_reference(q, k, v, causal=True)
    exact = attention_reference_backward(q, k, v, dout, causal=True)
    given = attention_reference_backward(q, k, v, dout, causal=True, out=exact_out)
    for e, g in zip(exact, given):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-12)
    shifted = attention_reference_backward(q, k, v, dout, causal=True, out=exact_out + 1e-3)
    assert np.max(np.abs(shifted[0] - exact[0])) > 1e-5                   # dQ moves with delta
    np.testing.assert_allclose(shifted[2], exact[2], rtol=1e-12, atol=1e-12)   # dV does not depend on it
