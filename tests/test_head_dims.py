"""Every head dim FlashAttention takes (1..256, head_dim_v likewise), on the CPU: the spec, the planner over
every head dim x dtype x arch, the launcher's alignment rule, and NVRTC compilation of the forward and
backward kernels of head dims off the multiples of 8 (element-granular global loads and stores, shared
memory still padded to 16 columns) with zero spill bytes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngen
from attngen import PlanError, Spec, SpecError
from attngen.codegen.compile import nvrtc_compile
from attngen.planner.device import preset
from attngen.planner.forward import candidates, smem_bytes
from attngen.planner.backward import make_backward_plan
from attngen.tools.reference import attention_reference, attention_reference_backward
from attngen.codegen.render import kernel_name, render
from attngen.variant import variant_of

ALL_HEAD_DIMS = range(1, 257)
# odd, prime, one past a multiple of 16, just under 256, and 256 itself (the vector path beside them)
COMPILED_HEAD_DIMS = (1, 3, 7, 17, 59, 97, 111, 200, 255, 256)


# ---- spec -----------------------------------------------------------------------------------------

def test_spec_accepts_every_head_dim_from_1_to_256():
    for d in ALL_HEAD_DIMS:
        spec = Spec(head_dim=d, head_dim_v=257 - d)
        assert (spec.head_dim, spec.head_dim_v) == (d, 257 - d)
        assert spec.softmax_scale == pytest.approx(1 / math.sqrt(d))     # the real head dim, not the padded one
        assert Spec(head_dim=d).head_dim_v == d


@pytest.mark.parametrize("field", ["head_dim", "head_dim_v"])
@pytest.mark.parametrize("bad", [0, -1, 257, 512, 59.0, "59", True, None])
def test_spec_refuses_head_dims_outside_1_to_256(field, bad):
    if field == "head_dim_v" and bad is None:
        assert Spec(head_dim=59, head_dim_v=None).head_dim_v == 59                # None: head_dim_v defaults to head_dim
        return
    with pytest.raises(SpecError) as info:
        Spec(**{"head_dim": 59, field: bad})
    assert info.value.field == field and f"'{field}'" in str(info.value) and "1..256" in str(info.value)


def test_spec_from_dict_names_the_missing_head_dim():
    with pytest.raises(SpecError, match="'head_dim'.*1..256"):
        Spec.from_dict({"dtype": "bf16"})
    assert Spec.from_dict({"head_dim": 111, "head_dim_v": 7}).head_dim_v == 7


def test_global_vector_width_follows_both_head_dims():
    for d, dv, vector in ((64, 64, 8), (8, 256, 8), (59, 59, 1), (64, 59, 1), (59, 64, 1), (1, 1, 1), (255, 256, 1)):
        assert variant_of(Spec(head_dim=d, head_dim_v=dv)).global_vector == vector


# ---- planner ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_planner_plans_every_head_dim(dtype, arch):
    device = preset(arch)
    for d in ALL_HEAD_DIMS:
        spec = Spec(head_dim=d, dtype=dtype, causal=d % 2 == 0)
        p = attngen.plan(spec, arch=arch)
        assert p.smem_bytes <= device.smem_per_block and p.regs_estimate <= 255
        # Hopper's wgmma path takes head dims padded to whole 64-column chunks (multiples of 32): never others
        assert (p.path == "wgmma") == (arch == "sm_90" and d % 32 == 0)
        if p.path == "mma_sync":
            assert p.head_dim_padded == p.head_dim_v_padded == -(-d // 16) * 16
            assert p.smem_bytes == smem_bytes(spec, p.block_m, p.block_n, p.stages)
        if d % 8:
            assert not any(c.plan for c in candidates(spec, device) if c.path == "wgmma")
        for deterministic in (False, True):
            b = make_backward_plan(Spec(head_dim=d, dtype=dtype, deterministic=deterministic), device)
            for bp in b.passes.values():
                assert bp.smem_bytes <= device.smem_per_block and bp.regs_estimate <= 255
                assert bp.head_dim_padded % bp.chunk == 0 and bp.head_dim_v_padded % bp.chunk == 0
                # the wgmma dK/dV pass pads head dims that are multiples of 32 to 64-column chunks
                assert (bp.path == "wgmma") == (arch == "sm_90" and not deterministic and d % 32 == 0)


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
def test_planner_plans_unequal_head_dims(arch):
    for d, dv in ((59, 33), (33, 59), (1, 256), (256, 1), (255, 7), (64, 59), (128, 127)):
        spec = Spec(head_dim=d, head_dim_v=dv, causal=True)
        p = attngen.plan(spec, arch=arch)
        assert p.path == "mma_sync" and p.smem_bytes <= preset(arch).smem_per_block
        assert (p.head_dim_padded, p.head_dim_v_padded) == (-(-d // 16) * 16, -(-dv // 16) * 16)
        make_backward_plan(spec, preset(arch))
    from attngen.planner.forward import explain

    assert "element loads and stores" in explain(Spec(head_dim=59), preset(arch))
    assert "element loads" not in explain(Spec(head_dim=64), preset(arch))
    with pytest.raises(PlanError):          # a wgmma override is refused off the multiples of 64
        attngen.plan(Spec(head_dim=127, tile={"block_m": 128, "block_n": 64, "warps": 12, "path": "wgmma"}),
                     arch="sm_90")


# ---- the padding the kernels do is exact ----------------------------------------------------------

def test_zero_padded_head_dims_leave_attention_and_gradients_unchanged():
    """What the kernels rely on: columns past the real head dim, zero in shared memory, change no dot
    product, so the output and gradients are those of the real head dim (with its scale)."""
    rng = np.random.default_rng(59)
    d, dv, dp, dvp = 59, 33, 64, 48
    q, k = rng.normal(size=(1, 17, 2, d)), rng.normal(size=(1, 23, 1, d))
    v, dout = rng.normal(size=(1, 23, 1, dv)), rng.normal(size=(1, 17, 2, dv))
    pad = lambda x, n: np.concatenate([x, np.zeros(x.shape[:3] + (n - x.shape[3],))], axis=3)  # noqa: E731
    scale = 1 / math.sqrt(d)
    out, lse = attention_reference(q, k, v, causal=True, scale=scale)
    out_p, lse_p = attention_reference(pad(q, dp), pad(k, dp), pad(v, dvp), causal=True, scale=scale)
    np.testing.assert_allclose(out_p[..., :dv], out, atol=1e-12)
    assert np.all(out_p[..., dv:] == 0)
    np.testing.assert_allclose(lse_p, lse, atol=1e-12)
    grads = attention_reference_backward(q, k, v, dout, causal=True, scale=scale)
    grads_p = attention_reference_backward(pad(q, dp), pad(k, dp), pad(v, dvp), pad(dout, dvp), causal=True, scale=scale)
    for g, gp in zip(grads, grads_p):
        np.testing.assert_allclose(gp[..., :g.shape[3]], g, atol=1e-12)
        assert np.all(gp[..., g.shape[3]:] == 0)


# ---- the launcher's alignment rule (no GPU: array stand-ins; nothing is launched) --------------------

class _FakeCupyArray:
    """Just what attngen.runtime.launch._view reads of a CuPy array."""

    def __init__(self, shape, strides, ptr=0x10000, dtype="float16"):
        self.shape, self.strides = tuple(shape), tuple(2 * s for s in strides)
        self.dtype = type("dtype", (), {"itemsize": 2, "name": dtype})()
        self.data = type("data", (), {"ptr": ptr})()
        self.device = type("device", (), {"id": 0})()


_FakeCupyArray.__module__ = "cupy._core.core"


def _contiguous(shape):
    return [int(np.prod(shape[i + 1:])) for i in range(len(shape))]


def test_check_inputs_takes_any_row_start_for_odd_head_dims():
    from attngen.runtime.launch import check_inputs

    spec = Spec(head_dim=59, head_dim_v=33, dtype="fp16")
    # q: a transpose of a [b, h, s, d] tensor, 2 bytes past a 16-byte boundary; k, v: contiguous, odd strides
    q = _FakeCupyArray((2, 17, 4, 59), (4 * 17 * 59, 59, 17 * 59, 1), ptr=0x10002)
    k = _FakeCupyArray((2, 23, 2, 59), _contiguous((2, 23, 2, 59)), ptr=0x20006)
    v = _FakeCupyArray((2, 23, 2, 33), _contiguous((2, 23, 2, 33)))
    *_, sizes = check_inputs(spec, q, k, v)
    assert sizes == (2, 17, 23, 4, 2)
    with pytest.raises(ValueError, match="last dimension must be contiguous"):
        check_inputs(spec, _FakeCupyArray((2, 17, 4, 59), (4 * 17 * 118, 4 * 118, 118, 2)), k, v)


def test_check_inputs_keeps_16_byte_rows_for_vector_head_dims():
    from attngen.runtime.launch import check_inputs

    spec = Spec(head_dim=64, dtype="fp16")
    shape = (1, 9, 2, 64)
    ok = _FakeCupyArray(shape, _contiguous(shape))
    check_inputs(spec, ok, ok, ok)
    with pytest.raises(ValueError, match="q: row starts must be 16-byte aligned"):
        check_inputs(spec, _FakeCupyArray(shape, _contiguous(shape), ptr=0x10002), ok, ok)
    with pytest.raises(ValueError, match="k: row starts must be 16-byte aligned"):
        check_inputs(spec, ok, _FakeCupyArray(shape, (9 * 2 * 68, 2 * 68, 68, 1)), ok)


def test_backward_views_take_element_aligned_rows_for_odd_head_dims():
    from attngen.runtime.backward import _row_major_view
    from attngen.runtime.launch import _view

    ref = _view("q", _FakeCupyArray((1, 5, 2, 59), _contiguous((1, 5, 2, 59))))
    odd = _FakeCupyArray((1, 5, 2, 59), (5 * 2 * 61, 2 * 61, 61, 1), ptr=0x10002)      # a slice [..., 1:60]
    assert _row_major_view("dout", odd, (1, 5, 2, 59), "fp16", ref).ptr == 0x10002
    assert _row_major_view("dout", odd, (1, 5, 2, 59), "fp16", ref, vector=1).ptr == 0x10002
    misaligned = _FakeCupyArray((1, 5, 2, 64), _contiguous((1, 5, 2, 64)), ptr=0x10002)
    with pytest.raises(ValueError, match="dq: .*16-byte aligned"):
        _row_major_view("dq", misaligned, (1, 5, 2, 64), "fp16", ref)
    assert _row_major_view("dq", misaligned, (1, 5, 2, 64), "fp16", ref, vector=1).ptr == 0x10002


# ---- rendering and NVRTC compilation ----------------------------------------------------------------

def _compile(spec, plan, kind):
    return nvrtc_compile(render(spec, plan, kind), f"{spec.name}_{kind}", plan.target, kernel_name(spec, kind))


def _no_spills(binary, what):
    r = binary.resources
    assert r.spill_bytes == 0 and r.stack_frame == 0, f"{what} spills: {r}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", COMPILED_HEAD_DIMS)
def test_forward_compiles_without_spills(d, arch):
    spec = Spec(head_dim=d, dtype="bf16" if d % 2 else "fp16", causal=d % 3 == 0)
    plan = attngen.plan(spec, arch=arch)
    source = render(spec, plan)
    vector = 8 if d % 8 == 0 else 1
    assert f"constexpr int GLOBAL_VECTOR = {vector};" in source
    assert f"constexpr int HEAD_DIM   = {d};" in source
    binary = _compile(spec, plan, "forward")
    _no_spills(binary, f"{spec.name} forward on {arch}")
    if plan.path == "mma_sync":
        assert "mma.sync.aligned.m16n8k16" in binary.ptx and "ldmatrix.sync.aligned" in binary.ptx
    if vector == 1:   # element loads and stores only: no 16-byte global access that could cross the real head dim
        assert "cp.async.cg" not in binary.ptx and "st.global.v4" not in binary.ptx and "ld.global.v4" not in binary.ptx
        assert "st.shared.v4.b32" in binary.ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d", COMPILED_HEAD_DIMS)
def test_backward_compiles_without_spills(d, arch):
    """The dK/dV pass with dQ by atomics, its delta and dQ-conversion kernels (one module)."""
    spec = Spec(head_dim=d, dtype="fp16" if d % 2 else "bf16", causal=d % 3 != 0)
    plan = make_backward_plan(spec, preset(arch))
    binary = _compile(spec, plan.dkdv, "backward_dkdv")
    _no_spills(binary, f"{spec.name} dK/dV on {arch}")
    for kind in ("backward_delta", "backward_dq_convert"):
        assert f".entry {kernel_name(spec, kind)}" in binary.ptx
    if d % 8:
        # the streamed tiles come by element loads (cp.async stays for the rows' 4-byte LSE and delta only)
        assert "cp.async.cg" not in binary.ptx and "st.global.v4" not in binary.ptx
        assert "ld.global.u32" not in binary.ptx and "st.global.u32" not in binary.ptx
        assert "st.global.b32" not in binary.ptx and "ld.global.b32" not in binary.ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("d,dv,deterministic", [(59, 33, False), (33, 59, False), (59, 33, True), (1, 1, True),
                                                (255, 255, True)])
def test_unequal_head_dims_and_the_deterministic_dq_pass_compile_without_spills(d, dv, deterministic, arch):
    spec = Spec(head_dim=d, head_dim_v=dv, dtype="bf16", causal=True, deterministic=deterministic)
    plan = make_backward_plan(spec, preset(arch))
    for kind, bp in plan.passes.items():
        if kind == "dq" or not deterministic or d != dv:
            _no_spills(_compile(spec, bp, f"backward_{kind}"), f"{spec.name} {kind} on {arch}")
    if not deterministic:
        _no_spills(_compile(spec, attngen.plan(spec, arch=arch), "forward"), f"{spec.name} forward on {arch}")


def test_masked_and_modified_odd_head_dims_build_without_spills():
    """What build keeps (the first ranked plan that compiles without spills, as for every head dim)."""
    from attngen.api import plan_and_compile, plan_and_compile_backward

    spec = Spec(head_dim=59, dtype="bf16", mask={"kind": "sliding_window", "left": 100, "right": 0}, softcap=30.0,
                alibi=True)
    for arch in ("sm_80", "sm_90"):
        _, source, (binary, _) = plan_and_compile(spec, preset(arch), lambda source, plan: (
            nvrtc_compile(source, spec.name, plan.target, kernel_name(spec)), None))
        assert "constexpr int GLOBAL_VECTOR = 1;" in source
        _no_spills(binary, f"{spec.name} forward on {arch}")
        _, _, results = plan_and_compile_backward(spec, preset(arch), lambda source, kind, target: (
            nvrtc_compile(source, f"{spec.name}_{kind}", target, kernel_name(spec, kind)), None))
        for kind, (binary, _) in results.items():
            _no_spills(binary, f"{spec.name} {kind} on {arch}")
