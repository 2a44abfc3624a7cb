"""GPU tests of the tools around the kernels: `attngen bench` (a spec, the flash suite, JSON and plot),
`attngen tune` (the entry it writes is what build() then uses), and CUDA-graph capture of a call."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import attngen
from attngen.tools.cli import main

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def test_bench_a_spec_writes_json_and_a_plot(tmp_path):
    out, png = tmp_path / "rows.json", tmp_path / "plot.png"
    result = CliRunner().invoke(main, ["bench", "examples/llama_gqa_bf16.yaml", "--seqlens", "256,512",
                                       "--tokens", "1024", "--peers", "sdpa_flash,sdpa_efficient",
                                       "--json", str(out), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert {(r["seqlen"], r["mode"]) for r in rows} == {(s, m) for s in (256, 512) for m in ("fwd", "fwd+bwd")}
    for r in rows:       # GQA 32:8 with backward: attngen and both peers ran
        assert r["attngen"] > 0 and r["sdpa_flash"] > 0 and r["sdpa_efficient"] > 0 and r["heads_kv"] == 8
        assert 0 < r["attngen_roofline"] < 1
    assert png.read_bytes()[:4] == b"\x89PNG" and "/flash" in result.output


def test_bench_suite_and_a_masked_spec_with_flex(tmp_path):
    result = CliRunner().invoke(main, ["bench", "--suite", "flash", "--seqlens", "512", "--peers", "sdpa_cudnn",
                                       "--no-backward"])
    assert result.exit_code == 0, result.output
    assert result.output.count(" fwd ") == 4                                 # d 64/128 x causal or not
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(main, ["bench", "examples/document_fp16.yaml", "--seqlens", "4096", "--tokens",
                                       "4096", "--peers", "sdpa_flash,flex", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert row["flex"] > 0 and row["sdpa_flash"] is None and "SDPA" in row["sdpa_flash_note"]


def test_tune_remembers_a_winner_that_build_uses(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path))
    spec_path = tmp_path / "s.yaml"
    spec_path.write_text("name: tune_test\nhead_dim: 64\ndtype: bf16\ncausal: true\nbackward: true\n")
    result = CliRunner().invoke(main, ["tune", str(spec_path), "--seqlen", "1024", "--tokens", "4096", "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "forward: fastest" in result.output and "backward_dkdv: fastest" in result.output
    from attngen.tuned import load_tuned

    spec = attngen.Spec.from_yaml(spec_path)
    winners = load_tuned(spec, torch.cuda.get_device_name())
    assert set(winners) == {"forward", "backward_dkdv"}
    kernel = attngen.build(spec)
    from attngen.tuned import forward_key

    assert forward_key(kernel.plan) == winners["forward"]
    assert "mma_sync" in result.output and "wgmma" in result.output    # both paths' best are measured on Hopper
    bwd = attngen.build_backward(spec).plan.dkdv
    from attngen.tuned import backward_key

    assert backward_key(bwd) == winners["backward_dkdv"]


def test_cuda_graph_capture_of_a_call():
    gen = torch.Generator(device="cuda").manual_seed(0)
    static = [torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attngen.attention(*static, causal=True)          # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attngen.attention(*static, causal=True)
    for x in static:
        x.copy_(torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, attngen.attention(*static, causal=True))


def test_repeated_calls_reuse_the_launch_and_still_check_their_inputs():
    """The second call with one input signature takes the remembered argument block: fresh pointers, the
    same answer as the general path, and misaligned inputs still refused."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    make = lambda: [torch.randn(2, 200, 4, 64, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
                    for _ in range(3)]
    first, second = make(), make()
    attngen.attention(*first, causal=True)
    again = attngen.attention(*second, causal=True)                     # the remembered signature
    kernel = attngen.build(attngen.api.spec_for_inputs(*second, True))
    assert len(kernel._signatures) >= 1
    kernel._signatures.clear()
    assert torch.equal(again, kernel(*second)[0])                       # the general path: same result
    q, k, v = second
    base = torch.randn(2 * 200 * 4 * 64 + 1, device="cuda", dtype=torch.bfloat16, generator=gen)
    misaligned = base[1:].view(2, 200, 4, 64)                           # same signature, pointer off by 2 bytes
    assert misaligned.stride() == q.stride()
    with pytest.raises(ValueError, match="16-byte aligned"):
        attngen.attention(misaligned, k, v, causal=True)
    shifted = torch.randn(2, 200, 4, 72, device="cuda", dtype=torch.bfloat16, generator=gen)[..., 8:]
    out = attngen.attention(shifted, k, v, causal=True)                # another signature (rows of 72)
    assert torch.equal(out, kernel(shifted.contiguous(), k, v)[0])
