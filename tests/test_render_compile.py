"""Rendering and offline NVRTC compilation (no GPU, no driver): every variant compiles for sm_80 and
sm_90 with zero spill bytes under the chosen plan."""

from __future__ import annotations

import re
import struct

import jinja2
import pytest

import attngen
from attngen.codegen.render import environment, templates_dir
from attngen.codegen.compile import (Resources, atomic_write, cache_key, compile_cached, nvrtc_compile,
                             parse_cubin_resources, parse_ptxas_report)
from attngen.errors import CompileError
from attngen.codegen.render import kernel_name

HEAD_DIMS = (8, 32, 40, 64, 96, 128, 160, 192, 256)


def compiled(spec, arch):
    plan = attngen.plan(spec, arch=arch)
    source = attngen.render(spec, plan)
    return plan, source, nvrtc_compile(source, spec.name, plan.target, kernel_name(spec))


def built(spec, arch):
    """What `attngen build` keeps: the first ranked candidate that ptxas compiles without spilling."""
    from attngen.api import plan_and_compile
    from attngen.planner.device import preset

    compile_source = lambda source, plan: (nvrtc_compile(source, spec.name, plan.target, kernel_name(spec)), None)  # noqa: E731
    plan, source, (binary, _) = plan_and_compile(spec, preset(arch), compile_source)
    return plan, source, binary


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_every_variant_compiles_without_spills(d, dtype, causal, arch):
    spec = attngen.Spec(head_dim=d, dtype=dtype, causal=causal)
    plan, source, binary = compiled(spec, arch)
    r = binary.resources
    assert r.spill_bytes == 0 and r.stack_frame == 0, f"{spec.name} on {arch} spills: {r}"
    assert r.registers <= 255
    assert binary.cubin[:4] == b"\x7fELF" and ".entry " + kernel_name(spec) in binary.ptx
    # the tensor-core and async-copy instructions the design promises are really there
    if plan.path == "wgmma":      # Hopper: TMA into mbarrier-tracked stages, warpgroup MMAs, setmaxnreg
        assert arch == "sm_90" and d % 32 == 0 and binary.arch == "sm_90a"     # padded to 64-column chunks
        instructions = (f"wgmma.mma_async.sync.aligned.m64n{plan.block_n}k16.f32",
                        f"wgmma.mma_async.sync.aligned.m64n{plan.head_dim_v_padded}k16.f32",
                        "cp.async.bulk.tensor.4d.shared::cluster.global", "mbarrier.try_wait.parity",
                        "setmaxnreg.inc.sync.aligned.u32 240", "setmaxnreg.dec.sync.aligned.u32 24", "ex2.approx")
    else:
        assert not (arch == "sm_90" and d % 32 == 0)
        instructions = ("mma.sync.aligned.m16n8k16", "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
                        "ldmatrix.sync.aligned.m8n8.x4.trans", "cp.async.cg.shared.global", "ex2.approx")
    for instruction in instructions:
        assert instruction in binary.ptx, instruction
    assert (".f16.f16" if dtype == "fp16" else ".bf16.bf16") in binary.ptx


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("spec", [dict(head_dim=128, causal=True), dict(head_dim=64, head_dim_v=128, causal=True),
                                  dict(head_dim=96, deterministic=True), dict(head_dim=33),
                                  dict(head_dim=64, mask={"kind": "sliding_window", "left": 256, "right": 0},
                                       softcap=30.0)], ids=lambda s: attngen.Spec(**s).name)
def test_varlen_kernels_compile_without_spills(spec, arch):
    """Every kernel of a varlen spec (forward, backward passes, with the schedule kernel beside each) builds
    without spills; the schedule and the sequence lookups are in the sources."""
    from attngen.api import plan_and_compile_backward
    from attngen.planner.device import preset

    spec = attngen.Spec(**spec, layout="varlen")
    plan, source, binary = built(spec, arch)
    assert binary.resources.spill_bytes == 0 and kernel_name(spec, "varlen_schedule") in binary.ptx
    assert "tile_info[2 * scheduled]" in source and "tile_info[2 * t]" in source

    def compile_source(source, kind, target):
        return nvrtc_compile(source, spec.name, target, kernel_name(spec, kind)), None

    _, sources, results = plan_and_compile_backward(spec, preset(arch), compile_source)
    for name, (binary, _) in results.items():
        assert binary.resources.spill_bytes == 0, f"{name}: {binary.resources}"
        assert kernel_name(spec, "varlen_schedule") in binary.ptx and "cu_seqlens_q" in sources[name]


def test_uneven_head_dims_compile_without_spills():
    spec = attngen.Spec(head_dim=192, head_dim_v=128, dtype="bf16", causal=True)
    for arch in ("sm_80", "sm_90"):
        assert compiled(spec, arch)[2].resources.spill_bytes == 0


def test_source_header_states_spec_and_plan():
    spec = attngen.Spec(head_dim=96, dtype="fp16", causal=True, num_heads=8, num_kv_heads=2)
    plan = attngen.plan(spec, arch="sm_86")
    source = attngen.render(spec, plan)
    header = source.split("\n\n")[0]
    assert header.startswith("// Generated by attngen")
    for text in ("head_dim:      96", "dtype:         fp16", "causal:        True", "num_kv_heads:  2",
                 f"block_m:             {plan.block_m}", f"smem_bytes:          {plan.smem_bytes}"):
        assert text in header
    assert f"constexpr int BLOCK_N    = {plan.block_n};" in source
    assert "{{" not in source and "{%" not in source
    assert attngen.render(spec, plan) == source          # a pure function of (spec, plan)


def test_templates_use_strict_undefined(monkeypatch):
    env = environment()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.get_template("pieces/constants.cuh.j2").render(spec=attngen.Spec(head_dim=64))


def test_one_kernel_body_composed_of_pieces():
    entry = (templates_dir() / "forward.cu.j2").read_text()
    includes = re.findall(r'{% include "(pieces/[^"]+)" %}', entry)
    assert len(includes) >= 7
    for piece in includes:
        assert (templates_dir() / piece).is_file()


def test_ptxas_report_parsing():
    log = """ptxas info    : Compiling entry function 'other' for 'sm_90'
ptxas info    : Function properties for other
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers
ptxas info    : Compiling entry function 'mine' for 'sm_90'
ptxas info    : Function properties for mine
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 64 bytes smem
"""
    assert parse_ptxas_report(log, "mine") == Resources(168, 0, 0, 0, 64)
    assert parse_ptxas_report(log, "other").spill_bytes == 12
    assert parse_ptxas_report(log, "other").static_smem == 0        # not the next kernel's 64 bytes
    with pytest.raises(CompileError, match="no ptxas report for kernel 'absent'"):
        parse_ptxas_report(log, "absent")


def test_cubin_attributes_agree_with_the_ptxas_report():
    # the fallback used when NVRTC served the program from the CUDA compute cache and ptxas was skipped
    for d, arch in ((64, "sm_80"), (128, "sm_90"), (256, "sm_90")):
        spec = attngen.Spec(head_dim=d, causal=True)
        _, _, binary = compiled(spec, arch)
        from_cubin = parse_cubin_resources(binary.cubin, kernel_name(spec))
        assert from_cubin.registers == binary.resources.registers
        assert from_cubin.stack_frame == binary.resources.stack_frame
        assert from_cubin.spill_bytes is None


def test_cubin_is_a_complete_elf_image():
    _, _, binary = compiled(attngen.Spec(head_dim=64), "sm_90")
    cubin = binary.cubin
    e_phoff, e_shoff = struct.unpack_from("<QQ", cubin, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    assert len(cubin) >= max(e_phoff + e_phnum * e_phentsize, e_shoff + e_shnum * e_shentsize)


def test_compile_error_shows_log_and_source_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(CompileError) as info:
        nvrtc_compile('extern "C" __global__ void k() { undefined_thing(); }', "broken", "sm_90", "k")
    message = str(info.value)
    assert "undefined_thing" in message and "broken" in message
    path = re.search(r"source: (\S+\.cu)", message).group(1)
    assert "undefined_thing" in open(path).read()


def test_disk_cache_hits_and_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    spec = attngen.Spec(head_dim=32, dtype="fp16")
    source = attngen.render(spec, attngen.plan(spec, arch="sm_80"))
    first, path = compile_cached(source, spec.name, "sm_80", kernel_name(spec))
    assert path.parent.parent == tmp_path and path.is_file()
    again, path2 = compile_cached(source, spec.name, "sm_80", kernel_name(spec))
    assert path2 == path and again.resources == first.resources and again.cubin == first.cubin
    assert not list(tmp_path.rglob("*.tmp"))
    keys = {cache_key(source, "sm_80", ("-a",), "13.0"), cache_key(source, "sm_90", ("-a",), "13.0"),
            cache_key(source, "sm_80", ("-b",), "13.0"), cache_key(source, "sm_80", ("-a",), "13.1"),
            cache_key(source + " ", "sm_80", ("-a",), "13.0")}
    assert len(keys) == 5


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write(target, b"abc")
    assert target.read_bytes() == b"abc"


    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")              # the write fails half-way
    assert target.read_bytes() == b"abc" and not list(target.parent.glob("*.tmp"))


@pytest.mark.parametrize("arch", ["sm_80", "sm_86", "sm_90"])
def test_every_example_compiles_without_spills(arch):
    from pathlib import Path

    from attngen.tools.cli import build_artifacts
    from attngen.planner.device import preset

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
    for example in examples:
        spec = attngen.Spec.from_yaml(example)
        try:
            manifest = build_artifacts(spec, preset(arch))[".json"]
        except Exception as exc:   # a tile override may not fit a small-smem arch, FP8 needs Hopper: clear errors
            assert ("does not fit" in str(exc) and spec.tile is not None
                    or "needs Hopper" in str(exc) and spec.fp8 and arch != "sm_90"), exc
            continue
        assert b'"spill_bytes": 0' in manifest, example.name


MASK_SECTIONS = [
    {"kind": "runtime"},
    {"kind": "runtime", "block_size": 64},
    {"kind": "causal"},
    {"kind": "sliding_window", "left": 1024, "right": 0},
    {"kind": "longformer", "window": 256, "global_tokens": [0, 1]},
    {"kind": "bigbird", "window": 3, "global_tokens": [0], "random_blocks": 2, "block_size": 128, "seed": 0},
    {"kind": "bigbird", "window": 3, "global_tokens": [0, 1], "random_blocks": 3, "block_size": 64, "seed": 1},
    {"kind": "strided", "stride": 128},
    {"kind": "fixed", "stride": 128, "summary": 8},
    {"kind": "dilated", "window": 64, "dilation": 2},
    {"kind": "document", "seq_lens": [100, 300]},
    {"kind": "and", "of": [{"kind": "causal"}, {"kind": "sliding_window", "left": 512, "right": 0}]},
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("mask", MASK_SECTIONS, ids=lambda m: m["kind"] + str(m.get("block_size", "")))
def test_block_sparse_variants_compile_without_spills(mask, arch):
    spec = attngen.Spec(head_dim=128, dtype="bf16", mask=mask)
    plan, source, binary = built(spec, arch)
    pattern = spec.mask_pattern
    if pattern is None or pattern.table_block_size is not None:     # tiles lie inside one mask block
        rows, cols = spec.mask_block_size
        assert rows % plan.block_m == 0 and cols % plan.block_n == 0
    if pattern is None:                                              # runtime layout: block-CSR tensors
        assert "full_row_ptr" in source and "TILES_PER_MASK_BLOCK" in source and "return true;" in source
    else:                                                            # the mask as code, no index tensor
        assert "full_row_ptr" not in source and "list_key_tiles" in source
        kept, full = pattern.cuda_tile_expr()
        for expr in (kept, full):
            assert "return " + expr + ";" in source
        spans = pattern.cuda_spans()                                 # interval patterns: spans per row
        if spans is None:
            assert "return " + pattern.cuda_expr() + ";" in source
        else:
            assert "return {%s, %s};" % spans[:2] in source and "return {%s, %s};" % spans[2:] in source
        assert ("block_bits" in source) == (pattern.table_block_size is not None)
    assert binary.resources.spill_bytes == 0


MOD_SPECS = [
    dict(softcap=30.0),
    dict(alibi=True, causal=True),
    dict(softcap=50.0, alibi=True, mask={"kind": "sliding_window", "left": 256, "right": 0}),
    dict(score_mod="score * scale_by[h]", tensors={"scale_by": {"dtype": "float32", "shape": ["heads"]}}),
    dict(mask_mod="doc[q_idx] == doc[kv_idx]", tensors={"doc": {"dtype": "int32", "shape": ["seqlen_k"]}}),
    dict(mask_mod="(q_idx / 7) % 2 == (kv_idx / 7) % 2", mask={"kind": "causal"}),
    dict(mask_mod="kv_idx % 3 != 0", mask={"kind": "runtime"}),
    dict(score_mod="score - fabsf(bias[b * num_heads + h]) * (q_idx - kv_idx)", causal=True,
         tensors={"bias": {"dtype": "float32", "shape": ["batch", "heads"]}}),
]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mods", MOD_SPECS, ids=lambda m: "-".join(sorted(m)))
def test_score_and_mask_mods_compile_without_spills(mods, head_dim, arch):
    spec = attngen.Spec(head_dim=head_dim, dtype="bf16", **mods)
    plan, source, binary = built(spec, arch)
    assert binary.resources.spill_bytes == 0
    assert ("apply_score_mods" in source) == bool({"softcap", "alibi", "score_mod"} & set(mods))
    assert ("tanh_approx" in source) == ("softcap" in mods)
    for expr in (mods.get("score_mod"), mods.get("mask_mod")):
        if expr:
            assert expr in source
    for name in mods.get("tensors", {}):
        assert f"const float* __restrict__ {name}" in source or f"const int* __restrict__ {name}" in source


def test_causal_flag_with_a_mask_is_refused():
    with pytest.raises(attngen.SpecError, match="causal"):
        attngen.Spec(head_dim=64, causal=True, mask={"kind": "sliding_window", "left": 8})


def test_build_falls_back_when_ptxas_spills():
    from attngen.api import plan_and_compile
    from attngen.planner.device import preset

    spec = attngen.Spec(head_dim=64, dtype="bf16")
    seen = []

    def fake_compile(source, plan):
        seen.append((plan.block_m, plan.block_n, plan.warps, plan.stages))
        spills = 16 if len(seen) == 1 else 0
        return (type("B", (), {"resources": Resources(100, spills // 2, spills // 2, spills, 0)})(), None)

    chosen, source, _ = plan_and_compile(spec, preset("sm_90"), fake_compile)
    assert len(seen) == 2 and (chosen.block_m, chosen.block_n, chosen.warps, chosen.stages) == seen[1]
    with pytest.raises(attngen.PlanError, match="without spills"):
        plan_and_compile(spec, preset("sm_90"), lambda s, p: (type("B", (), {
            "resources": Resources(255, 4, 4, 8, 0)})(), None))



def test_build_passes_over_serialized_wgmma():
    """A candidate whose wgmma ptxas serialised (its note names the kernel, or a lambda inside it) is
    passed over like a spilling one; the note of another kernel is not this one's."""
    from attngen.api import plan_and_compile
    from attngen.planner.device import preset

    note = ("ptxas info    : (C7519) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
            "the presence of Extern calls in the function '_ZZ9mine_fwdENKUlvE_clEv'\n")
    report = ("ptxas info    : Compiling entry function 'mine_fwd' for 'sm_90a'\n"
              "ptxas info    : Function properties for mine_fwd\n"
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 168 registers\n")
    assert parse_ptxas_report(note + report, "mine_fwd").wgmma_serialized
    assert not parse_ptxas_report(note.replace("mine_fwd", "other") + report, "mine_fwd").wgmma_serialized
    assert not parse_ptxas_report(report, "mine_fwd").wgmma_serialized
    spec = attngen.Spec(head_dim=128, dtype="bf16", causal=True)
    seen = []

    def fake_compile(source, plan):
        seen.append(plan.path)
        return (type("B", (), {"resources": Resources(168, 0, 0, 0, 0, wgmma_serialized=plan.path == "wgmma")})(), None)

    chosen, _, _ = plan_and_compile(spec, preset("sm_90"), fake_compile)
    assert seen[0] == "wgmma" and chosen.path == "mma_sync"


def test_argument_block_lays_out_each_argument_by_its_type(monkeypatch):
    """The forward's launcher stores the arguments in one ctypes block and hands cuLaunchKernel an array
    of pointers to them; read them back through those pointers, as the driver would."""
    import ctypes

    import numpy as np
    from cupy.cuda import driver

    from attngen.runtime.launch import ArgumentBlock

    seen = []

    def fake_launch(handle, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        pointers = (ctypes.c_void_p * 5).from_address(params)
        seen.append((handle, (gx, gy, gz), (bx, by, bz), smem, stream, extra,
                     ctypes.c_uint64.from_address(pointers[0]).value, ctypes.c_int64.from_address(pointers[1]).value,
                     ctypes.c_int32.from_address(pointers[2]).value, ctypes.c_float.from_address(pointers[3]).value,
                     ctypes.c_int32.from_address(pointers[4]).value))

    monkeypatch.setattr(driver, "launchKernel", fake_launch)
    args = (np.uint64(2**63 + 5), np.int64(-7), np.int32(-3), np.float32(0.25), np.int32(9))
    block = ArgumentBlock(1234, (3, 2, 1), (128, 1, 1), 4096, args)
    block.launch(77)
    block.launch(0, (11,))                          # a later call with the same signature: new leading pointers
    assert seen[0] == (1234, (3, 2, 1), (128, 1, 1), 4096, 77, 0, 2**63 + 5, -7, -3, 0.25, 9)
    assert seen[1][4] == 0 and seen[1][6:] == (11, -7, -3, 0.25, 9)


def test_kernel_kinds_name_their_templates_and_suffixes():
    from attngen.codegen.render import KernelKind

    spec = attngen.Spec(head_dim=64, name="k")
    assert [kernel_name(spec, kind) for kind in KernelKind] == ["k_fwd", "k_bwd_dq", "k_bwd_dkdv", "k_bwd_delta",
                                                                 "k_bwd_dq_convert", "k_varlen_schedule", "k_decode",
                                                                 "k_kvcache_append", "k_decode_combine", "k_prefill",
                                                                 "k_v_transpose"]
    assert KernelKind.DECODE.template("mma_sync") == "decode.cu.j2"
    assert KernelKind.PREFILL.template("wgmma") == "forward_wgmma.cu.j2"       # the forward, over a cache's pages
    with pytest.raises(ValueError, match="prefill: no entry template on the mma_sync path"):
        KernelKind.PREFILL.template("mma_sync")
    assert KernelKind("backward_dkdv").template("wgmma") == "backward_dkdv_wgmma.cu.j2"
    assert KernelKind.FORWARD.template("mma_sync") == "forward.cu.j2"
    for kind in KernelKind:                       # every template a kind names exists
        for path in ("mma_sync", "wgmma"):
            try:
                name = kind.template(path)
            except ValueError:
                continue
            assert (templates_dir() / name).is_file(), name
    with pytest.raises(ValueError, match="backward_delta: no entry template"):
        KernelKind.BACKWARD_DELTA.template("mma_sync")
