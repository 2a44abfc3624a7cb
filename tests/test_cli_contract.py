"""The command line keeps its contract (issue 12, finding 9): a bad spec, argument or environment is one line
and exit code 2, never a traceback; a failed build leaves no partial outputs; an unusable cache folder (or
HOME) does not stop `build`, which needs no GPU."""

from __future__ import annotations

import errno
import importlib
import os
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from attngen.tools import cli
from attngen.tools.cli import main
from attngen.codegen.compile import nvrtc_compile

from conftest import gpu_count

render_mod = importlib.import_module("attngen.codegen.render")   # `attngen.codegen.render` is the function of that name
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gpt2_causal_fp16.yaml"
NAME = "gpt2_causal_fp16"
OUTPUTS = [f"{NAME}.{s}" for s in ("cu", "cubin", "json", "ptx")]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result, *fragments):
    """Exit code 2, one line of output naming each fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


# ---- commands that need a GPU (and PyTorch) -----------------------------------------------------------

@pytest.mark.skipif(gpu_count() > 0, reason="tests the no-GPU path")
def test_check_without_a_gpu_is_one_line():
    one_line_error(run("check", EXAMPLE), "check", "GPU")


@pytest.mark.skipif(gpu_count() > 0 and has_torch(), reason="needs a machine without a GPU or without PyTorch")
@pytest.mark.parametrize("args", [["bench", EXAMPLE], ["tune", EXAMPLE], ["bench", "--suite", "flash"]])
def test_bench_and_tune_without_gpu_or_torch_are_one_line(args):
    line = one_line_error(run(*args), args[0])
    assert "GPU" in line or "PyTorch" in line


# ---- the spec file ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,fragment", [
    (b"head_dim: 64\nname: caf\xe9\n", "UTF-8"),
    (b"head_dim: 64\nhead_dim: 128\n", "head_dim"),
    (b"head_dim: 64\nmask: {kind: causal, block_size: [64]}\n", "mask.block_size"),
    (b"head_dim: 64\nname: \"attn\\n\"\n", "name"),
    (b"head_dim: 64\nscore_mod: 'score + scale[h]'\ntensors: {scale: {dtype: float32, shape: [heads]}}\n", "tensors"),
])
def test_bad_spec_files_are_one_line(tmp_path, raw, fragment):
    path = tmp_path / "bad.yaml"
    path.write_bytes(raw)
    for command in (["build", path, "-o", tmp_path / "out", "--arch", "sm_80"], ["plan", path, "--arch", "sm_80"]):
        one_line_error(run(*command), fragment)
    assert not (tmp_path / "out").exists()


def test_arch_with_extra_suffix_is_one_line(tmp_path):
    line = one_line_error(run("plan", EXAMPLE, "--arch", "sm_90aaa"), "--arch", "sm_90aaa")
    assert "sm_90a" in line.split("allowed:")[1]
    assert run("plan", EXAMPLE, "--arch", "sm_90a").exit_code == 0


def test_click_usage_errors_are_one_line(tmp_path):
    one_line_error(run("build"), "SPEC.yaml")
    one_line_error(run("build", EXAMPLE, "--no-such-option"), "--no-such-option")
    one_line_error(run("build", tmp_path), "SPEC.yaml", "is a directory")   # a folder given as the spec


# ---- build's output folder ------------------------------------------------------------------------------

def build(out, *extra):
    return run("build", EXAMPLE, "-o", out, "--arch", "sm_80", *extra)


def test_out_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    one_line_error(build(tmp_path / "taken"), "-o", "is a file")
    assert (tmp_path / "taken").read_text() == "mine"


def test_out_under_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    one_line_error(build(tmp_path / "taken" / "sub"), "-o", "under the file")


def test_name_clash_with_a_folder_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    (out / f"{NAME}.cubin").mkdir(parents=True)
    one_line_error(build(out), "-o")
    assert sorted(p.name for p in out.iterdir()) == [f"{NAME}.cubin"]          # no .cu, .ptx, .json, no temp folder


def test_full_disk_leaves_no_partial_outputs(tmp_path, monkeypatch):
    real = pathlib.Path.write_bytes

    def full(self, data):
        if self.suffix == ".cubin":                               # the .cu was written; the disk fills up now
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "new" / "out"
    one_line_error(build(out), "-o", "No space left")
    assert not (tmp_path / "new").exists()                       # the folders it made are gone too


def test_failed_build_keeps_the_previous_outputs(tmp_path, monkeypatch):
    out = tmp_path / "a" / "out"
    assert build(out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS      # no staging folder left behind
    before = {name: (out / name).read_bytes() for name in OUTPUTS}
    real = os.replace

    def fail_on_json(src, dst):
        if str(src).endswith(".json"):              # placing the new manifest; putting back the old one works
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(dst))
        return real(src, dst)

    monkeypatch.setattr(cli.os, "replace", fail_on_json)
    one_line_error(build(out), "-o")
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    assert {name: (out / name).read_bytes() for name in OUTPUTS} == before


def test_unwritable_out_folder_is_one_line(tmp_path, monkeypatch):
    # What a read-only folder does to the temporary folder (chmod does not stop root, who runs the tests).
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(cli.tempfile, "mkdtemp", refuse)
    out = tmp_path / "out"
    one_line_error(build(out), "-o", "Permission denied")
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_read_only_out_folder_is_one_line(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        one_line_error(build(out), "-o")
        assert not list(out.iterdir())
    finally:
        out.chmod(0o755)


# ---- NVRTC and the caches ---------------------------------------------------------------------------------

def test_nvrtc_failure_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "cache"))

    def broken(source, *args, **kwargs):
        return nvrtc_compile(source + "\nstatic_assert(false, \"deliberately broken\");\n", *args, **kwargs)

    monkeypatch.setattr(cli, "nvrtc_compile", broken)
    out = tmp_path / "out"
    line = one_line_error(build(out), "NVRTC failed", "error")
    assert "deliberately broken" in line
    assert not out.exists()
    saved = list((tmp_path / "cache" / "failed").glob("*.cu"))
    assert saved and saved[0].with_suffix(".log").is_file()


def test_unusable_cache_folder_still_builds(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("ATTNGEN_CACHE_DIR", str(tmp_path / "file" / "cache"))
    render_mod.environment.cache_clear()                         # make Jinja pick its bytecode folder again
    try:
        result = build(tmp_path / "out")
    finally:
        render_mod.environment.cache_clear()
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    warnings = [line for line in result.output.splitlines() if "cannot write the cache folder" in line]
    assert len(warnings) == 1, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == OUTPUTS


def test_unwritable_home_still_builds(tmp_path):
    """CuPy's import makes ~/.cupy/kernel_cache; with HOME a file that failed inside `import cupy`."""
    (tmp_path / "home").write_text("not a folder")
    env = {k: v for k, v in os.environ.items() if k not in ("ATTNGEN_CACHE_DIR", "CUPY_CACHE_DIR")}
    env |= {"HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "attngen", "build", str(EXAMPLE), "-o", str(tmp_path / "out"),
                           "--arch", "sm_80"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == OUTPUTS
    assert all(line.startswith("RuntimeWarning: attngen: cannot write") for line in done.stderr.splitlines()), done.stderr
