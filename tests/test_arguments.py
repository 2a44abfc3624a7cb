"""CPU tests of the per-call argument builders the forward and backward launchers share (attngen.runtime.arguments):
the block layout's checks and names, and the modifiers' arguments by the names signature.py declares."""

from __future__ import annotations

import numpy as np
import pytest

from attngen.runtime import arguments
from attngen.runtime.interop import TensorView
from attngen.masks import BlockMask, Causal
from attngen.spec import Spec
from attngen.variant import variant_of


@pytest.fixture
def uploads(monkeypatch):
    """UPLOADS.pointers records what it was asked to upload and returns fake addresses."""
    seen = []

    def pointers(key, owner, make, view, keep):
        arrays = make()
        seen.append((key[0], [np.asarray(a).copy() for a in arrays]))
        keep.append(object())
        return tuple(1000 * len(seen) + 16 * i for i in range(len(arrays)))

    monkeypatch.setattr(arguments.UPLOADS, "pointers", pointers)
    return seen


QV = TensorView("cupy", 0, (1, 300, 2, 64), (1, 1, 1, 1), "bf16", 0, None)


def test_layout_args_for_a_runtime_kernel(uploads):
    spec = Spec(head_dim=64, mask={"kind": "runtime", "block_size": 64, "element": {"kind": "causal"}})
    mask = BlockMask.from_pattern(Causal(), 300, 300, block_size=64)
    keep = []
    args = arguments.layout_args(spec, variant_of(spec), mask, 300, 300, 2, QV, keep)
    assert args == {"full_row_ptr": 1000, "full_cols": 1016, "partial_row_ptr": 1032, "partial_cols": 1048,
                    "mask_heads": 1, "mask_q_blocks": 5} and len(keep) == 1
    assert uploads[0][0] == "csr"
    np.testing.assert_array_equal(uploads[0][1][0], mask.full_row_ptr)
    args = arguments.kv_major_layout_args(mask, QV, keep)
    assert (args["mask_heads"], args["mask_kv_blocks"]) == (1, 5) and uploads[1][0] == "kv_major"


def test_layout_args_refusals(uploads):
    dense = Spec(head_dim=64)
    mask = BlockMask.from_pattern(Causal(), 300, 300, block_size=64)
    assert arguments.layout_args(dense, variant_of(dense), None, 300, 300, 2, QV, []) == {}
    with pytest.raises(ValueError, match="block_mask: this kernel was built without a mask"):
        arguments.layout_args(dense, variant_of(dense), mask, 300, 300, 2, QV, [])
    runtime = Spec(head_dim=64, mask={"kind": "runtime", "block_size": 64})
    with pytest.raises(ValueError, match="partial blocks are masked by causal"):
        arguments.layout_args(runtime, variant_of(runtime), mask, 300, 300, 2, QV, [])
    with pytest.raises(ValueError, match="built for seqlens"):
        arguments.layout_args(runtime, variant_of(runtime), mask, 300, 301, 2, QV, [])
    with pytest.raises(TypeError, match="expected an attngen.BlockMask"):
        arguments.layout_args(runtime, variant_of(runtime), np.ones((5, 5), bool), 300, 300, 2, QV, [])
    assert uploads == []                                       # nothing uploaded for a refused mask


def test_modifier_args_order(uploads):
    spec = Spec(head_dim=64, softcap=30.0, alibi=True)
    args = arguments.modifier_args(spec, variant_of(spec), 0.125, None, None, (1, 2, 300, 300), QV, [])
    assert args == {"softmax_scale": 0.125, "alibi_slopes": 1000, "alibi_batch_stride": 0}   # default slopes
    assert uploads[0][0] == "alibi"
    plain = Spec(head_dim=64)
    assert arguments.modifier_args(plain, variant_of(plain), 0.125, None, None, (1, 2, 300, 300), QV, []) == {}
    with pytest.raises(ValueError, match="alibi_slopes: this kernel was built without alibi"):
        arguments.modifier_args(plain, variant_of(plain), 0.125, object(), None, (1, 2, 300, 300), QV, [])
    with pytest.raises(ValueError, match="tensors: expected none"):
        arguments.modifier_args(plain, variant_of(plain), 0.125, None, {"bias": object()}, (1, 2, 300, 300), QV, [])
