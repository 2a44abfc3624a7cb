"""CPU tests of `attngen bench` and `attngen tune`: the work counted, the suite's shapes, argument errors
(raised before anything touches a GPU), the table's ratios, the tuner's cache entries and build's use
of them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

import attngen
from attngen.tools.benchmark import Case, case_flops, format_rows, suite_cases, visible_pairs
from attngen.tools.cli import main
from attngen.planner.device import preset


def test_visible_pairs_count_what_the_mask_keeps():
    assert visible_pairs(attngen.Spec(head_dim=64), 100) == 100 * 100
    assert visible_pairs(attngen.Spec(head_dim=64, causal=True), 100) == 100 * 101 / 2
    spec = attngen.Spec(head_dim=64, mask={"kind": "sliding_window", "left": 7, "right": 3})
    i, j = np.arange(50)[:, None], np.arange(50)[None, :]
    assert visible_pairs(spec, 50) == np.sum((j >= i - 7) & (j <= i + 3))
    layout = attngen.Spec(head_dim=64, mask={"kind": "document", "seq_lens": [30, 20]})
    assert visible_pairs(layout, 50) == 30 * 30 + 20 * 20


def test_case_flops_count_both_head_dims():
    spec = attngen.Spec(head_dim=64, head_dim_v=128, causal=True)
    assert case_flops(Case(spec, 2, 10, 3, 3)) == 2.0 * 2 * 3 * 55 * (64 + 128)
    dense = attngen.Spec(head_dim=128)
    assert case_flops(Case(dense, 1, 4096, 16, 16)) == 4.0 * 16 * 4096 * 4096 * 128   # FlashAttention's count


def test_flash_suite_is_flashattentions_benchmark_shapes():
    cases = suite_cases("flash")
    assert len(cases) == 2 * 2 * 6
    for c in cases:
        assert c.batch * c.seqlen == 16384 and c.heads * c.spec.head_dim == 2048 and c.spec.backward
    assert {c.seqlen for c in cases} == {512, 1024, 2048, 4096, 8192, 16384}
    assert {(c.spec.head_dim, c.spec.causal) for c in cases} == {(64, False), (64, True), (128, False), (128, True)}
    with pytest.raises(ValueError, match="flash"):
        suite_cases("other")
    wide = suite_cases("flash", seqlens=[4096], head_dims=[64, 256])        # --head-dims adds d256's rows
    assert [(c.spec.head_dim, c.heads, c.batch) for c in wide] == [(64, 32, 4), (64, 32, 4), (256, 8, 4), (256, 8, 4)]


@pytest.mark.parametrize("args,message", [
    ([], "SPEC.yaml or --suite"),
    (["examples/gpt2_causal_fp16.yaml", "--suite", "flash"], "one of them"),
    (["--suite", "flash", "--seqlens", "1k"], "--seqlens"),
    (["--suite", "flash", "--seqlens", "0"], "--seqlens"),
    (["--suite", "flash", "--peers", "sdpa_flash,xformers"], "--peers"),
    (["--suite", "flash", "--plot", "out.svg"], "--plot"),
    (["--suite", "flash", "--head-dims", "64,300"], "--head-dims"),
    (["--suite", "flash", "--head-dims", "d128"], "--head-dims"),
    (["examples/gpt2_causal_fp16.yaml", "--head-dims", "64"], "--suite flash only"),
    (["missing.yaml"], "cannot read the spec"),
])
def test_bench_argument_errors_name_the_option(args, message):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_tune_argument_errors():
    result = CliRunner().invoke(main, ["tune", "examples/gpt2_causal_fp16.yaml", "--top", "0"])
    assert result.exit_code == 2 and "--top" in result.output


def test_format_rows_gives_ratios_and_the_roofline_fraction():
    row = dict(gpu="GPU", spec="s", mode="fwd", seqlen=4096, attngen=300.0, sdpa_flash=330.0, sdpa_cudnn=None,
               flex=400.0, attngen_roofline=300.0 / 790, peak_tflops=790.0)
    text = format_rows([row])
    line = next(l for l in text.splitlines() if l.startswith("s "))
    numbers = line.split()
    assert numbers[:4] == ["s", "fwd", "4096", "300.0"]
    assert "0.91" in numbers and "0.75" in numbers and "0.38" in numbers      # /flash, /flex, roofline
    assert "sdpa_cudnn" not in text                                           # a peer that never ran
    assert "fp8" not in text
    with_fp8 = format_rows([row | {"attngen_fp8": 480.0}])
    assert "fp8/bf16" in with_fp8 and with_fp8.splitlines()[2].split()[-2:] == ["480.0", "1.60"]


def test_plot_rows_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from attngen.tools.benchmark import plot_rows

    rows = [dict(gpu="GPU", spec="s", mode=m, seqlen=n, attngen=100.0 + n / 100, sdpa_flash=120.0)
            for m in ("fwd", "fwd+bwd") for n in (1024, 2048, 4096)]
    plot_rows(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_entries_merge_and_put_the_winner_first(tmp_path, monkeypatch):
    from attngen.tuned import forward_key, load_tuned, save_tuned, tuned_first, tuned_path

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    spec = attngen.Spec(head_dim=64, causal=True)
    assert load_tuned(spec, "GPU A") == {}
    save_tuned(spec, "GPU A", {"forward": [64, 64, 4, 2]}, [{"kind": "forward", "config": [64, 64, 4, 2]}])
    save_tuned(spec, "GPU A", {"backward_dkdv": [64, 128, 8, 64, 2]}, [{"kind": "backward_dkdv"}])
    assert load_tuned(spec, "GPU A") == {"forward": [64, 64, 4, 2], "backward_dkdv": [64, 128, 8, 64, 2]}
    entry = json.loads(tuned_path(spec, "GPU A").read_text())
    assert [m["kind"] for m in entry["measurements"]] == ["forward", "backward_dkdv"]
    assert not list((tmp_path / "tuned").glob("*.tmp"))                           # atomic writes leave nothing
    assert load_tuned(spec, "GPU B") == {} and tuned_path(spec, "GPU B") != tuned_path(spec, "GPU A")
    tuned_path(spec, "GPU B").write_text("{not json")
    assert load_tuned(spec, "GPU B") == {}                                      # a broken entry is ignored

    from attngen.planner.forward import candidates

    ranked = [c.plan for c in candidates(spec, preset("sm_90")) if c.plan]
    last = forward_key(ranked[-1])
    assert forward_key(tuned_first(ranked, last, forward_key)[0]) == last
    assert tuned_first(ranked, None, forward_key) == ranked
    assert tuned_first(ranked, [1, 2, 3, 4], forward_key) == ranked           # a winner no longer offered


def test_build_path_compiles_the_tuned_winner_first(tmp_path, monkeypatch):
    """plan_and_compile (what build() runs) tries the remembered winner for this GPU before the model's pick."""
    from attngen.api import plan_and_compile
    from attngen.codegen.compile import nvrtc_compile
    from attngen.planner.forward import candidates
    from attngen.codegen.render import kernel_name
    from attngen.tuned import forward_key, save_tuned

    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    spec = attngen.Spec(head_dim=64, causal=True)
    device = dataclasses.replace(preset("sm_90"), name="Test GPU")
    ranked = [c.plan for c in candidates(spec, device) if c.plan]
    compile_source = lambda source, plan: (nvrtc_compile(source, spec.name, plan.target, kernel_name(spec)), None)  # noqa: E731
    untuned, _, _ = plan_and_compile(spec, device, compile_source)
    assert untuned == ranked[0]
    save_tuned(spec, "Test GPU", {"forward": forward_key(ranked[2])}, [])
    tuned, _, _ = plan_and_compile(spec, device, compile_source)
    assert tuned == ranked[2]


def test_decode_rows_format_bandwidth_and_ratios():
    """`attngen bench --suite decode`'s table from rows (no GPU): each column's GB/s, fraction of the peak and
    time; attngen / cuDNN; a peer that refused a shape prints '-'."""
    from attngen.tools.benchmark import format_decode_rows

    row = {"batch": 32, "seqlen_k": 32768, "heads_q": 32, "heads_kv": 8, "head_dim": 128, "gpu": "H200",
           "attngen_page0_us": 1144.0, "attngen_page0_gbps": 3754.0, "attngen_page16_us": 1162.0,
           "attngen_page16_gbps": 3697.0, "sdpa_flash_us": None, "sdpa_flash_gbps": None,
           "sdpa_cudnn_us": 1085.0, "sdpa_cudnn_gbps": 3959.0}
    text = format_decode_rows({"copy_peak_gbps": 4221.0, "rows": [row]})
    assert "4221 GB/s copy peak" in text and "sdpa_flash" not in text.splitlines()[1]
    line = text.splitlines()[2]
    assert "3754 (0.89)" in line and "1144 us" in line and line.rstrip().endswith("0.95")
    assert text.splitlines()[-1] == "# H200, 32 query / 8 KV heads, d128, bf16"
    assert "CUDA graphs" not in text                  # no graph timings: one table
    row |= {"attngen_page0_graph_us": 1020.0, "attngen_page0_graph_gbps": 4210.0, "sdpa_cudnn_graph_us": 1010.0,
            "sdpa_cudnn_graph_gbps": 4252.0}
    lines = format_decode_rows({"copy_peak_gbps": 4221.0, "rows": [row]}).splitlines()
    assert "in CUDA graphs, no host time" in lines[3] and "attngen_page16" not in lines[4]
    assert "4210 (1.00)" in lines[5] and lines[5].rstrip().endswith("0.99")
