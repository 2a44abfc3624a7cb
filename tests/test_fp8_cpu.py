"""The FP8 forward on the CPU: the spec's rules, and the register-layout argument the kernel rests on (P packed
by each thread from its own accumulators, V^T written in the matching key order) checked by simulating the
layouts CUTLASS documents for wgmma."""

import numpy as np
import pytest

import attngen
from attngen.codegen.fp8 import FP8_K, KEY_OF_SLOT, key_of_slot


def accumulator_coords(thread: int, index: int, n: int):
    """CLayout_64xN: (row, column) of accumulator register `index` of warpgroup thread `thread`."""
    warp, lane = divmod(thread, 32)
    v0, v1, v2 = index % 2, index // 2 % 2, index // 4
    assert v2 < n // 8
    return 16 * warp + lane // 4 + 8 * v1, 2 * (lane % 4) + v0 + 8 * v2


def a_operand_coords(thread: int, register: int, byte: int):
    """ALayout_64x32: (row, k) of byte `byte` of A register `register` of warpgroup thread `thread`."""
    warp, lane = divmod(thread, 32)
    v1, v2 = register % 2, register // 2
    return 16 * warp + lane // 4 + 8 * v1, 4 * (lane % 4) + byte + 16 * v2


def packed_p(s: np.ndarray) -> np.ndarray:
    """What the kernel's packing puts in each A slot: register r of k-step kk takes, byte b, accumulator
    n-tile 4 kk + 2 (r / 2) + b / 2, element b % 2 + 2 (r % 2) (the same thread's values, no exchange)."""
    rows, keys = s.shape
    a = np.full((rows, keys), np.nan)
    for thread in range(128):
        for kk in range(keys // FP8_K):
            for register in range(4):
                for byte in range(4):
                    tile = 4 * kk + 2 * (register // 2) + byte // 2
                    index = 4 * tile + byte % 2 + 2 * (register % 2)
                    row, col = accumulator_coords(thread, index, keys)
                    a_row, slot = a_operand_coords(thread, register, byte)
                    assert a_row == row
                    a[a_row, FP8_K * kk + slot] = s[row, col]
    return a


@pytest.mark.parametrize("keys", [32, 128])
def test_p_packed_in_place_times_reordered_v_is_p_v(keys):
    rng = np.random.default_rng(keys)
    p, v = rng.random((64, keys)), rng.standard_normal((keys, 48))
    a = packed_p(p)
    assert not np.isnan(a).any()                       # every slot filled exactly from the thread's own values
    order = [FP8_K * (k // FP8_K) + KEY_OF_SLOT[k % FP8_K] for k in range(keys)]
    assert np.array_equal(a, p[:, order])              # slot k carries key order[k] ...
    np.testing.assert_allclose(a @ v[order], p @ v, rtol=1e-12)   # ... so V's rows in that order give P V
    assert not np.allclose(a @ v, p @ v)               # and V in its own order would not


def test_key_of_slot_is_the_documented_formula():
    assert KEY_OF_SLOT[:8] == (0, 1, 8, 9, 2, 3, 10, 11) and KEY_OF_SLOT[16:20] == (16, 17, 24, 25)
    assert [key_of_slot(s) for s in range(32)] == list(KEY_OF_SLOT)


@pytest.mark.parametrize("fields,field", [
    (dict(head_dim=64), "head_dim"), (dict(head_dim=96), "head_dim"), (dict(head_dim=128, head_dim_v=64), "head_dim"),
    (dict(head_dim=128, layout="varlen"), "layout"), (dict(head_dim=128, backward=True), "backward"),
    (dict(head_dim=128, tile={"block_m": 128, "block_n": 64, "warps": 4, "stages": 2}), "tile"),
])
def test_fp8_spec_errors_name_the_field(fields, field):
    with pytest.raises(attngen.SpecError) as err:
        attngen.Spec(dtype="fp8_e4m3", **fields)
    assert err.value.field == field


def test_fp8_spec_sizes():
    spec = attngen.Spec(head_dim=256, dtype="fp8_e4m3", causal=True)
    assert spec.elem_bytes == 1 and spec.out_dtype == "bf16" and spec.name == "attn_d256_fp8_e4m3_causal"
    assert attngen.Spec(head_dim=128).out_dtype == "bf16" and attngen.Spec(head_dim=64, dtype="fp16").elem_bytes == 2
