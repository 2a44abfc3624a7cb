"""Validation gaps of issue 12, finding 9: each input below used to pass validation (and then break a kernel,
a mask or a path) and must now be refused with an error naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from attngen.planner.device import preset
from attngen.errors import SpecError
from attngen.masks import BlockMask
from attngen.spec import Spec

BIAS = {"dtype": "float32", "shape": ["heads"]}


def from_yaml(tmp_path, text: str | bytes, name: str = "spec.yaml") -> Spec:
    path = tmp_path / name
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return Spec.from_yaml(path)


# ---- the YAML file ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,field", [
    ("head_dim: 64\nhead_dim: 128\n", "head_dim"),
    ("head_dim: 64\ncausal: false\ncausal: true\n", "causal"),
    ("head_dim: 64\nmask: {kind: causal, kind: sliding_window}\n", "kind"),
    ("head_dim: 64\ntile: {block_m: 64, block_n: 64, warps: 4, warps: 8}\n", "warps"),
])
def test_duplicate_keys_are_refused(tmp_path, text, field):
    with pytest.raises(SpecError) as info:
        from_yaml(tmp_path, text)
    assert info.value.field == field and "twice" in str(info.value)


def test_a_merge_key_may_still_be_overridden(tmp_path):
    spec = from_yaml(tmp_path, "head_dim: 64\ntile: {<<: {block_m: 64, block_n: 64, warps: 4, stages: 2}, stages: 3}\n")
    assert spec.tile.stages == 3
    with pytest.raises(SpecError, match="twice"):
        from_yaml(tmp_path, "head_dim: 64\nname: a\nname: a\n")


@pytest.mark.parametrize("raw", [b"head_dim: 64\nname: caf\xe9\n", b"\xff\xfehead_dim: 64\n"])
def test_a_spec_that_is_not_utf8_is_a_spec_error(tmp_path, raw):
    with pytest.raises(SpecError) as info:
        from_yaml(tmp_path, raw)
    assert info.value.field == "<yaml>" and "UTF-8" in str(info.value)


# ---- names -----------------------------------------------------------------------------------------------

def test_name_with_a_trailing_newline_is_refused(tmp_path):
    for name in ("attn\n", "attn\r\n", "\nattn", "attn ", "attn\t"):
        with pytest.raises(SpecError) as info:
            Spec(head_dim=64, name=name)
        assert info.value.field == "name"
        with pytest.raises(SpecError, match="'name'"):
            from_yaml(tmp_path, f"head_dim: 64\nname: {name!r}\n".replace("'", '"'))


@pytest.mark.parametrize("tensor", [
    "ModContext",          # the struct holding the tensors
    "scale",               # a kernel parameter of the dQ pass
    "q", "k", "v", "lse",  # kernel parameters
    "user_score_mod",      # a generated function
    "threadIdx", "float4", "make_float2", "expf", "dim3",   # CUDA's names
    "for", "class", "this",                                   # C++ keywords
    "attngen_tmp", "__x",  # reserved prefixes
])
def test_tensor_names_the_kernel_uses_are_refused(tensor):
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, score_mod=f"score + {tensor}[h]" if tensor.isidentifier() else "score",
             tensors={tensor: BIAS})
    assert info.value.field == "tensors" and repr(tensor) in str(info.value)


def test_generated_names_come_from_the_templates_and_ordinary_names_pass():
    from attngen.spec import generated_names

    names = generated_names()
    assert {"ModContext", "scale_log2", "online_softmax", "block_bits"} <= names
    assert "xff800000u" not in names and "ptxas" not in names     # no pieces of numbers or comments
    for tensor in ("bias", "doc_q", "gain", "temperature", "scale_by"):
        spec = Spec(head_dim=64, score_mod=f"score + {tensor}[h]", tensors={tensor: BIAS})
        assert set(spec.tensors) == {tensor}


# ---- --arch -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_90aaa", "sm_90aa", "sm_80a", "sm_86a", "sm_9", "SM_90", "sm_90 ", "sm_100", ""])
def test_arch_presets_are_exact(arch):
    with pytest.raises(SpecError) as info:
        preset(arch)
    assert info.value.field == "arch" and "sm_90a" in info.value.allowed


def test_exactly_five_arch_names_are_accepted():
    for arch, base in (("sm_80", "sm_80"), ("sm_86", "sm_86"), ("sm_89", "sm_89"), ("sm_90", "sm_90"), ("sm_90a", "sm_90")):
        assert preset(arch).arch == base
    with pytest.raises(SpecError):
        preset("sm_90aa")


# ---- masks ------------------------------------------------------------------------------------------------

def test_mask_block_size_is_an_int_or_a_pair_not_a_list_of_one(tmp_path):
    for size in ([64], [64, 64, 64], [], [63, 64], [True, 64]):
        with pytest.raises(SpecError) as info:
            Spec(head_dim=64, mask={"kind": "causal", "block_size": size})
        assert info.value.field == "mask.block_size"
        with pytest.raises(SpecError, match="mask.block_size"):
            from_yaml(tmp_path, f"head_dim: 64\nmask: {{kind: causal, block_size: {size}}}\n".replace("True", "true"))
    assert Spec(head_dim=64, mask={"kind": "causal", "block_size": 64}).mask_block_size == (64, 64)
    assert Spec(head_dim=64, mask={"kind": "causal", "block_size": [64, 64]}).mask_block_size == (64, 64)


@pytest.mark.parametrize("fn,dtype", [
    (lambda h, q, k: q - k, "int64"),                       # truthy wherever q != k: kept every block
    (lambda h, q, k: (q >= k).astype(np.float32), "float32"),
    (lambda h, q, k: np.where(q >= k, 1, 0), "int64"),
])
def test_from_predicate_refuses_a_non_boolean_result(fn, dtype):
    assert BlockMask.from_predicate(lambda h, q, k: q >= k, 256, 256, block_size=64).counts()["kept"] == 10
    with pytest.raises(TypeError) as info:
        BlockMask.from_predicate(fn, 256, 256, block_size=64)
    assert "fn" in str(info.value) and dtype in str(info.value)


def test_layout_path_is_resolved_from_the_spec_folder(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    np.save(folder / "blocks.npy", np.tril(np.ones((4, 4), dtype=bool)))
    monkeypatch.chdir(tmp_path)                              # the working folder has no blocks.npy
    spec = from_yaml(folder, "head_dim: 64\nmask: {kind: layout, path: blocks.npy, block_size: 64}\n")
    assert spec.mask["path"] == str(folder / "blocks.npy")
    assert spec.mask_pattern.blocks.sum() == 10
    nested = from_yaml(folder, "head_dim: 64\nmask: {kind: and, block_size: 64, of: [{kind: layout, path: ./blocks.npy,"
                               " block_size: 64}, {kind: causal}]}\n", "n.yaml")
    assert nested.mask["of"][0]["path"] == str(folder / "./blocks.npy")


def test_layout_path_in_the_working_folder_only_is_not_found(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    folder.mkdir()
    np.save(tmp_path / "blocks.npy", np.ones((4, 4), dtype=bool))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        from_yaml(folder, "head_dim: 64\nmask: {kind: layout, path: blocks.npy, block_size: 64}\n")
    assert info.value.field == "mask.path" and str(folder / "blocks.npy") in str(info.value)


def test_an_empty_layout_file_is_a_spec_error(tmp_path, monkeypatch):
    (tmp_path / "blocks.npy").write_bytes(b"")                   # numpy raises EOFError for it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        from_yaml(tmp_path, "head_dim: 64\nmask: {kind: layout, path: blocks.npy, block_size: 64}\n")
    assert info.value.field == "mask.path"


def test_spec_error_cuts_a_long_value():
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, name="x" * 5000)
    assert len(str(info.value)) < 400 and "5002 characters" in str(info.value)
