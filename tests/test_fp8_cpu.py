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


def test_e4m3_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    from attngen.tools.reference import round_to_e4m3

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000) * s for s in (1e-3, 0.05, 1.0, 30.0, 300.0)]
                       + [np.array([0.0, -0.0, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 448.0, 464.0, 1e6, -1e6])])
    want = torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).to(torch.float64).numpy()
    np.testing.assert_array_equal(round_to_e4m3(x), want)


def test_fp8_reference_rounds_the_weights_only():
    from attngen.tools.reference import attention_fp8_reference, attention_reference

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 40, 2, 128)) for _ in range(3))
    exact, lse = attention_reference(q, k, v, causal=True)
    fp8, fp8_lse = attention_fp8_reference(q, k, v, causal=True)
    np.testing.assert_array_equal(lse, fp8_lse)                     # the statistics are not rounded
    err = np.max(np.abs(fp8 - exact))
    assert 1e-3 < err < 0.1                                        # e4m3's 3 mantissa bits show, and only them
    wide, _ = attention_fp8_reference(q, k, v, causal=True, p_scale=2.0 ** 20)   # (then: saturation dominates)
    assert np.max(np.abs(wide - exact)) > err


@pytest.mark.parametrize("fields", [dict(head_dim=128), dict(head_dim=128, causal=True), dict(head_dim=256),
                                    dict(head_dim=128, softcap=30.0, alibi=True, causal=True),
                                    dict(head_dim=128, mask={"kind": "sliding_window", "left": 100, "right": 0})])
def test_fp8_kernels_compile_clean(fields):
    """The FP8 forward and its V^T transpose build for Hopper with no spills, no stack and no serialised wgmma;
    the forward's shared memory is the plan's (a static_assert ties the layout to it)."""
    from attngen.codegen.compile import nvrtc_compile
    from attngen.codegen.render import kernel_name, render
    from attngen.planner.device import preset
    from attngen.planner.forward import make_plan

    spec = attngen.Spec(dtype="fp8_e4m3", **fields)
    plan = make_plan(spec, preset("sm_90"))
    assert plan.path == "wgmma" and plan.block_n == 128
    source = render(spec, plan)
    assert "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3" in source
    assert "to_a_fragments_fp8<M_TILES, BLOCK_N>(p_frag, acc_s);" in source
    for kind in ("forward", "fp8_v_transpose"):
        r = nvrtc_compile(source, spec.name, plan.target, kernel_name(spec, kind)).resources
        assert r.spill_bytes == 0 and r.stack_frame == 0 and not r.wgmma_serialized


def test_fp8_plans_only_on_hopper():
    from attngen.errors import PlanError
    from attngen.planner.device import preset
    from attngen.planner.forward import explain, make_plan

    spec = attngen.Spec(dtype="fp8_e4m3", head_dim=128)
    with pytest.raises(PlanError, match="needs Hopper"):
        make_plan(spec, preset("sm_80"))
    assert "V^T" in explain(spec, preset("sm_90"))
    # the Q region holds the bf16 O staged in its place: twice the fp8 Q tile
    assert make_plan(spec, preset("sm_90")).smem_bytes == 1024 + 128 * 128 * 2 + 2 * 128 * 256 + 80


@pytest.mark.parametrize("per_head", [False, True])
def test_quantised_e4m3_maps_each_group_amax_to_448(per_head):
    """The quantiser the GPU tests and bench/fp8_accuracy.py share: x8 * descale recovers x to e4m3's
    relative step (2^-3 of the value, or the subnormal step), and each group's largest |x| lands on 448."""
    torch = pytest.importorskip("torch")
    from attngen.tools.benchmark import quantised_e4m3

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 33, 6, 128, generator=gen) * torch.tensor([1.0, 3.0, 0.5, 8.0, 2.0, 1.0])[:, None]
    x8, descale = quantised_e4m3(x, heads_kv=3, per_head=per_head)
    assert x8.dtype == torch.float8_e4m3fn and descale.dtype == torch.float32
    assert descale.shape == ((2, 3) if per_head else (1,))
    factor = descale.repeat_interleave(2, dim=1)[:, None, :, None] if per_head else descale
    back = x8.float() * factor
    assert torch.all((back - x).abs() <= x.abs() * 2.0 ** -4 + factor * 2.0 ** -9 + 1e-12)
    groups = x8.float().abs().view(2, 33, 3, 2, 128).amax(dim=(1, 3, 4)) if per_head else x8.float().abs().amax()
    assert torch.all(groups == 448.0)
