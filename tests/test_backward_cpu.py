"""CPU tests of the backward: reference gradients against finite differences, the backward planner over
every head dim x dtype x arch, and NVRTC compilation of the backward kernels with no spills."""

from __future__ import annotations

import numpy as np
import pytest

import attngen
from attngen.codegen.compile import nvrtc_compile
from attngen.planner.device import preset
from attngen.planner.backward import DKDV_LAYOUTS, explain_backward, make_backward_plan
from attngen.tools.reference import attention_reference, attention_reference_backward
from attngen.codegen.render import kernel_name, render


def finite_difference_grads(q, k, v, dout, eps=1e-6, **kw):
    grads = []
    for x in (q, k, v):
        g = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            old = x[idx]
            x[idx] = old + eps
            plus = (attention_reference(q, k, v, **kw)[0] * dout).sum()
            x[idx] = old - eps
            minus = (attention_reference(q, k, v, **kw)[0] * dout).sum()
            x[idx] = old
            g[idx] = (plus - minus) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("sq,sk,hq,hkv,causal", [(5, 5, 2, 2, False), (4, 7, 4, 2, True), (7, 3, 2, 1, True),
                                                 (6, 6, 3, 1, False)])
def test_reference_gradients_match_finite_differences(sq, sk, hq, hkv, causal):
    rng = np.random.default_rng(sq * 10 + sk)
    q, k = rng.normal(size=(2, sq, hq, 8)), rng.normal(size=(2, sk, hkv, 8))
    v, dout = rng.normal(size=(2, sk, hkv, 6)), rng.normal(size=(2, sq, hq, 6))
    got = attention_reference_backward(q, k, v, dout, causal=causal, scale=0.4)
    want = finite_difference_grads(q, k, v, dout, causal=causal, scale=0.4)
    for g, w, name in zip(got, want, ("dq", "dk", "dv")):
        np.testing.assert_allclose(g, w, atol=1e-7, err_msg=name)


def test_reference_gradients_with_a_mask_and_rows_that_see_nothing():
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(1, 6, 2, 8)), rng.normal(size=(1, 5, 2, 8)), rng.normal(size=(1, 5, 2, 8))
    dout = rng.normal(size=(1, 6, 2, 8))
    mask = rng.random((2, 6, 5)) < 0.6
    mask[:, 2] = False                                                   # row 2 sees no key
    got = attention_reference_backward(q, k, v, dout, mask=mask)
    want = finite_difference_grads(q, k, v, dout, mask=mask)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-7)
    assert np.all(got[0][:, 2] == 0)


HEAD_DIMS = list(range(8, 257, 8))


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_plan_fits_every_head_dim(d, arch, deterministic):
    spec = attngen.Spec(head_dim=d, deterministic=deterministic)
    device = preset(arch)
    plan = make_backward_plan(spec, device)
    assert list(plan.passes) == (["dq", "dkdv"] if deterministic else ["dkdv"])
    for p in plan.passes.values():
        assert p.smem_bytes <= device.smem_per_block and p.regs_estimate <= 255
        assert p.head_dim_padded % p.chunk == 0 and p.head_dim_v_padded % p.chunk == 0
    wgmma = arch == "sm_90" and not deterministic and d % 32 == 0      # padded to 64-column chunks
    assert plan.dkdv.path == ("wgmma" if wgmma else "mma_sync") and plan.dkdv.target == arch + ("a" if wgmma else "")
    wgmma_keys = 128 if d <= 128 else 64                                # keys as rows, or as columns
    sharers = plan.dkdv.warps * plan.dkdv.warp_keys // plan.dkdv.block_n    # warps sharing a warp's keys
    assert wgmma or (plan.dkdv.warp_keys, sharers) in DKDV_LAYOUTS
    assert plan.dkdv.fused_dq == (not deterministic) and (not wgmma or plan.dkdv.block_n == wgmma_keys)
    assert plan.dkdv.vector_atomics == (arch == "sm_90")
    if deterministic:
        assert plan.dq.block_m == 16 * plan.dq.warps
    text = explain_backward(spec, device)
    assert ("dq:" in text) == deterministic and "dkdv:" in text and text.count("->") == len(plan.passes)
    assert ("no atomics (deterministic)" in text) == deterministic and ("dQ added with fp32 atomics" in text) != deterministic


def test_wgmma_backward_plan_formulas_and_refusals():
    """The wgmma dK/dV pass: keys as rows at padded head dims 64/128 (128 keys, two compute warpgroups of 64,
    steps of 8192 / head_dim queries), keys as columns for wider heads (64 keys, 32 per warpgroup as the wgmma
    N, 64-query steps), the shared-memory formula of each layout, and the specs it leaves to mma.sync."""
    from attngen.planner.backward import _wgmma_dkdv_pass, wgmma_dkdv_shape, wgmma_dkdv_smem_bytes

    h100 = preset("sm_90")
    for d in (64, 128):
        p, why = _wgmma_dkdv_pass(attngen.Spec(head_dim=d), h100, 2)
        assert why == "" and (p.block_m, p.block_n, p.warps, p.chunk, p.n_chunks) == (8192 // d, 128, 12, d, 1)
        assert not p.keys_as_columns
        tiles = 2 * 128 * d * 2 + 2 * (2 * p.block_m * d * 2 + p.block_m * 8) + 2 * 128 * p.block_m * 2 + 2 * 64 * 64 * 4
        assert p.smem_bytes == wgmma_dkdv_smem_bytes(d, d, wgmma_dkdv_shape(d, d), 2) == 1024 + tiles + 64
        assert p.regs_estimate <= 240 and p.matmul_factor == 2.5 and p.target == "sm_90a"
    # padded (96 -> 128), head_dim_v != head_dim, and wide heads with the keys as columns
    layouts = {(96, 96): (False, 128, 128), (128, 64): (False, 128, 64), (160, 160): (True, 192, 192),
               (192, 192): (True, 192, 192), (192, 128): (True, 192, 128), (256, 256): (True, 256, 256),
               (256, 128): (True, 256, 128), (64, 128): (True, 64, 128)}   # rows would need 264 registers
    for (d, dv), (columns, d_padded, dv_padded) in layouts.items():
        p, why = _wgmma_dkdv_pass(attngen.Spec(head_dim=d, head_dim_v=dv), h100, 2)
        assert why == "" and p.keys_as_columns == columns, (d, dv, why)
        assert (p.head_dim_padded, p.head_dim_v_padded, p.chunk) == (d_padded, dv_padded, max(d_padded, dv_padded))
        assert p.regs_estimate <= 240 and p.smem_bytes <= h100.smem_per_block
        if columns:
            scores = 64 * 64 * 2       # P^T, and two dS^T buffers
            tiles = 64 * (d_padded + dv_padded) * 2 + 2 * (64 * (d_padded + dv_padded) * 2 + 64 * 8) + 3 * scores
            assert (p.block_m, p.block_n) == (64, 64) and p.smem_bytes == 1024 + tiles + 64
    refusals = [(attngen.Spec(head_dim=80), h100, "multiples of 32"),
                (attngen.Spec(head_dim=128, head_dim_v=48), h100, "multiples of 32"),
                (attngen.Spec(head_dim=128, deterministic=True), h100, "deterministic"),
                (attngen.Spec(head_dim=128), preset("sm_80"), "sm_90"),
                (attngen.Spec(head_dim=128, mask={"kind": "runtime", "block_size": 64}), h100, "mask blocks")]
    for spec, device, word in refusals:
        p, why = _wgmma_dkdv_pass(spec, device, 2)
        assert p is None and word in why
    # keys as columns tile a 64-block layout; patterns as code are offered (the build passes over a candidate
    # whose wgmma ptxas serialises)
    assert _wgmma_dkdv_pass(attngen.Spec(head_dim=256, mask={"kind": "runtime", "block_size": 64}), h100, 2)[0]
    window = attngen.Spec(head_dim=128, mask={"kind": "sliding_window", "left": 256, "right": 0})
    assert _wgmma_dkdv_pass(window, h100, 2)[0] is not None
    assert "wgmma" in explain_backward(attngen.Spec(head_dim=128), h100)


BACKWARD_VARIANTS = [dict(head_dim=d, dtype=t, causal=c) for d in (8, 32, 64, 96, 128, 160, 256)
                     for t in ("fp16", "bf16") for c in (False, True)]
BACKWARD_VARIANTS += [dict(head_dim=64, head_dim_v=128), dict(head_dim=128, head_dim_v=64, causal=True),
                      dict(head_dim=192, head_dim_v=128, causal=True), dict(head_dim=256, head_dim_v=128),
                      dict(head_dim=256, causal=True, softcap=30.0, alibi=True),
                      dict(head_dim=256, mask={"kind": "runtime", "block_size": 64}),
                      dict(head_dim=24, head_dim_v=56), dict(head_dim=128, softcap=30.0, alibi=True, causal=True),
                      dict(head_dim=64, mask={"kind": "sliding_window", "left": 256, "right": 0}),
                      dict(head_dim=128, mask={"kind": "bigbird", "window": 3, "global_tokens": [0], "random_blocks": 2}),
                      dict(head_dim=128, mask={"kind": "runtime"}), dict(head_dim=64, mask={"kind": "runtime", "block_size": 64}),
                      dict(head_dim=128, causal=True, score_mod="score * gain[h] + 0.01f * (q_idx - kv_idx)",
                           score_mod_grad="gain[h]", tensors={"gain": {"dtype": "float32", "shape": ["heads"]}}),
                      dict(head_dim=64, mask_mod="doc[q_idx] == doc[kv_idx]",
                           tensors={"doc": {"dtype": "int32", "shape": ["seqlen_k"]}})]


# the deterministic passes (a dQ pass, no atomics) over a few of them
BACKWARD_VARIANTS += [dict(head_dim=d, deterministic=True) for d in (8, 64, 128, 256)]
BACKWARD_VARIANTS += [dict(head_dim=128, causal=True, softcap=30.0, alibi=True, deterministic=True),
                      dict(head_dim=64, mask={"kind": "runtime", "block_size": 64}, deterministic=True)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("fields", BACKWARD_VARIANTS, ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()))
def test_backward_kernels_compile_without_spills(fields, arch):
    """What build_backward keeps: each pass's first ranked candidate that compiles without spills."""
    from attngen.api import plan_and_compile_backward

    spec = attngen.Spec(**fields)
    plan, sources, results = plan_and_compile_backward(spec, preset(arch), lambda source, kind, target: (
        nvrtc_compile(source, f"{spec.name}_{kind}", target, kernel_name(spec, kind)), None))
    assert set(results) == {f"backward_{kind}" for kind in plan.passes}
    dkdv = sources["backward_dkdv"]
    if spec.deterministic:
        assert "red.global.add" not in dkdv and "bwd_delta(" in sources["backward_dq"]
    elif plan.dkdv.path == "wgmma" and plan.dkdv.keys_as_columns:   # dQ tiles added with vector atomics
        assert "red_add_v4(dq_part" in dkdv and "bulk_reduce_add_f32(dq_accum" not in dkdv and "stmatrix" in dkdv
        assert "wgmma.mma_async" in dkdv and plan.dkdv.target == "sm_90a"
    elif plan.dkdv.path == "wgmma":     # dQ parts added by the copy engine, one bulk reduction per warpgroup and step
        assert "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32" in dkdv and "red.global.add" not in dkdv
        assert "wgmma.mma_async" in dkdv and plan.dkdv.target == "sm_90a"
    else:     # dQ from the dK/dV pass: the atomics (vector ones on sm_90), delta and the conversion with it
        assert ("red.global.add.v2.f32" in dkdv) == (arch == "sm_90") and "red.global.add" in dkdv
    if not spec.deterministic:
        assert f"{spec.name}_bwd_delta(" in dkdv and f"{spec.name}_bwd_dq_convert(" in dkdv
    for kind, bwd in plan.passes.items():
        kind = f"backward_{kind}"
        assert results[kind][0].resources.spill_bytes == 0, (kind, results[kind][0].resources)
        assert f"CHUNK      = {bwd.chunk}" in sources[kind]
        if spec.mask_pattern is not None:
            assert "list_tiles(" in sources[kind]                  # the mask as code, no index tensor
        if spec.mask is not None and (spec.mask_pattern is None or spec.mask_pattern.table_block_size):
            rows, cols = spec.mask_block_size
            assert rows % bwd.block_m == 0 and cols % bwd.block_n == 0


def test_backward_refuses_what_it_does_not_cover():
    from attngen.runtime.backward import check_backward_support

    check_backward_support(attngen.Spec(head_dim=64, softcap=10.0, alibi=True, mask={"kind": "causal"}))
    with pytest.raises(ValueError, match="score_mod_grad"):
        check_backward_support(attngen.Spec(head_dim=64, score_mod="score * 2.0f"))
    check_backward_support(attngen.Spec(head_dim=64, score_mod="score * 2.0f", score_mod_grad="2.0f"))
    check_backward_support(attngen.Spec(head_dim=64, mask={"kind": "runtime"}, mask_mod="kv_idx % 2 == 0"))


def test_spec_backward_key_builds_the_backward_kernels(tmp_path):
    from click.testing import CliRunner

    from attngen.tools.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text("name: tiny\nhead_dim: 64\ncausal: true\nbackward: true\n")
    result = CliRunner().invoke(main, ["build", str(spec), "-o", str(tmp_path / "out"), "--arch", "sm_80"])
    assert result.exit_code == 0, result.output
    assert "backward dq" not in result.output and "backward dkdv" in result.output     # dQ with atomics
    for name in ("tiny.cu", "tiny_bwd_dkdv.cu", "tiny_bwd_dkdv.cubin", "tiny_bwd_dkdv.ptx"):
        assert (tmp_path / "out" / name).is_file()
    assert not (tmp_path / "out" / "tiny_bwd_dq.cu").exists()
    spec.write_text("name: tiny\nhead_dim: 64\ncausal: true\nbackward: true\ndeterministic: true\n")
    result = CliRunner().invoke(main, ["build", str(spec), "-o", str(tmp_path / "det"), "--arch", "sm_80"])
    assert result.exit_code == 0 and "backward dq" in result.output and "backward dkdv" in result.output
    for name in ("tiny_bwd_dq.cu", "tiny_bwd_dkdv.cu", "tiny_bwd_dq.cubin", "tiny_bwd_dkdv.ptx"):
        assert (tmp_path / "det" / name).is_file()
    with pytest.raises(attngen.SpecError, match="'deterministic'"):
        attngen.Spec(head_dim=64, deterministic=1)
    plan = CliRunner().invoke(main, ["plan", str(spec), "--arch", "sm_90"])
    assert "backward on sm_90" in plan.output and "dkdv:" in plan.output
    with pytest.raises(attngen.SpecError, match="'backward'"):
        attngen.Spec(head_dim=64, backward="yes")
    spec.write_text("name: tiny\nhead_dim: 64\nscore_mod: 'score * 2.0f'\nbackward: true\n")   # no score_mod_grad
    refused = CliRunner().invoke(main, ["build", str(spec), "-o", str(tmp_path / "out2"), "--arch", "sm_80"])
    assert refused.exit_code == 2 and "backward" in refused.output
    assert not (tmp_path / "out2").exists()                              # nothing half-written


def test_reference_gradients_match_torch_autograd_float64():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    q, k, v = rng.normal(size=(1, 5, 4, 8)), rng.normal(size=(1, 6, 2, 8)), rng.normal(size=(1, 6, 2, 8))
    dout = rng.normal(size=(1, 5, 4, 8))

    def attention(qt, kt, vt):
        kt, vt = kt.repeat_interleave(2, dim=2), vt.repeat_interleave(2, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", qt, kt) * 0.5
        s = s.masked_fill(torch.ones(5, 6, dtype=torch.bool).triu(2), float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), vt)

    leaves = [torch.tensor(x, requires_grad=True) for x in (q, k, v)]
    assert torch.autograd.gradcheck(attention, leaves)
    attention(*leaves).backward(torch.tensor(dout))
    for leaf, mine in zip(leaves, attention_reference_backward(q, k, v, dout, causal=True, scale=0.5)):
        np.testing.assert_allclose(mine, leaf.grad.numpy(), atol=1e-12)


def test_reference_gradients_with_softcap_alibi_and_mask_mod_match_finite_differences():
    rng = np.random.default_rng(11)
    q, k, v = rng.normal(size=(2, 5, 2, 8)), rng.normal(size=(2, 6, 1, 8)), rng.normal(size=(2, 6, 1, 8))
    dout = rng.normal(size=(2, 5, 2, 8))
    kw = dict(causal=True, scale=0.9, softcap=1.3, alibi_slopes=rng.uniform(0.1, 0.5, (2, 2)),
              mask_mod=lambda b, h, qi, kj: (np.asarray(qi) + np.asarray(kj) + b) % 4 != 1)
    got = attention_reference_backward(q, k, v, dout, **kw)
    want = finite_difference_grads(q, k, v, dout, **kw)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-7)


def test_reference_gradients_with_a_score_mod_match_finite_differences():
    rng = np.random.default_rng(12)
    q, k, v = rng.normal(size=(1, 4, 2, 8)), rng.normal(size=(1, 5, 2, 8)), rng.normal(size=(1, 5, 2, 8))
    dout = rng.normal(size=(1, 4, 2, 8))
    gain = np.array([0.7, 1.9])
    score_mod = lambda s, b, h, qi, kj: np.sin(s) * gain[np.asarray(h)] + 0.1 * (qi - kj)  # noqa: E731
    grad = lambda s, b, h, qi, kj: np.cos(s) * gain[np.asarray(h)] + 0 * (qi - kj)  # noqa: E731
    got = attention_reference_backward(q, k, v, dout, softcap=2.0, score_mod=score_mod, score_mod_grad=grad)
    want = finite_difference_grads(q, k, v, dout, softcap=2.0, score_mod=score_mod)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-7)
    with pytest.raises(ValueError, match="score_mod_grad"):
        attention_reference_backward(q, k, v, dout, score_mod=score_mod)


def test_score_mod_grad_spec_field():
    from attngen.runtime.backward import check_backward_support

    with pytest.raises(attngen.SpecError, match="'score_mod_grad'"):
        attngen.Spec(head_dim=64, score_mod_grad="1.0f")
    with pytest.raises(attngen.SpecError) as info:
        attngen.Spec(head_dim=64, score_mod="score * 2.0f", score_mod_grad="2.0f * nope")
    assert 'score_mod_grad(1): error: identifier "nope" is undefined' in str(info.value)
    spec = attngen.Spec(head_dim=64, score_mod="score * gain[h]", score_mod_grad="gain[h]",
                        tensors={"gain": {"dtype": "float32", "shape": ["heads"]}})
    check_backward_support(spec)
    plan = make_backward_plan(spec, preset("sm_90"))
    source = render(spec, plan.dkdv, "backward_dkdv")
    assert "user_score_mod_grad" in source and "gain[h]" in source
    assert "user_score_mod_grad" not in render(spec, attngen.plan(spec, "sm_90"))      # the forward needs no derivative


@pytest.mark.parametrize("arch,tile,stages,d128", [("sm_90", (64, 64, 8), 2, (64, 128, 8, 3)),
                                                   ("sm_80", (64, 64, 8), 1, (32, 128, 8, 3))])
def test_dkdv_ranks_resident_warps_before_ring_depth(arch, tile, stages, d128):
    """d256's mma.sync dK/dV pass: four warps share 32 keys, so the whole head is one chunk (one pass over the
    scores). On the H200 64x64 on 8 warps ran 1.21x (causal 1.28x) the pairs' 32x128 with two chunks of 128,
    and with one stage still 1.16x; 4 warps' 64x32 ran 0.68x the 8 warps' (BENCHMARKS.md, issue 17 round 8).
    So sm_80's 163 KB takes the 8-warp tile with one stage over a 4-warp one with two. d128 takes 64-query
    steps where 3 stages of them fit (the H200: 1.2x the 32-query steps, round 7); sm_80 keeps 32."""
    from attngen.planner.backward import pass_candidates

    def best(d):
        return next(p for _, p, _ in pass_candidates("dkdv", attngen.Spec(head_dim=d, backward=True), preset(arch))
                    if p and p.path == "mma_sync")
    p = best(256)
    assert ((p.block_m, p.block_n, p.warps), p.stages) == (tile, stages)
    assert [(best(d).block_m, best(d).block_n, best(d).warps, best(d).stages) for d in (64, 128)] == \
        [(64, 128, 8, 3), d128]


@pytest.mark.parametrize("modifiers,warp_keys,block_m", [({}, 32, 64), (dict(softcap=5.0, alibi=True), 16, 32)])
def test_dkdv_takes_16_key_warps_where_32_spill(modifiers, warp_keys, block_m):
    """sm_90's mma.sync dK/dV pass at d128: FlashAttention-2's 32-key warp layout with 64-query steps, and where
    softcap + ALiBi make its 32-key candidates spill (176 B, then 20 B), the 16-key one the build reaches next."""
    from attngen.api import plan_and_compile_backward
    from attngen.planner.backward import pass_candidates

    spec = attngen.Spec(head_dim=128, **modifiers)
    plan, sources, _ = plan_and_compile_backward(spec, preset("sm_90"), lambda source, kind, target: (
        nvrtc_compile(source, f"{spec.name}_{kind}", target, kernel_name(spec, kind)), None), path="mma_sync")
    assert (plan.dkdv.warp_keys, plan.dkdv.block_m, plan.dkdv.block_n) == (warp_keys, block_m, 128)
    assert f"constexpr int WARP_KEYS = {warp_keys};" in sources["backward_dkdv"]
    # a 16-key candidate follows each 32-key one of the same tile, with one score tile less in shared memory
    ranked = [p for _, p, _ in pass_candidates("dkdv", spec, preset("sm_90")) if p and p.path == "mma_sync"]
    pairs = [(a, b) for a, b in zip(ranked, ranked[1:]) if (a.block_m, a.block_n, a.warps, a.chunk, a.stages)
             == (b.block_m, b.block_n, b.warps, b.chunk, b.stages)]
    assert pairs and all((a.warp_keys, b.warp_keys) == (32, 16) for a, b in pairs)
    assert all(a.smem_bytes - b.smem_bytes == a.block_n * (a.block_m + 8) * 2 for a, b in pairs)


@pytest.mark.parametrize("path", ["wgmma", "mma_sync"])
def test_dense_steps_mask_by_one_comparison(path):
    """A dense dK/dV step masks its bounds when its query tile starts below one constant of the CTA (every
    tile of the last key tile, else those crossing the causal diagonal). Written per step as `keys_tail ||
    diagonal`, the H200's causal wgmma pass ran 1.2x slower (BENCHMARKS.md, issue 17 round 8)."""
    from attngen.planner.backward import pass_candidates

    spec = attngen.Spec(head_dim=64, causal=True, backward=True)
    plan = next(p for _, p, _ in pass_candidates("dkdv", spec, preset("sm_90")) if p and p.path == path)
    source = render(spec, plan, "backward_dkdv")
    assert "const MaskMode mode = m_start < masked_below ? MASK_BOUNDS : MASK_NONE;" in source
    assert "keys_tail ? 0x7fffffff : CAUSAL ? n_start + BLOCK_N - 1 - causal_offset : -0x7fffffff" in source
