"""Global position offsets without a GPU: attention's position_offsets become the kernels' position_shift (checked
and named in errors), every batch and varlen kernel takes it once in its signature, and the rendered kernels
align causal and the mask predicates at ctx.causal_offset. (On the GPU: tests/test_gpu_positions.py.)"""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen.calls import position_shift, spec_from
from attngen.codegen.render import render
from attngen.codegen.signature import (backward_dkdv_signature, backward_dq_signature, decode_signature,
                                       forward_signature)
from attngen.planner import device as device_mod
from attngen.planner.forward import make_plan
from attngen.runtime.launch import MAX_CAUSAL_OFFSET, check_position_shift
from attngen.variant import variant_of


def arrays(sq, sk):
    return np.zeros((2, sq, 4, 64), np.float16), np.zeros((2, sk, 2, 64), np.float16)


@pytest.mark.parametrize("offsets,shift", [(None, 0), ((0, 0), -114), ((114, 0), 0), ((1000, 600), 286),
                                           ((600, 1000), -514)])
def test_offsets_become_the_shift_from_bottom_right(offsets, shift):
    q, k = arrays(203, 317)            # bottom-right alignment: q_start - kv_start = 317 - 203 = 114
    assert position_shift(offsets, q, k) == shift


@pytest.mark.parametrize("bad", [(1,), (1, 2, 3), (-1, 0), (0.5, 0), (True, 0), "0,0", 5])
def test_bad_offsets_are_refused_by_name(bad):
    q, k = arrays(10, 10)
    with pytest.raises(ValueError, match=r"position_offsets: expected \(q_start, kv_start\)"):
        position_shift(bad, q, k)


def test_offsets_need_the_batch_layout():
    with pytest.raises(ValueError, match="position_offsets: needs the batch layout"):
        position_shift((0, 0), np.zeros((10, 4, 64), np.float16), np.zeros((10, 4, 64), np.float16))


def test_the_launchers_check_the_shift():
    check_position_shift(0, 10, 20)
    check_position_shift(np.int32(-5), 10, 20)
    with pytest.raises(TypeError, match="position_shift: expected an int"):
        check_position_shift(1.0, 10, 20)
    with pytest.raises(TypeError, match="position_shift: expected an int"):
        check_position_shift(True, 10, 20)
    with pytest.raises(ValueError, match="position_shift: seqlen_k - seqlen_q"):
        check_position_shift(MAX_CAUSAL_OFFSET, 10, 20)


def test_the_api_refuses_bad_offsets_before_anything_runs():
    q = np.zeros((1, 8, 2, 64), np.float16)     # numpy: nothing could run anyway; the offsets are checked first
    with pytest.raises(ValueError, match="position_offsets"):
        attngen.attention(q, q, q, causal=True, position_offsets=(0, -3))


@pytest.mark.parametrize("varlen", [False, True])
def test_every_attention_kernel_takes_the_shift_once(varlen):
    spec = attngen.Spec(head_dim=64, dtype="bf16", causal=True, layout="varlen" if varlen else "batch")
    variant = variant_of(spec)
    for signature in (forward_signature(variant, False), forward_signature(variant, True),
                      backward_dq_signature(variant), backward_dkdv_signature(variant, True, True),
                      backward_dkdv_signature(variant, False, False)):
        assert signature.names.count("position_shift") == 1
    decode = attngen.Spec(head_dim=64, dtype="bf16", causal=True, layout="kvcache")
    assert "position_shift" not in decode_signature(variant_of(decode)).names


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("mask", [None, (64, 0)])
def test_kernels_align_at_the_shifted_offset(arch, mask):
    spec = spec_from("bf16", 128, 128, True, window=mask, alibi=True)
    source = render(spec, make_plan(spec, device_mod.resolve(arch)))
    assert "ctx.causal_offset = seqlen_k - seqlen_q + position_shift;" in source
    assert "const int causal_offset = ctx.causal_offset;" in source
    assert "seqlen_k - seqlen_q;" not in source.replace("seqlen_k - seqlen_q + position_shift;", "")
    assert "fabsf((float)(q_idx + ctx.causal_offset - kv_idx))" in source           # ALiBi's distance
    if mask:
        assert "(q_idx + causal_offset)" in source and "seqlen_q - seqlen_k" not in source
