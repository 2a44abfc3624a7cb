"""CPU tests of the KV-cache decode path (layout: kvcache): the spec's fields and what they refuse, the decode
plan and its split count, and the rendered kernels compiling for sm_80 and sm_90 without spills (NVRTC, no
GPU). The kernels' results are checked on the GPU (tests/test_gpu_kvcache.py)."""

from __future__ import annotations

import math

import pytest

import attngen
from attngen.codegen.compile import nvrtc_compile
from attngen.codegen.render import kernel_name, render
from attngen.errors import SpecError
from attngen.planner.decode import (DECODE_SMEM_TARGET, MAX_SPLITS, WAVE_FILL, decode_smem_bytes, decode_splits,
                                    make_decode_plan)
from attngen.planner.device import preset


def kv_spec(**fields):
    return attngen.Spec(**({"head_dim": 128, "layout": "kvcache"} | fields))


def test_spec_fields_and_names():
    assert kv_spec().page_size is None and kv_spec().name == "attn_d128_bf16_kvcache"
    assert kv_spec(page_size=16).name == "attn_d128_bf16_kvcache_page16"
    assert attngen.Spec.from_dict({"head_dim": 64, "layout": "kvcache", "page_size": 256}).page_size == 256
    window = kv_spec(mask={"kind": "and", "of": [{"kind": "causal"}, {"kind": "sliding_window", "left": 9}]})
    assert window.mask_pattern.cuda_spans() is not None


@pytest.mark.parametrize("fields,field", [
    (dict(page_size=0), "page_size"), (dict(page_size=257), "page_size"), (dict(page_size=True), "page_size"),
    (dict(page_size=16, layout="batch"), "page_size"),
    (dict(mask={"kind": "strided", "stride": 4}), "mask"), (dict(mask={"kind": "runtime"}), "mask"),
    (dict(mask={"kind": "or", "of": [{"kind": "causal"}, {"kind": "sliding_window", "left": 3}]}), "mask"),
    (dict(score_mod="score * 2.0"), "score_mod"), (dict(mask_mod="kv_idx >= 0"), "mask_mod"),
    (dict(backward=True), "backward"),
])
def test_spec_refuses_what_decode_does_not_cover(fields, field):
    with pytest.raises(SpecError) as info:
        kv_spec(**fields)
    assert info.value.field == field


def test_plan_fits_the_budget():
    for arch in ("sm_80", "sm_90"):
        for d in (32, 64, 128, 256):
            spec = kv_spec(head_dim=d)
            plan = make_decode_plan(spec, preset(arch))
            assert plan.smem_bytes == decode_smem_bytes(spec, plan.stages) <= preset(arch).smem_per_block
            assert plan.stages >= 2 and plan.cta_keys == plan.block_n * plan.warps
            assert plan.smem_bytes <= DECODE_SMEM_TARGET or plan.stages == 2


@pytest.mark.parametrize("batch,heads_kv,capacity", [(32, 8, 32768), (8, 8, 32768), (1, 8, 32768), (1, 1, 10 ** 6),
                                                     (256, 8, 4096), (1, 8, 64), (3, 5, 777)])
def test_split_count_fills_the_waves(batch, heads_kv, capacity):
    plan = make_decode_plan(kv_spec(), preset("sm_90"))
    sms, slots = 132, 132 * plan.ctas_per_sm
    s = decode_splits(plan, sms, batch, heads_kv, 1, capacity)
    useful = max(1, min(MAX_SPLITS, capacity // (4 * plan.cta_keys)))
    assert 1 <= s <= useful
    ctas = batch * heads_kv

    def fill(n):
        return ctas * n / (math.ceil(ctas * n / slots) * slots)
    if fill(s) < WAVE_FILL:           # none reaches the fill: the best one is taken
        assert all(fill(n) <= fill(s) for n in range(1, useful + 1))
    else:                              # the fewest that do
        assert all(fill(n) < WAVE_FILL for n in range(1, s))
    assert decode_splits(plan, sms, batch, heads_kv, 1, capacity, requested=5) == 5
    assert decode_splits(plan, sms, batch, heads_kv, 1, capacity, requested=10 ** 6) == MAX_SPLITS


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("fields", [
    dict(), dict(page_size=16), dict(page_size=1, causal=True), dict(page_size=256, softcap=30.0, alibi=True),
    dict(mask={"kind": "sliding_window", "left": 100, "right": 0}), dict(head_dim=64, dtype="fp16"),
    dict(head_dim=256, page_size=64), dict(head_dim=59, page_size=3), dict(head_dim=64, head_dim_v=128, page_size=128),
], ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()) or "plain")
def test_decode_kernels_compile_without_spills(fields, arch):
    spec = kv_spec(**fields)
    plan = make_decode_plan(spec, preset(arch))
    source = render(spec, plan, "decode")
    for kind in ("decode", "kvcache_append", "decode_combine"):
        assert f"{kernel_name(spec, kind)}(" in source
    assert ("__ldg(pages + first / PAGE_SIZE)" in source) == bool(spec.page_size and spec.page_size % plan.block_n == 0)
    binary = nvrtc_compile(source, spec.name, plan.target, kernel_name(spec, "decode"))
    r = binary.resources
    assert r.spill_bytes == 0 and r.stack_frame == 0 and r.registers > 64   # the decode kernel's report, not a helper's


@pytest.mark.parametrize("page_size,says", [(None, "contiguous"), (16, "one block-table read per warp slice"),
                                            (3, "one block-table read per row")])
def test_plan_explains_the_page_form(page_size, says):
    from attngen.planner.decode import explain_decode

    text = explain_decode(kv_spec(page_size=page_size), preset("sm_90"))
    assert says in text and "splits" in text and "stages" in text


@pytest.mark.parametrize("fields,gather", [
    (dict(), False), (dict(page_size=128, causal=True), False), (dict(page_size=256, softcap=30.0, alibi=True), False),
    (dict(page_size=16, causal=True), False), (dict(page_size=8), False), (dict(page_size=96), False),
    (dict(head_dim=64, dtype="fp16", page_size=64), False), (dict(page_size=3), True), (dict(page_size=12), True),
    (dict(head_dim=256, page_size=20), True), (dict(head_dim=64, page_size=36, causal=True), True),
], ids=lambda f: "-".join(f"{k}{v}" for k, v in f.items()) if isinstance(f, dict) else str(f))
def test_prefill_kernel_loads_tiles_by_box_or_gather(fields, gather):
    """On Hopper a kvcache spec also gets the prefill kernel (the wgmma forward over the cache): copy-engine
    boxes wherever a run of 8k rows divides both the page and the tile (or the cache is contiguous), else the
    producer warpgroup gathers rows with cp.async into the swizzled tile (more registers for it); none
    elsewhere."""
    from attngen.planner.decode import GATHER_PRODUCER_REGS, make_prefill_plan, prefill_loads

    spec = kv_spec(**fields)
    assert make_prefill_plan(spec, preset("sm_80")) is None
    plan = make_prefill_plan(spec, preset("sm_90"))
    loads = prefill_loads(spec.page_size, plan.block_n)
    assert plan.path == "wgmma" and loads.gather == gather
    source = render(spec, plan, "prefill")
    assert "const int seqlen_k = min(max(cache_seqlens[batch], 0) + seqlen_new, capacity);" in source
    assert ("cp_async_arrive(k_full(slot));" in source) == gather
    assert ("clear_values_past_end(n_tiles - 1, last);" in source) == (not gather)     # zero-fill does it
    assert (f"constexpr int PRODUCER_REGS = {GATHER_PRODUCER_REGS};" in source) == gather
    r = nvrtc_compile(source, spec.name, plan.target, kernel_name(spec, "prefill")).resources
    assert r.spill_bytes == 0 and r.stack_frame == 0 and not r.wgmma_serialized
    # setmaxnreg only moves registers within the CTA's launch-time pool: asking for more hangs the kernel
    assert (loads.producer_registers + 2 * loads.consumer_registers) * 128 <= r.registers * plan.threads


def test_plan_explains_the_prefill():
    from attngen.planner.decode import explain_decode

    assert "gathers each 128-key tile with 16-byte cp.async" in explain_decode(kv_spec(page_size=12), preset("sm_90"))
    assert "arrives as 8 copy-engine boxes of 16 rows" in explain_decode(kv_spec(page_size=16), preset("sm_90"))
    assert "arrives as 1 copy-engine box of 128 rows" in explain_decode(kv_spec(page_size=128), preset("sm_90"))
    assert "prefill: none on sm_80" in explain_decode(kv_spec(page_size=16), preset("sm_80"))


def test_cache_seqlens_int_is_checked_before_anything_else():
    import numpy as np

    q = np.zeros((2, 1, 8, 64), np.float16)
    with pytest.raises(ValueError, match="cache_seqlens: expected an int >= 0"):
        attngen.attention_with_kvcache(q, q, q, cache_seqlens=-3)
    with pytest.raises(ValueError, match=r"q: expected \[batch, seqlen_q, heads_q, head_dim\]"):
        attngen.attention_with_kvcache(q[0], q, q, cache_seqlens=5)
