"""CPU tests of the score modifiers and user expressions: spec validation (errors that point into the
expression), the references' modifier semantics, the variant each spec renders to."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen import Spec, SpecError
from attngen.tools.reference import alibi_slopes, attention_reference, attention_same_dtype_reference
from attngen.variant import variant_of

BIAS = {"bias": {"dtype": "float32", "shape": ["heads"]}}


# ---- spec fields ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "30", True, 1e400])
def test_softcap_rejected(bad):
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, softcap=bad)
    assert info.value.field == "softcap" and "positive finite" in str(info.value)


def test_softcap_alibi_accepted_and_named():
    s = Spec(head_dim=64, softcap=30, alibi=True)
    assert s.softcap == 30.0 and s.alibi is True
    assert s.name == "attn_d64_bf16_softcap30_alibi"
    with pytest.raises(SpecError, match="'alibi'"):
        Spec(head_dim=64, alibi="yes")


def test_expression_errors_point_into_the_expression():
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, score_mod="score + bais[h]", tensors=BIAS)
    err = info.value
    assert err.field == "score_mod"
    msg = str(err)
    assert 'score_mod(1): error: identifier "bais" is undefined' in msg
    lines = msg.splitlines()
    source_line = next(i for i, line in enumerate(lines) if "score + bais[h]" in line and "got" not in line)
    caret = lines[source_line + 1]
    assert caret.index("^") == lines[source_line].index("bais")         # the caret sits under the culprit


@pytest.mark.parametrize("field,expr,fragment", [
    ("mask_mod", "q_idx >= kv_idx; return true", "';' at column 16"),
    ("mask_mod", "{ true }", "'{'"),
    ("score_mod", "score #define", "'#'"),
    ("score_mod", 'score + "x"', "'\"'"),
    ("score_mod", "asm(\"trap;\")", "asm"),
    ("score_mod", "", "CUDA expression"),
    ("score_mod", 3, "CUDA expression"),
    ("mask_mod", "q_idx >= kv_idx &&", "NVRTC says"),
    ("mask_mod", "score > 0", 'identifier "score" is undefined'),       # no score in a mask_mod
    ("score_mod", "q_idx >= kv_idx ? score : bias", "NVRTC says"),       # bias is not declared
])
def test_bad_expressions_name_the_field(field, expr, fragment):
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, **{field: expr})
    assert info.value.field == field and fragment in str(info.value)


@pytest.mark.parametrize("tensors,field", [
    ({"h": {"dtype": "float32", "shape": ["heads"]}}, "tensors"),                  # reserved name
    ({"1x": {"dtype": "float32", "shape": ["heads"]}}, "tensors"),
    ({"w": {"dtype": "float64", "shape": ["heads"]}}, "tensors.w.dtype"),
    ({"w": {"dtype": "float32", "shape": ["rows"]}}, "tensors.w.shape"),
    ({"w": {"dtype": "float32", "shape": []}}, "tensors.w.shape"),
    ({"w": {"dtype": "float32"}}, "tensors.w"),
    ({"w": {"dtype": "float32", "shape": ["heads"], "stride": 1}}, "tensors.w"),
    ({}, "tensors"),
])
def test_bad_tensor_declarations(tensors, field):
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, score_mod="score", tensors=tensors)
    assert info.value.field == field


def test_tensors_need_an_expression_and_round_trip_through_yaml(tmp_path):
    with pytest.raises(SpecError, match="'tensors'"):
        Spec(head_dim=64, tensors=BIAS)
    path = tmp_path / "spec.yaml"
    path.write_text("head_dim: 64\nscore_mod: 'score + bias[h] * (q_idx - kv_idx)'\n"
                    "mask_mod: 'kv_idx <= q_idx'\ntensors: {bias: {dtype: float32, shape: [heads]}}\n")
    spec = Spec.from_yaml(path)
    assert Spec.from_dict(spec.to_dict()) == spec
    assert spec.name != Spec(head_dim=64, score_mod="score + bias[h] * (kv_idx - q_idx)", mask_mod="kv_idx <= q_idx",
                             tensors=BIAS).name


def test_variants():
    assert variant_of(Spec(head_dim=64)).schedule == "dense"
    v = variant_of(Spec(head_dim=64, mask={"kind": "runtime"}, mask_mod="kv_idx % 2 == 0"))
    # a runtime BlockMask says which blocks are full: those skip the mask_mod (as in FlexAttention)
    assert v.schedule == "runtime" and not v.predicate_everywhere and v.partial_tiles_need_predicate
    assert v.predicate_cost == 1
    assert not variant_of(Spec(head_dim=64, mask={"kind": "runtime"})).partial_tiles_need_predicate
    v = variant_of(Spec(head_dim=64, mask={"kind": "bigbird", "window": 3, "random_blocks": 1}, softcap=5.0))
    assert v.schedule == "pattern" and v.block_table and v.score_mods
    assert not variant_of(Spec(head_dim=64, mask={"kind": "bigbird", "window": 3})).block_table
    random_64 = {"kind": "bigbird", "window": 3, "random_blocks": 1, "block_size": 64}
    with pytest.raises(SpecError, match="mask.block_size"):       # the table's blocks must be the mask's
        Spec(head_dim=64, mask={"kind": "and", "of": [{"kind": "causal"}, random_64]})
    assert Spec(head_dim=64, mask={"kind": "and", "of": [{"kind": "causal"}, random_64], "block_size": 64})


# ---- reference semantics ----------------------------------------------------------------------------

def loops_reference(q, k, v, scale, softcap=None, slopes=None, score_mod=None, mask_mod=None):
    """Straight from the definitions, one (batch, head, row) at a time."""
    b_, sq, hq, _ = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b_, sq, hq, v.shape[3]))
    lse = np.full((b_, hq, sq), -np.inf)
    for b in range(b_):
        for h in range(hq):
            kh = h // (hq // hkv)
            for i in range(sq):
                s = (k[b, :, kh] @ q[b, i, h]) * scale
                if softcap:
                    s = softcap * np.tanh(s / softcap)
                if slopes is not None:
                    s = s - slopes[b % slopes.shape[0], h] * np.abs(i + sk - sq - np.arange(sk))
                if score_mod:
                    s = np.array([score_mod(s[j], b, h, i, j) for j in range(sk)])
                if mask_mod:
                    s = np.where([mask_mod(b, h, i, j) for j in range(sk)], s, -np.inf)
                if np.isneginf(s).all():
                    continue
                p = np.exp(s - s.max())
                out[b, i, h] = p @ v[b, :, kh] / p.sum()
                lse[b, h, i] = s.max() + np.log(p.sum())
    return out, lse


def test_reference_modifiers_match_loops():
    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 9, 4, 8)), rng.normal(size=(2, 13, 2, 8)), rng.normal(size=(2, 13, 2, 8))
    slopes = rng.uniform(0.1, 1, (2, 4))
    gain = rng.uniform(0.5, 2, 4)
    mods = dict(softcap=1.5, alibi_slopes=slopes,
                score_mod=lambda s, b, h, qi, kj: s * gain[np.asarray(h)] + 0.1 * (qi - kj),
                mask_mod=lambda b, h, qi, kj: (np.asarray(qi) + np.asarray(kj) + b) % 3 != 0)
    out, lse = attention_reference(q, k, v, scale=0.7, **mods)
    want, want_lse = loops_reference(q, k, v, 0.7, softcap=1.5, slopes=slopes, score_mod=mods["score_mod"],
                                     mask_mod=mods["mask_mod"])
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)
    same, _ = attention_same_dtype_reference(q, k, v, scale=0.7, dtype="bf16", **mods)
    assert np.max(np.abs(same - want)) < 0.05


def test_reference_mask_mod_rows_that_see_nothing():
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(1, 5, 1, 8)), rng.normal(size=(1, 6, 1, 8)), rng.normal(size=(1, 6, 1, 8))
    out, lse = attention_reference(q, k, v, mask_mod=lambda b, h, qi, kj: np.asarray(qi) % 2 == 0 + 0 * kj)
    assert np.all(out[0, 1::2] == 0) and np.all(np.isneginf(lse[0, 0, 1::2])) and np.isfinite(lse[0, 0, ::2]).all()


def test_alibi_default_slopes():
    np.testing.assert_allclose(alibi_slopes(8), [2 ** (-i) for i in range(1, 9)])
    s12 = alibi_slopes(12)           # 8 from 2^(-8i/8), then every other of 2^(-8i/16)
    np.testing.assert_allclose(s12[:8], alibi_slopes(8))
    np.testing.assert_allclose(s12[8:], [2 ** (-0.5 * i) for i in (1, 3, 5, 7)])
    assert alibi_slopes(1).tolist() == [2 ** -8]


def test_reference_rejects_bad_modifiers():
    q = np.zeros((1, 2, 3, 8))
    with pytest.raises(ValueError, match="alibi_slopes"):
        attention_reference(q, q, q, alibi_slopes=np.ones(2))
    with pytest.raises(ValueError, match="softcap"):
        attention_reference(q, q, q, softcap=-1.0)
    assert math.isfinite(attention_reference(q, q, q, softcap=2.0)[1].max())
    assert attngen.Spec(head_dim=8, softcap=2.0).softcap == 2.0


class CupyLike:
    """What spec_for_inputs reads of a CuPy array (shape, strides, dtype), without a GPU."""

    __module__ = "cupy._core.core"

    def __init__(self, shape):
        import types

        self.shape, self.dtype = shape, np.dtype("float16")
        self.strides = tuple(int(np.prod(shape[i + 1:])) * 2 for i in range(len(shape)))
        self.data, self.device = types.SimpleNamespace(ptr=0), types.SimpleNamespace(id=0)


def test_attention_keywords_make_specs():
    from attngen.api import UNBOUNDED_WINDOW, spec_for_inputs

    x = CupyLike((1, 4, 2, 64))
    spec = spec_for_inputs(x, x, x, True, window=(8, 4), softcap=5.0, alibi=True)
    assert spec.mask == {"kind": "sliding_window", "left": 8, "right": 0} and not spec.causal
    assert spec.softcap == 5.0 and spec.alibi and spec.dtype == "fp16"
    assert spec_for_inputs(x, x, x, False, window=(-1, 3)).mask["left"] == UNBOUNDED_WINDOW
    with pytest.raises(ValueError, match="window"):
        spec_for_inputs(x, x, x, False, window=(1.5, 2))
