"""Spec validation: every field, every error path, YAML loading (CPU only)."""

import dataclasses
import math
import re

import pytest

import attngen
from attngen import Spec, SpecError
from attngen.spec import TileOverride


def _raises(field, **kwargs):
    """Build a Spec that must fail; check the error names the field and carries a readable message."""
    with pytest.raises(SpecError) as info:
        Spec(**kwargs)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    msg = str(err)
    assert f"'{field}'" in msg
    assert "allowed:" in msg
    return err


# ---- head_dim / head_dim_v ------------------------------------------------------------------------

def test_head_dim_missing_keyword():
    with pytest.raises(TypeError, match="head_dim"):
        Spec()


def test_head_dim_is_keyword_only():
    with pytest.raises(TypeError):
        Spec(64)


_BAD_DIMS = [0, -8, -1, 257, 264, 512, "64", 64.0, True, False, [64]]   # 1..256 all fit (tests/test_head_dims.py)


@pytest.mark.parametrize("field,bad", [("head_dim", b) for b in _BAD_DIMS + [None]]
                         + [("head_dim_v", b) for b in _BAD_DIMS])
def test_head_dim_rejected(field, bad):
    kwargs = {"head_dim": 64, field: bad}
    err = _raises(field, **kwargs)
    assert err.value is bad or err.value == bad
    msg = str(err)
    assert repr(bad) in msg
    assert "1..256" in msg


@pytest.mark.parametrize("d", list(range(8, 257, 8)))
def test_head_dim_accepted(d):
    s = Spec(head_dim=d)
    assert s.head_dim == d
    assert s.head_dim_v == d and not hasattr(s, "dv")   # dv names only the gradient of V
    assert s.softmax_scale == pytest.approx(1.0 / math.sqrt(d))


def test_head_dim_v_explicit():
    s = Spec(head_dim=64, head_dim_v=128)
    assert (s.head_dim, s.head_dim_v) == (64, 128)
    # the default equals an explicit head_dim_v == head_dim
    assert Spec(head_dim=64) == Spec(head_dim=64, head_dim_v=64)


def test_head_dim_v_error_mentions_value():
    err = _raises("head_dim_v", head_dim=64, head_dim_v=300)
    assert "300" in str(err)


# ---- dtype / causal -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_dtype_accepted(dtype):
    s = Spec(head_dim=64, dtype=dtype)
    assert s.dtype == dtype
    assert s.elem_bytes == 2


@pytest.mark.parametrize("bad", ["fp32", "float16", "FP16", "bfloat16", "", None, 16])
def test_dtype_rejected(bad):
    err = _raises("dtype", head_dim=64, dtype=bad)
    msg = str(err)
    assert "fp16" in msg and "bf16" in msg
    assert repr(bad) in msg


def test_dtype_default():
    assert Spec(head_dim=64).dtype == "bf16"


@pytest.mark.parametrize("bad", ["yes", "true", 1, 0, None, 1.0])
def test_causal_rejected(bad):
    err = _raises("causal", head_dim=64, causal=bad)
    assert "true or false" in str(err)
    assert repr(bad) in str(err)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_accepted(causal):
    assert Spec(head_dim=64, causal=causal).causal is causal


# ---- heads ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["num_heads", "num_kv_heads"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, "8", True])
def test_heads_rejected(field, bad):
    kwargs = {"head_dim": 64, "num_heads": 8, field: bad}
    err = _raises(field, **kwargs)
    assert "positive int" in str(err)


@pytest.mark.parametrize("nh,nkv", [(8, 8), (8, 4), (8, 2), (8, 1), (12, 3), (1, 1), (32, None)])
def test_heads_accepted(nh, nkv):
    s = Spec(head_dim=64, num_heads=nh, num_kv_heads=nkv)
    assert (s.num_heads, s.num_kv_heads) == (nh, nkv)


@pytest.mark.parametrize("nh,nkv", [(8, 3), (12, 5), (4, 8), (6, 4)])
def test_num_kv_heads_must_divide(nh, nkv):
    err = _raises("num_kv_heads", head_dim=64, num_heads=nh, num_kv_heads=nkv)
    assert f"num_heads={nh}" in str(err)
    assert "divisor" in str(err)


def test_num_kv_heads_without_num_heads():
    err = _raises("num_heads", head_dim=64, num_kv_heads=4)
    assert "num_kv_heads" in str(err)


# ---- scale ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, math.inf, -math.inf, math.nan, "x", "0.1", True, False, [1.0]])
def test_scale_rejected(bad):
    err = _raises("scale", head_dim=64, scale=bad)
    assert "positive finite" in str(err)


@pytest.mark.parametrize("good,expected", [(1, 1.0), (2, 2.0), (0.125, 0.125), (1e-3, 1e-3)])
def test_scale_accepted(good, expected):
    s = Spec(head_dim=64, scale=good)
    assert type(s.scale) is float
    assert s.scale == expected
    assert s.softmax_scale == expected


def test_scale_huge_int_is_spec_error():
    _raises("scale", head_dim=64, scale=10 ** 400)


@pytest.mark.parametrize("d", [8, 64, 96, 128, 256])
def test_softmax_scale_default(d):
    s = Spec(head_dim=d)
    assert s.scale is None
    assert s.softmax_scale == pytest.approx(1.0 / math.sqrt(d), rel=1e-15)


def test_softmax_scale_uses_head_dim_not_head_dim_v():
    s = Spec(head_dim=64, head_dim_v=256)
    assert s.softmax_scale == pytest.approx(1.0 / 8.0)


# ---- tile override --------------------------------------------------------------------------------

GOOD_TILE = {"block_m": 128, "block_n": 64, "warps": 4, "stages": 2}


def test_tile_accepted():
    s = Spec(head_dim=64, tile=dict(GOOD_TILE))
    assert s.tile == TileOverride(128, 64, 4, 2)


def test_tile_stages_default():
    s = Spec(head_dim=64, tile={"block_m": 64, "block_n": 32, "warps": 4})
    assert s.tile == TileOverride(64, 32, 4, 2)


@pytest.mark.parametrize("bad", [[128, 64, 4, 2], "128x64", 128, (128, 64, 4)])
def test_tile_not_mapping(bad):
    err = _raises("tile", head_dim=64, tile=bad)
    msg = str(err)
    for key in ("block_m", "block_n", "warps", "stages"):
        assert key in msg


def test_tile_unknown_key():
    err = _raises("tile.block_k", head_dim=64, tile=dict(GOOD_TILE, block_k=32))
    assert "tile.block_k" in str(err)
    assert "block_m" in str(err)


@pytest.mark.parametrize("missing", ["block_m", "block_n", "warps"])
def test_tile_missing_key(missing):
    tile = {k: v for k, v in GOOD_TILE.items() if k != missing}
    err = _raises(f"tile.{missing}", head_dim=64, tile=tile)
    assert "required" in str(err)


@pytest.mark.parametrize("key,bad,allowed", [
    ("block_m", 8, "16..256"),
    ("block_m", 24, "multiple of 16"),
    ("block_m", 512, "16..256"),
    ("block_m", 0, "16..256"),
    ("block_n", 24, "multiple of 16"),
    ("block_n", 8, "16..256"),
    ("block_n", 272, "16..256"),
    ("warps", 0, "1..16"),
    ("warps", 17, "1..16"),
    ("stages", 5, "2..4"),
    ("stages", 1, "2..4"),
    ("block_m", 64.0, "16..256"),
    ("block_n", "64", "16..256"),
    ("warps", True, "1..16"),
    ("stages", None, "2..4"),
])
def test_tile_value_out_of_range(key, bad, allowed):
    err = _raises(f"tile.{key}", head_dim=64, tile=dict(GOOD_TILE, **{key: bad}))
    msg = str(err)
    assert f"'tile.{key}'" in msg
    assert repr(bad) in msg
    assert allowed in msg


def test_tile_override_instance_is_validated():
    with pytest.raises(SpecError):
        Spec(head_dim=64, tile=TileOverride(8, 24, 0, 5))


# ---- name -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["1abc", "a-b", "a b", "", "x" * 65, "x" * 70, "näme", "a.b", 12, b"abc"])
def test_name_rejected(bad):
    err = _raises("name", head_dim=64, name=bad)
    assert "identifier" in str(err)


@pytest.mark.parametrize("good", ["a", "_", "gpt2_causal", "A1_b2", "x" * 64])
def test_name_accepted(good):
    assert Spec(head_dim=64, name=good).name == good
    assert Spec(head_dim=64, name=good).name == good


def test_default_name_is_identifier_and_distinct():
    variants = [
        dict(head_dim=64),
        dict(head_dim=64, causal=True),
        dict(head_dim=64, dtype="fp16"),
        dict(head_dim=64, dtype="fp16", causal=True),
        dict(head_dim=128),
        dict(head_dim=64, head_dim_v=128),
        dict(head_dim=64, num_heads=8),
        dict(head_dim=64, num_heads=8, num_kv_heads=2),
        dict(head_dim=64, num_heads=16),
    ]
    names = [Spec(**v).name for v in variants]
    assert len(set(names)) == len(names), names
    for n in names:
        assert n.isidentifier() and len(n) <= 64
        # a default name is itself an accepted explicit name
        Spec(head_dim=64, name=n)


def test_default_name_deterministic():
    assert Spec(head_dim=96, causal=True).name == Spec(head_dim=96, causal=True).name


def test_default_name_longest_fields_is_valid():
    s = Spec(head_dim=256, head_dim_v=248, dtype="fp16", causal=True, num_heads=10 ** 6, num_kv_heads=10 ** 6)
    assert s.name.isidentifier() and len(s.name) <= 64


# ---- frozen / hashable ----------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("head_dim", 128), ("causal", True), ("dtype", "fp16"), ("name", "x")])
def test_spec_is_frozen(field, value):
    s = Spec(head_dim=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(s, field, value)


def test_tile_override_is_frozen():
    t = Spec(head_dim=64, tile=dict(GOOD_TILE)).tile
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.block_m = 64


def test_spec_hashable_and_equal():
    a = Spec(head_dim=64, causal=True, tile=dict(GOOD_TILE), num_heads=8, num_kv_heads=2, scale=1)
    b = Spec(head_dim=64, causal=True, tile=dict(GOOD_TILE), num_heads=8, num_kv_heads=2, scale=1.0)
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    c = Spec(head_dim=64, causal=False, tile=dict(GOOD_TILE), num_heads=8, num_kv_heads=2, scale=1)
    assert a != c
    assert {a: 1}[b] == 1


# ---- from_dict ------------------------------------------------------------------------------------

def test_from_dict_valid():
    s = Spec.from_dict({"head_dim": 64, "dtype": "fp16", "causal": True, "tile": dict(GOOD_TILE)})
    assert s == Spec(head_dim=64, dtype="fp16", causal=True, tile=dict(GOOD_TILE))


def test_from_dict_roundtrip_to_dict():
    s = Spec(head_dim=64, head_dim_v=128, causal=True, num_heads=8, num_kv_heads=4, scale=0.5,
             tile=dict(GOOD_TILE), name="rt")
    assert Spec.from_dict(s.to_dict()) == s


def test_from_dict_unknown_key():
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"head_dim": 64, "heads": 8})
    assert info.value.field == "heads"
    assert "'heads'" in str(info.value)
    assert "head_dim" in str(info.value)  # lists the known keys


def test_from_dict_missing_head_dim():
    with pytest.raises(SpecError) as info:
        Spec.from_dict({"dtype": "bf16"})
    assert info.value.field == "head_dim"
    assert "required" in str(info.value)


@pytest.mark.parametrize("bad", [[1, 2], "head_dim: 64", 64, None, (("head_dim", 64),)])
def test_from_dict_not_mapping(bad):
    with pytest.raises(SpecError) as info:
        Spec.from_dict(bad)
    assert info.value.field == "<spec>"
    assert "mapping" in str(info.value)


# ---- from_yaml ------------------------------------------------------------------------------------

def test_from_yaml_valid(tmp_path):
    p = tmp_path / "good.yaml"
    p.write_text(
        "name: gpt2_causal\n"
        "head_dim: 64\n"
        "dtype: bf16\n"
        "causal: true\n"
        "num_heads: 12\n"
        "num_kv_heads: 12\n"
        "scale: null\n"
        "tile: {block_m: 128, block_n: 64, warps: 4, stages: 2}\n"
    )
    s = Spec.from_yaml(p)
    assert s == Spec(name="gpt2_causal", head_dim=64, dtype="bf16", causal=True, num_heads=12,
                     num_kv_heads=12, tile=dict(GOOD_TILE))
    assert Spec.from_yaml(str(p)) == s


def test_from_yaml_roundtrip(tmp_path):
    import yaml

    s = Spec(head_dim=96, head_dim_v=64, dtype="fp16", causal=True, num_heads=16, num_kv_heads=4, scale=0.25,
             tile={"block_m": 64, "block_n": 32, "warps": 4, "stages": 3})
    p = tmp_path / "rt.yaml"
    p.write_text(yaml.safe_dump(s.to_dict()))
    assert Spec.from_yaml(p) == s


def yaml_spec_error(tmp_path, text):
    """Spec.from_yaml on a file holding `text` must raise SpecError; returns pytest's ExceptionInfo."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        Spec.from_yaml(path)
    return info


def test_from_yaml_unknown_key(tmp_path):
    info = yaml_spec_error(tmp_path, "head_dim: 64\nblock_size: 128\n")
    assert info.value.field == "block_size"


def test_from_yaml_bad_value(tmp_path):
    info = yaml_spec_error(tmp_path, "head_dim: 600\n")
    assert info.value.field == "head_dim"
    assert "600" in str(info.value)


@pytest.mark.parametrize("text", ["head_dim: [64\n", "head_dim: 64\n  dtype: : bf16\n", "{a: 1\n", "a: 'x\n"])
def test_from_yaml_invalid_yaml(tmp_path, text):
    info = yaml_spec_error(tmp_path, text)
    assert info.value.field == "<yaml>"
    assert "valid YAML" in str(info.value)
    assert "\n" not in str(info.value)


def test_from_yaml_python_tag_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    info = yaml_spec_error(tmp_path, f'head_dim: !!python/object/apply:os.system ["touch {marker}"]\n')
    assert info.value.field == "<yaml>"
    assert not marker.exists()


def test_from_yaml_python_tag_top_level(tmp_path):
    info = yaml_spec_error(tmp_path, '!!python/object/apply:os.system ["echo hi"]\n')
    assert info.value.field == "<yaml>"


def test_from_yaml_top_level_list(tmp_path):
    info = yaml_spec_error(tmp_path, "- head_dim: 64\n- head_dim: 128\n")
    assert info.value.field == "<spec>"
    assert "list" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "64\n", "hello\n"])
def test_from_yaml_not_a_mapping(tmp_path, text):
    info = yaml_spec_error(tmp_path, text)
    assert info.value.field == "<spec>"


def test_spec_error_is_exported():
    assert attngen.SpecError is SpecError
    assert issubclass(SpecError, ValueError)


def test_default_names_carry_the_mask_parameters():
    """Two masks of different parameters give different kernel names (profiles and errors tell them apart)."""
    def name(mask):
        return Spec(head_dim=64, mask=mask).name

    assert name({"kind": "sliding_window", "left": 1024}) == "attn_d64_bf16_sliding_window_1024_0"
    assert name({"kind": "sliding_window", "left": 1024}) != name({"kind": "sliding_window", "left": 512})
    assert name({"kind": "document", "seq_lens": [100, 200]}) != name({"kind": "document", "seq_lens": [150, 150]})
    assert name({"kind": "runtime", "block_size": 64}) == "attn_d64_bf16_runtime64"
    assert name({"kind": "runtime", "block_size": 64, "element": {"kind": "causal"}}) == "attn_d64_bf16_runtime64_causal"
    long = name({"kind": "and", "of": [{"kind": "sliding_window", "left": 100 + i} for i in range(6)]})
    assert re.fullmatch(r"attn_d64_bf16_\w{1,40}", long)


def test_varlen_layout_key():
    spec = Spec(head_dim=64, causal=True, layout="varlen")
    assert spec.layout == "varlen" and spec.name.endswith("_varlen")
    assert Spec(head_dim=64).layout == "batch" and "varlen" not in Spec(head_dim=64).name
    assert Spec.from_dict({"head_dim": 64, "layout": "varlen"}) == Spec(head_dim=64, layout="varlen")
    with pytest.raises(SpecError, match="'layout'.*batch \\| varlen"):
        Spec(head_dim=64, layout="packed")
    with pytest.raises(SpecError, match="'mask'.*layout: varlen"):
        Spec(head_dim=64, layout="varlen", mask={"kind": "runtime", "block_size": 64})
    with pytest.raises(SpecError, match="'tensors'.*layout: varlen"):
        Spec(head_dim=64, layout="varlen", mask_mod="doc[q_idx] == doc[kv_idx]",
             tensors={"doc": {"dtype": "int32", "shape": ["seqlen_q"]}})
    # a pattern is evaluated per sequence: allowed
    assert Spec(head_dim=64, layout="varlen", mask={"kind": "sliding_window", "left": 64, "right": 0}).layout == "varlen"
