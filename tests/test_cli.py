"""The command line, the examples, generated/ staying current, and the README's commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from attngen.tools.cli import build_artifacts, main
from attngen.codegen.compile import nvrtc_version
from attngen.planner.device import preset
from attngen.spec import Spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_build_writes_source_binary_and_manifest(tmp_path):
    result = run("build", ROOT / "examples" / "gpt2_causal_fp16.yaml", "-o", tmp_path, "--arch", "sm_80")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"gpt2_causal_fp16.{s}" for s in ("cu", "cubin", "json", "ptx")]
    manifest = json.loads((tmp_path / "gpt2_causal_fp16.json").read_text())
    assert manifest["spec"]["head_dim"] == 64 and manifest["plan"]["arch"] == "sm_80"
    assert manifest["resources"]["spill_bytes"] == 0 and manifest["resources"]["registers"] > 0
    assert manifest["nvrtc_version"] == nvrtc_version()
    assert "0 spill bytes" in result.output


def test_plan_prints_the_table_with_the_chosen_row(tmp_path):
    result = run("plan", ROOT / "examples" / "llama_gqa_bf16.yaml", "--arch", "sm_86")
    assert result.exit_code == 0, result.output
    assert "Bc = ceil(M/4d)" in result.output and result.output.count("<- chosen") == 1
    assert "rejected:" in result.output


@pytest.mark.parametrize("text,field", [
    ("head_dim: 300\n", "head_dim"),
    ("head_dim: 64\ndtype: fp32\n", "dtype"),
    ("head_dim: 64\nwindow: 3\n", "window"),
    ("head_dim: 64\ncausal: maybe\n", "causal"),
    ("head_dim: [64\n", "<yaml>"),
    ("head_dim: 256\ntile: {block_m: 256, block_n: 128, warps: 8, stages: 4}\n", "tile override"),
])
def test_bad_spec_exits_2_with_one_line(tmp_path, text, field):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    out_dir = tmp_path / "out"
    for command in (["build", path, "-o", out_dir, "--arch", "sm_90"], ["plan", path, "--arch", "sm_90"]):
        result = run(*command)
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and field in lines[0], result.output
    assert not out_dir.exists(), "nothing may be written for a bad spec"


def test_oversized_tile_error_says_by_how_many_bytes(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("head_dim: 256\ntile: {block_m: 256, block_n: 128, warps: 8, stages: 4}\n")
    result = run("plan", path, "--arch", "sm_86")
    assert re.search(r"by \d+ B", result.output), result.output


def test_bad_arch_and_missing_file(tmp_path):
    result = run("plan", ROOT / "examples" / "d256_bf16.yaml", "--arch", "sm_70")
    assert result.exit_code == 2 and "--arch" in result.output
    result = run("build", tmp_path / "absent.yaml", "--arch", "sm_90")
    assert result.exit_code == 2 and "absent.yaml" in result.output


def without_file_paths(ptx: bytes) -> bytes:
    """-lineinfo puts the absolute path of the build folder into the PTX's .file directives."""
    return re.sub(rb'(?m)^\s*\.file\s.*$', b"", ptx)


def ptx_shape(ptx: bytes):
    """(entry names, .target line, parameter declarations) of a PTX file."""
    text = without_file_paths(ptx).decode()
    return (re.findall(r"\.entry\s+(\w+)", text), re.findall(r"(?m)^\.target.*$", text),
            re.findall(r"\.param\s+[.\w]+\s+\w+", text))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_generated_is_current(example):
    spec = Spec.from_yaml(example)
    folder = ROOT / "generated"
    manifest = json.loads((folder / f"{spec.name}.json").read_text())
    artifacts = build_artifacts(spec, preset(manifest["plan"]["arch"]))
    hint = "generated/ is stale: run `attngen build <spec> -o generated --arch sm_90` for every example"
    for suffix in (s for s in artifacts if s.endswith(".cu")):      # the forward's, and the backward's if asked
        assert (folder / f"{spec.name}{suffix}").read_bytes() == artifacts[suffix], hint
    fresh = json.loads(artifacts[".json"])
    for key in ("spec", "plan", "source_sha256", "attngen_version"):
        assert manifest[key] == fresh[key], f"{key}: {hint}"
    if manifest["nvrtc_version"] == fresh["nvrtc_version"]:   # binaries depend on the compiler version
        assert manifest["resources"]["registers"] == fresh["resources"]["registers"], hint
        # NVVM's output is not bit-stable for every kernel (predicate numbering of the pattern kernels
        # differs between runs of the same source), so the PTX is compared by its shape: one entry of the
        # same name, the same target and parameters. The .cu above is the exact check.
        committed = ptx_shape((folder / f"{spec.name}.ptx").read_bytes())
        assert committed == ptx_shape(artifacts[".ptx"]) and committed[0], hint
    assert fresh["resources"]["spill_bytes"] == 0


def test_every_example_has_generated_output():
    from attngen.planner.backward import pass_kinds

    specs = [Spec.from_yaml(p) for p in EXAMPLES]
    names = {s.name for s in specs} | {f"{s.name}_bwd_{kind}" for s in specs if s.backward for kind in pass_kinds(s)}
    names |= {f"{s.name}_prefill" for s in specs if s.layout == "kvcache"}       # Hopper's chunked-prefill kernel
    assert len(EXAMPLES) >= 3 and any(s.backward for s in specs) and any(s.deterministic for s in specs)
    generated = {p.stem for p in (ROOT / "generated").glob("*.cu")}
    assert generated == names


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m venv .*)$", readme, flags=re.M)
    assert len(commands) >= 2, "README starts with the install+build and install+test commands"
    assert "attngen build examples/" in commands[0]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines
    assert (ROOT / "examples" / commands[0].split("attngen build ")[1].split()[0].split("/")[1]).is_file()


def test_python_module_entry_point():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "attngen", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "attngen" in done.stdout
