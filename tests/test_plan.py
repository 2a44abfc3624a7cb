"""The planner: budget model, candidate table, tile overrides, explain(), cost model (CPU only)."""

import importlib
import json
import math

import pytest

import attngen
from attngen import PlanError, Spec, SpecError
from attngen.planner.device import PRESETS, preset

# `attngen.plan` is the public function; the planner is the package attngen.planner (no name is shadowed).
plan_mod = importlib.import_module("attngen.planner.forward")
from attngen.planner.forward import REFERENCE_PROBLEM, candidates, explain, make_plan, predict_us, smem_bytes  # noqa: E402

HEAD_DIMS = list(range(8, 257, 8))
DTYPES = ["fp16", "bf16"]
ARCHS = ["sm_80", "sm_86", "sm_89", "sm_90"]
ELEM = 2
MAX_REGS = 255


def pad16(x):
    return -(-x // 16) * 16


def design_smem(d, dv, block_m, block_n, stages):
    """ARCHITECTURE.md's formula, recomputed independently of attngen.planner.forward."""
    dp, dvp = pad16(d), pad16(dv)
    return (block_m * (max(dp, dvp) + 8) + stages * block_n * ((dp + 8) + (dvp + 8))) * ELEM


def design_regs(dv, block_n, m_tiles):
    return m_tiles * (pad16(dv) // 2 + block_n // 2 + block_n // 4) + 64


def pad64(x):
    return -(-x // 64) * 64


def design_smem_wgmma(d, dv, block_m, block_n, stages):
    """The wgmma path: swizzled (unpadded) tiles, 8-byte mbarriers (5 per stage pair + 1, 16-aligned), 1 KB alignment."""
    barriers = -(-(1 + 4 * stages) * 8 // 16) * 16
    return 1024 + (block_m * pad64(d) + stages * block_n * (pad64(d) + pad64(dv))) * ELEM + barriers


def design_regs_wgmma(dv, block_n):
    """Per compute thread of a 64-row warpgroup: O (64 x dv), S (64 x block_n), packed P, over 128 threads."""
    return pad64(dv) // 2 + block_n // 2 + block_n // 4 + 48


def check_budget_formulas(p, d, dv):
    """The plan's smem and register estimates follow its path's formula."""
    if p.path == "wgmma":
        assert p.arch == "sm_90" and p.target == "sm_90a"
        assert (p.block_m, p.warps, p.mma_warps, p.m_tiles) == (128, 12, 8, 1)
        assert p.head_dim_padded == pad64(d) and p.head_dim_v_padded == pad64(dv) and dv <= d   # zero padding
        assert p.smem_bytes == design_smem_wgmma(d, dv, p.block_m, p.block_n, p.stages)
        assert p.regs_estimate == design_regs_wgmma(dv, p.block_n) <= 240
    else:
        assert p.path == "mma_sync" and p.target == p.arch and p.mma_warps == p.warps
        assert p.block_m == 16 * p.warps * p.m_tiles
        assert p.head_dim_padded == pad16(d) and p.head_dim_v_padded == pad16(dv)
        assert p.smem_bytes == design_smem(d, dv, p.block_m, p.block_n, p.stages)
        assert p.regs_estimate == design_regs(dv, p.block_n, p.m_tiles) <= MAX_REGS


def test_plan_function_and_module_are_distinct():
    assert callable(attngen.plan) and callable(attngen.render)       # the functions; the modules are planner/ and codegen/
    assert plan_mod.smem_bytes is smem_bytes
    assert plan_mod.make_plan is make_plan


# ---- every head dim x dtype x causal x arch --------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_plan_always_fits(d, dtype, causal, arch):
    spec = Spec(head_dim=d, dtype=dtype, causal=causal)
    dev = preset(arch)
    p = attngen.plan(spec, arch=arch)
    assert p is not None
    assert p.arch == arch
    assert p.smem_bytes <= dev.smem_per_block
    assert p.regs_estimate <= MAX_REGS
    assert p.block_n % 16 == 0 and p.block_n > 0
    assert p.head_dim_padded >= d and p.head_dim_padded % 16 == 0
    assert p.head_dim_v_padded >= d and p.head_dim_v_padded % 16 == 0
    assert p.ctas_per_sm >= 1
    assert p.stages >= 2
    assert p.threads == 32 * p.warps
    if p.path == "mma_sync":
        assert p.smem_bytes == smem_bytes(spec, p.block_m, p.block_n, p.stages)
    check_budget_formulas(p, d, d)
    # Hopper takes the wgmma path wherever it can serve the head dim; other GPUs never do
    assert (p.path == "wgmma") == (arch == "sm_90" and d % 32 == 0)      # padded to 64-column chunks
    assert p.bound in ("mma", "hbm", "smem")
    assert p.predicted_time_us > 0 and math.isfinite(p.predicted_time_us)
    # the public entry point and make_plan over the preset agree
    assert p == make_plan(spec, dev)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d,dv", [(64, 128), (128, 64), (8, 256), (256, 8), (96, 256), (256, 256), (40, 72)])
def test_plan_fits_with_head_dim_v(d, dv, arch):
    spec = Spec(head_dim=d, head_dim_v=dv, causal=True)
    dev = preset(arch)
    p = attngen.plan(spec, arch=arch)
    assert p.smem_bytes <= dev.smem_per_block
    check_budget_formulas(p, d, dv)


def test_plan_deterministic():
    spec = Spec(head_dim=128, causal=True)
    assert attngen.plan(spec, arch="sm_80") == attngen.plan(spec, arch="sm_80")


@pytest.mark.parametrize("arch", ARCHS)
def test_plan_to_dict_json(arch):
    p = attngen.plan(Spec(head_dim=128, dtype="fp16", causal=True, num_heads=8, num_kv_heads=2), arch=arch)
    d = p.to_dict()
    text = json.dumps(d)
    back = json.loads(text)
    assert back["block_m"] == p.block_m and back["block_n"] == p.block_n
    assert back["threads"] == 32 * p.warps
    assert back["smem_bytes"] == p.smem_bytes
    assert back["arch"] == arch


# ---- candidates -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_candidates(d, arch):
    dev = preset(arch)
    for dtype in DTYPES:
        for causal in (False, True):
            spec = Spec(head_dim=d, dtype=dtype, causal=causal)
            table = candidates(spec, dev)
            assert len(table) == len({(c.block_m, c.block_n, c.warps, c.stages, c.path) for c in table})
            assert any(c.path == "wgmma" for c in table) == (arch == "sm_90")
            fits = [c for c in table if c.plan is not None]
            rejected = [c for c in table if c.plan is None]
            assert fits, "at least one candidate fits"
            # the fitting ones come first
            assert table[:len(fits)] == fits
            for c in rejected:
                assert isinstance(c.reject, str) and c.reject.strip()
            for c in fits:
                assert c.reject == ""
                assert (c.plan.block_m, c.plan.block_n, c.plan.warps, c.plan.stages, c.plan.path) == \
                       (c.block_m, c.block_n, c.warps, c.stages, c.path)
                assert c.plan.smem_bytes <= dev.smem_per_block
                assert c.plan.regs_estimate <= MAX_REGS
            # ranked by predicted time (rank_key compares times rounded to 0.1 us, then regs, then smem)
            times = [round(c.plan.predicted_time_us, 1) for c in fits]
            assert times == sorted(times)
            assert fits[0].plan.predicted_time_us <= min(c.plan.predicted_time_us for c in fits) + 0.05 + 1e-9
            # the best candidate is the plan
            assert fits[0].plan == make_plan(spec, dev)
            for c in table:
                if c.path == "wgmma":
                    smem = design_smem_wgmma(d, d, c.block_m, c.block_n, c.stages)
                    assert (c.plan is None) == (d % 32 != 0 or smem > dev.smem_per_block
                                                or design_regs_wgmma(d, c.block_n) > 240), (c, smem)
                    continue
                smem = design_smem(d, d, c.block_m, c.block_n, c.stages)
                if c.block_m % (16 * c.warps) or c.block_m // (16 * c.warps) > 2 or c.block_n % 16:
                    assert c.plan is None
                    continue
                m_tiles = c.block_m // (16 * c.warps)
                if smem > dev.smem_per_block:
                    assert c.plan is None
                    assert f"by {smem - dev.smem_per_block} B" in c.reject, c.reject
                    assert str(smem) in c.reject and str(dev.smem_per_block) in c.reject
                elif design_regs(d, c.block_n, m_tiles) > MAX_REGS:
                    assert c.plan is None
                    assert "register" in c.reject
                else:
                    assert c.plan is not None, c.reject


def test_some_candidates_are_rejected_for_smem():
    """The budget checks are exercised: d=256 leaves exactly one candidate on 99 KB parts (at the budget
    to the byte), and on sm_90 some candidates fail on registers rather than shared memory."""
    fits = [c for c in candidates(Spec(head_dim=256), preset("sm_86")) if c.plan]
    assert [(c.block_m, c.block_n, c.warps, c.stages) for c in fits] == [(64, 32, 4, 2)]
    assert fits[0].plan.smem_bytes == preset("sm_86").smem_per_block
    table = candidates(Spec(head_dim=256), preset("sm_90"))
    assert any("shared memory" in c.reject for c in table)
    assert any("register" in c.reject for c in table)


# ---- tile overrides ---------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,d,tile", [
    ("sm_86", 256, {"block_m": 128, "block_n": 128, "warps": 4, "stages": 4}),
    ("sm_86", 256, {"block_m": 64, "block_n": 64, "warps": 4, "stages": 2}),
    ("sm_89", 128, {"block_m": 128, "block_n": 128, "warps": 8, "stages": 4}),
    ("sm_80", 256, {"block_m": 128, "block_n": 128, "warps": 4, "stages": 3}),
    ("sm_90", 256, {"block_m": 256, "block_n": 128, "warps": 8, "stages": 4}),
    ("sm_90", 256, {"block_m": 128, "block_n": 256, "warps": 8, "stages": 2}),
])
def test_tile_override_too_big(arch, d, tile):
    dev = preset(arch)
    spec = Spec(head_dim=d, tile=tile)
    stages = tile.get("stages", 2)
    smem = design_smem(d, d, tile["block_m"], tile["block_n"], stages)
    assert smem > dev.smem_per_block, "test setup: the override must not fit"
    excess = smem - dev.smem_per_block
    with pytest.raises(PlanError) as info:
        attngen.plan(spec, arch=arch)
    msg = str(info.value)
    assert f"by {excess} B" in msg
    assert arch in msg
    assert "tile override" in msg
    assert isinstance(info.value, ValueError)


def test_tile_override_too_big_exact_numbers():
    # (128*(256+8) + 4*128*((256+8)+(256+8))) * 2 = 608256 B; sm_86 budget 99*1024 = 101376 B.
    spec = Spec(head_dim=256, tile={"block_m": 128, "block_n": 128, "warps": 4, "stages": 4})
    with pytest.raises(PlanError, match=r"by 506880 B"):
        attngen.plan(spec, arch="sm_86")


@pytest.mark.parametrize("tile", [
    {"block_m": 64, "block_n": 16, "warps": 2, "stages": 2},   # m_tiles 2 with 2 warps: not in the grid
    {"block_m": 32, "block_n": 48, "warps": 1, "stages": 4},
    {"block_m": 128, "block_n": 64, "warps": 8, "stages": 4},
    {"block_m": 256, "block_n": 32, "warps": 16, "stages": 2},
])
@pytest.mark.parametrize("arch", ARCHS)
def test_tile_override_outside_grid_honoured(tile, arch):
    d = 64
    spec = Spec(head_dim=d, dtype="fp16", tile=tile)
    p = attngen.plan(spec, arch=arch)
    assert (p.block_m, p.block_n, p.warps, p.stages) == (tile["block_m"], tile["block_n"], tile["warps"], tile["stages"])
    assert p.m_tiles == tile["block_m"] // (16 * tile["warps"])
    assert p.smem_bytes == design_smem(d, d, p.block_m, p.block_n, p.stages)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d", [32, 64, 128, 192, 256])
def test_every_fitting_candidate_honoured_as_override(d, arch):
    dev = preset(arch)
    base = Spec(head_dim=d, causal=True)
    for c in candidates(base, dev):
        tile = {"block_m": c.block_m, "block_n": c.block_n, "warps": c.warps, "stages": c.stages, "path": c.path}
        spec = Spec(head_dim=d, causal=True, tile=tile)
        if c.plan is None:
            with pytest.raises(PlanError):
                attngen.plan(spec, arch=arch)
        else:
            p = attngen.plan(spec, arch=arch)
            assert (p.block_m, p.block_n, p.warps, p.stages) == (c.block_m, c.block_n, c.warps, c.stages)
            assert p == c.plan


@pytest.mark.parametrize("tile,arch,why", [
    ({"block_m": 128, "block_n": 128, "warps": 12, "path": "wgmma"}, "sm_80", "needs sm_90"),
    ({"block_m": 64, "block_n": 128, "warps": 12, "path": "wgmma"}, "sm_90", "block_m=64"),
    ({"block_m": 128, "block_n": 192, "warps": 12, "path": "wgmma"}, "sm_90", "registers per compute thread"),
    ({"block_m": 128, "block_n": 256, "warps": 12, "path": "wgmma"}, "sm_90", "shared memory"),
])
def test_wgmma_override_rejected(tile, arch, why):
    with pytest.raises(PlanError, match=why):
        attngen.plan(Spec(head_dim=128, tile=tile), arch=arch)


def test_wgmma_head_dims():
    """Head dims that are multiples of 32 take the wgmma path padded with zeros to 64-column chunks; others (or a
    wider V than K, or a KV cache's head dims off whole chunks) stay on mma.sync on Hopper."""
    for d, dv in ((96, 96), (32, 32), (160, 96), (224, 224)):
        p = attngen.plan(Spec(head_dim=d, head_dim_v=dv), arch="sm_90")
        assert p.path == "wgmma" and (p.head_dim_padded, p.head_dim_v_padded) == (pad64(d), pad64(dv))
    for d, dv in ((80, 80), (64, 128), (48, 48)):
        assert attngen.plan(Spec(head_dim=d, head_dim_v=dv), arch="sm_90").path == "mma_sync"
    with pytest.raises(PlanError, match="multiples of 32"):
        attngen.plan(Spec(head_dim=80, tile={"block_m": 128, "block_n": 128, "warps": 12, "path": "wgmma"}), arch="sm_90")
    with pytest.raises(PlanError, match="multiples of 64"):
        attngen.plan(Spec(head_dim=96, layout="kvcache", tile={"block_m": 128, "block_n": 128, "warps": 12,
                                                               "path": "wgmma"}), arch="sm_90")


def test_tile_path_validated():
    with pytest.raises(SpecError, match="tile.path"):
        Spec(head_dim=64, tile={"block_m": 128, "block_n": 64, "warps": 4, "path": "tcgen05"})


@pytest.mark.parametrize("tile,why", [
    ({"block_m": 48, "block_n": 64, "warps": 2}, "multiple of 16 rows"),
    ({"block_m": 192, "block_n": 64, "warps": 4}, "row tiles per warp"),
])
def test_tile_override_bad_shape(tile, why):
    with pytest.raises(PlanError, match=why):
        attngen.plan(Spec(head_dim=64, tile=tile), arch="sm_80")


def test_tile_override_too_many_registers():
    # m_tiles 2, block_n 256, d 16: 2*(8+128+64)+64 = 464 regs while the smem fits
    spec = Spec(head_dim=16, tile={"block_m": 128, "block_n": 256, "warps": 4, "stages": 2})
    assert design_smem(16, 16, 128, 256, 2) <= preset("sm_90").smem_per_block
    with pytest.raises(PlanError, match="registers"):
        attngen.plan(spec, arch="sm_90")


# ---- explain ----------------------------------------------------------------------------------------

def _chosen_row(text):
    rows = [line for line in text.splitlines() if "<- chosen" in line]
    assert len(rows) == 1, text
    assert text.count("<- chosen") == 1
    path, *numbers = rows[0].split()[:8]
    assert path in ("mma_sync", "wgmma")
    return [int(x) for x in numbers]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d", [8, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_explain(d, arch, causal):
    dev = preset(arch)
    spec = Spec(head_dim=d, causal=causal, dtype="fp16")
    text = explain(spec, dev)
    assert "Bc = ceil(M/4d)" in text
    m = dev.smem_per_block // 2
    bc = math.ceil(m / (4 * d))
    assert f"M = {m} elements" in text
    assert f"Bc = ceil(M/4d) = {bc}" in text
    assert f"Br = min(Bc, d) = {min(bc, d)}" in text
    p = make_plan(spec, dev)
    bm, bn, warps, stages, smem, regs, ctas = _chosen_row(text)
    assert (bm, bn, warps, stages, smem, regs, ctas) == \
           (p.block_m, p.block_n, p.warps, p.stages, p.smem_bytes, p.regs_estimate, p.ctas_per_sm)
    # every candidate is listed; rejected rows say why
    table = candidates(spec, dev)
    assert text.count("rejected: ") == sum(1 for c in table if c.plan is None)
    # each row names its kernel path; Hopper also states the wgmma budget
    assert f" {p.path} " in [line for line in text.splitlines() if "<- chosen" in line][0]
    assert ("wgmma  smem = " in text) == (arch == "sm_90")


@pytest.mark.parametrize("arch", ARCHS)
def test_explain_with_override(arch):
    tile = {"block_m": 64, "block_n": 32, "warps": 4, "stages": 3}
    spec = Spec(head_dim=64, tile=tile)
    text = explain(spec, preset(arch))
    assert "tile override" in text
    assert "Bc = ceil(M/4d)" in text
    assert _chosen_row(text)[:4] == [64, 32, 4, 3]


def test_explain_override_too_big_raises():
    spec = Spec(head_dim=256, tile={"block_m": 128, "block_n": 128, "warps": 4, "stages": 4})
    with pytest.raises(PlanError, match="by 506880 B"):
        explain(spec, preset("sm_86"))


# ---- arch -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sm_70", "sm_100", "sm_75", "", "ampere", "sm_8"])
def test_unknown_arch(arch):
    with pytest.raises(SpecError) as info:
        attngen.plan(Spec(head_dim=64), arch=arch)
    assert info.value.field == "arch"
    msg = str(info.value)
    assert "'arch'" in msg and repr(arch) in msg
    for known in ARCHS:
        assert known in msg


def test_presets_match_design():
    assert preset("sm_80").smem_per_block == 163 * 1024
    assert preset("sm_86").smem_per_block == 99 * 1024
    assert preset("sm_89").smem_per_block == 99 * 1024
    assert preset("sm_90").smem_per_block == 227 * 1024
    for dev in PRESETS.values():
        assert dev.regs_per_sm == 65536
        assert dev.max_regs_per_thread == 255


def test_sm_90a_uses_sm_90_budget():
    spec = Spec(head_dim=128)
    a, b = attngen.plan(spec, arch="sm_90a"), attngen.plan(spec, arch="sm_90")
    assert (a.block_m, a.block_n, a.warps, a.stages) == (b.block_m, b.block_n, b.warps, b.stages)


# ---- cost model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d", [16, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_predicted_faster(d, arch, dtype):
    dev = preset(arch)
    full, causal = Spec(head_dim=d, dtype=dtype), Spec(head_dim=d, dtype=dtype, causal=True)
    assert attngen.plan(causal, arch=arch).predicted_time_us < attngen.plan(full, arch=arch).predicted_time_us
    # and for the very same tiles
    for c in candidates(full, dev):
        if c.plan is None:
            continue
        cc = plan_mod.evaluate(causal, dev, c.block_m, c.block_n, c.warps, c.stages, c.path)
        assert cc.plan.predicted_time_us < c.plan.predicted_time_us
        assert cc.plan.predicted_flops == pytest.approx(c.plan.predicted_flops / 2)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("d", [8, 64, 128, 256])
@pytest.mark.parametrize("num_heads", [None, 8, 32])
def test_predicted_flops(d, arch, num_heads):
    spec = Spec(head_dim=d, num_heads=num_heads)
    p = attngen.plan(spec, arch=arch)
    b, s = REFERENCE_PROBLEM["batch"], REFERENCE_PROBLEM["seqlen_q"]
    assert REFERENCE_PROBLEM["seqlen_k"] == s
    h = num_heads or REFERENCE_PROBLEM["heads"]
    assert p.predicted_flops == 4 * b * h * s * s * d


@pytest.mark.parametrize("arch", ARCHS)
def test_predicted_hbm_bytes_fa2_loop_order(arch):
    d = 128
    spec = Spec(head_dim=d)
    p = attngen.plan(spec, arch=arch)
    b, s, h = REFERENCE_PROBLEM["batch"], REFERENCE_PROBLEM["seqlen_q"], REFERENCE_PROBLEM["heads"]
    qo = 2 * b * h * s * d * ELEM
    kv = 2 * b * h * s * d * ELEM
    assert p.predicted_hbm_bytes == qo + math.ceil(s / p.block_m) * kv


def test_predict_us_matches_plan():
    spec = Spec(head_dim=64, causal=True)
    dev = preset("sm_80")
    p = make_plan(spec, dev)
    ref = REFERENCE_PROBLEM
    assert predict_us(spec, p, dev, ref["batch"], ref["seqlen_q"], ref["seqlen_k"], ref["heads"]) == \
           pytest.approx(p.predicted_time_us)
    # a bigger problem takes longer
    assert predict_us(spec, p, dev, 8, 8192, 8192, 16) > p.predicted_time_us


def test_what_the_sm8x_presets_change_at_head_dim_128():
    """BENCHMARKS.md names what sm_86/sm_89 change in the plan (they cannot be measured here): their 99 KB of
    shared memory rejects the 128x64 forward tile by 3 KB, so both take 128x32 at one CTA per SM; the padded
    rows keep even a single-stage 128x32 tile (52224 B) from a second CTA, which FlashAttention-2's unpadded,
    swizzled 48 KB gets. sm_80 keeps 128x64."""
    from attngen.planner.forward import evaluate

    spec = Spec(head_dim=128, dtype="bf16", causal=True)
    assert (make_plan(spec, preset("sm_80")).block_m, make_plan(spec, preset("sm_80")).block_n) == (128, 64)
    for arch in ("sm_86", "sm_89"):
        device = preset(arch)
        chosen = make_plan(spec, device)
        assert (chosen.block_m, chosen.block_n, chosen.ctas_per_sm) == (128, 32, 1)
        wider = evaluate(spec, device, 128, 64, 8, 2)
        assert wider.plan is None and "by 3072 B" in wider.reject
        assert smem_bytes(spec, 128, 32, 1) == 52224 and 2 * 52224 > device.smem_per_sm


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_wide_heads_rank_resident_warps_on_mma_sync(arch):
    """At d256 the mma.sync forward's 64-row and 128-row tiles tie in the model (same ldmatrix bytes per
    query row); the tie goes to more resident warps: 64x64 on 4 warps ran 0.80x 128x64 on 8 on the H200."""
    device = preset(arch)
    for causal in (False, True):
        best = next(c.plan for c in candidates(Spec(head_dim=256, causal=causal), device)
                    if c.plan and c.plan.path == "mma_sync")
        assert best.ctas_per_sm * best.warps == 8, (best.block_m, best.block_n, best.warps, best.ctas_per_sm)


def test_wide_heads_take_80_key_tiles_on_hopper_except_over_a_cache():
    """d > 128 cannot hold 128-key wgmma tiles; 80 (FlashAttention-3's d256 tile) ran 1.03-1.11x 64 on the H200.
    A KV cache keeps 64 so that its pages hold whole tiles; d128 keeps 128."""
    device = preset("sm_90")
    assert make_plan(Spec(head_dim=256, causal=True), device).block_n == 80
    assert make_plan(Spec(head_dim=192), device).block_n == 80
    assert make_plan(Spec(head_dim=128), device).block_n == 128
    cache = Spec(head_dim=256, layout="kvcache", page_size=64)
    assert make_plan(cache, device).block_n == 64
