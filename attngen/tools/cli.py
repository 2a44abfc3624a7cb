"""The `attngen` command line: build, plan, check, bench, tune. Bad specs and arguments exit with code 2 and
one line that names the field."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import click

from ..version import __version__
from ..codegen.compile import atomic_write, nvrtc_compile, nvrtc_version
from ..planner.device import ARCH_VARIANTS, PRESETS, live_device, preset
from ..errors import CompileError, PlanError, SpecError
from ..planner.forward import REFERENCE_PROBLEM, explain, make_plan
from ..codegen.render import kernel_name, render
from ..spec import Spec


ARCHS = " | ".join([*PRESETS, *ARCH_VARIANTS])


class UsageFailure(click.ClickException):
    """Exit code 2 and one line on stderr: the contract for bad specs, arguments and environments."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))     # one line, whatever the message quoted


class OneLineErrors(click.Group):
    """click's own usage errors (a missing argument, an unknown option) also as one line, without the
    usage text."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise UsageFailure(exc.format_message()) from None


@contextlib.contextmanager
def warnings_as_lines():
    """A warning (e.g. an unwritable cache folder) is one line on stderr, not Python's two."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_: click.echo(
            f"{category.__name__}: {' '.join(str(message).split())}", err=True)
        yield


def load_spec(path: str) -> Spec:
    try:
        return Spec.from_yaml(path)
    except (SpecError, PlanError) as exc:
        raise UsageFailure(f"{path}: {exc}") from None
    except OSError as exc:
        raise UsageFailure(f"{path}: cannot read the spec ({exc.strerror or type(exc).__name__})") from None


def compile_failure(where: str, exc: CompileError) -> UsageFailure:
    """NVRTC's refusal as one line: the first line of the error and the log's first error; the full log
    sits beside the saved source."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    error = next((line.strip() for line in exc.log.splitlines() if "error" in line), "")
    return UsageFailure(f"{where}: {first}" + (f"; first error: {error[:200]}" if error else ""))


def require_gpu(command: str) -> None:
    """check, bench and tune run kernels (and time them against PyTorch): say what is missing in one line
    before anything starts."""
    try:
        import cupy

        count, why = cupy.cuda.runtime.getDeviceCount(), "no device"
    except Exception as exc:  # no driver, no CUDA runtime, a driver older than CuPy's runtime
        count, why = 0, " ".join(str(exc).split())[:160] or type(exc).__name__
    if count < 1:
        raise UsageFailure(f"{command}: needs a CUDA GPU; none is usable here ({why})")
    try:
        import torch  # noqa: F401
    except Exception as exc:  # not installed, or installed without its libraries
        raise UsageFailure(f"{command}: needs PyTorch (pip install 'attngen[torch]'); importing it failed "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None


def resolve_device(arch: str | None):
    """An explicit --arch is a preset; without one, the current GPU if there is one, else sm_90."""
    if arch is not None:
        try:
            return preset(arch)
        except SpecError:
            raise UsageFailure(f"--arch: got {arch[:40]!r}; allowed: {ARCHS}") from None
    try:
        return live_device()
    except Exception:  # no GPU or driver: offline build for the Hopper preset
        click.echo("no GPU found: planning for the sm_90 preset (pass --arch to choose)", err=True)
        return preset("sm_90")


def plan_or_fail(spec, device, path):
    try:
        return make_plan(spec, device)
    except PlanError as exc:
        raise UsageFailure(f"{path}: {exc}") from None


arch_option = click.option("--arch", default=None, help=f"target: {ARCHS} (default: the current GPU)")


@click.group(cls=OneLineErrors)
@click.version_option(__version__, prog_name="attngen")
@click.pass_context
def main(ctx):
    """attngen: attention-kernel compiler (spec -> plan -> CUDA C -> NVRTC -> launch)."""
    ctx.with_resource(warnings_as_lines())


def build_artifacts(spec: Spec, device) -> dict:
    """Plan, render and compile offline; returns the files to write, by suffix."""
    from ..api import plan_and_compile

    if spec.layout == "kvcache":
        return decode_artifacts(spec, device)
    name = kernel_name(spec)
    try:
        chosen, source, (binary, _) = plan_and_compile(
            spec, device, lambda src, chosen: (nvrtc_compile(src, spec.name, chosen.target, name), None))
    except PlanError as exc:
        raise UsageFailure(f"{spec.name}: {exc}") from None
    except CompileError as exc:
        raise compile_failure(spec.name, exc) from None
    manifest = {
        "attngen_version": __version__,
        "kernel": name,
        "spec": spec.to_dict(),
        "plan": chosen.to_dict(),
        "resources": binary.report(),
        "nvrtc_version": nvrtc_version(),
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "cubin_sha256": hashlib.sha256(binary.cubin).hexdigest(),
    }
    files = {".cu": source.encode(), ".cubin": binary.cubin, ".ptx": binary.ptx.encode()}
    if spec.backward:
        files |= backward_artifacts(spec, device, manifest)
    return files | {".json": (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}


def decode_artifacts(spec: Spec, device) -> dict:
    """A `layout: kvcache` spec: the decode module (append, decode, combine kernels) as NAME.*, and where the
    device has a prefill kernel (Hopper) NAME_prefill.*, its plan and resources in the manifest."""
    from ..planner.decode import make_decode_plan, make_prefill_plan

    name = kernel_name(spec, "decode")
    try:
        plan = make_decode_plan(spec, device)
        source = render(spec, plan, "decode")
        binary = nvrtc_compile(source, spec.name, plan.target, name)
        prefill_plan = make_prefill_plan(spec, device)
        if prefill_plan is not None:
            prefill_source = render(spec, prefill_plan, "prefill")
            prefill_binary = nvrtc_compile(prefill_source, f"{spec.name}_prefill", prefill_plan.target,
                                           kernel_name(spec, "prefill"))
    except PlanError as exc:
        raise UsageFailure(f"{spec.name}: {exc}") from None
    except CompileError as exc:
        raise compile_failure(spec.name, exc) from None
    manifest = {"attngen_version": __version__, "kernel": name, "spec": spec.to_dict(), "plan": plan.to_dict(),
                "resources": binary.report(), "nvrtc_version": nvrtc_version(),
                "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
                "cubin_sha256": hashlib.sha256(binary.cubin).hexdigest()}
    files = {".cu": source.encode(), ".cubin": binary.cubin, ".ptx": binary.ptx.encode()}
    if prefill_plan is not None:
        manifest["prefill"] = {"kernel": kernel_name(spec, "prefill"), "plan": prefill_plan.to_dict(),
                               "resources": prefill_binary.report(),
                               "source_sha256": hashlib.sha256(prefill_source.encode()).hexdigest()}
        files |= {"_prefill.cu": prefill_source.encode(), "_prefill.cubin": prefill_binary.cubin,
                  "_prefill.ptx": prefill_binary.ptx.encode()}
    return files | {".json": (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}


def backward_artifacts(spec: Spec, device, manifest: dict) -> dict:
    """The backward kernels (`backward: true`): NAME_bwd_dkdv.* (with the delta and dQ conversion kernels),
    and NAME_bwd_dq.* with `deterministic: true`; their plan and
    resources go into the forward's manifest."""
    from ..api import plan_and_compile_backward
    from ..runtime.backward import check_backward_support

    try:
        check_backward_support(spec)
        plan, sources, results = plan_and_compile_backward(spec, device, lambda src, kind, target: (
            nvrtc_compile(src, f"{spec.name}_{kind}", target, kernel_name(spec, kind)), None))
    except (PlanError, ValueError) as exc:
        raise UsageFailure(f"{spec.name}: {exc}") from None
    except CompileError as exc:
        raise compile_failure(spec.name, exc) from None
    files, resources = {}, {}
    for kind in plan.passes:
        kind, suffix = f"backward_{kind}", f"_bwd_{kind}"
        binary = results[kind][0]
        files |= {f"{suffix}.cu": sources[kind].encode(), f"{suffix}.cubin": binary.cubin,
                  f"{suffix}.ptx": binary.ptx.encode()}
        resources[kind] = binary.report() | {"source_sha256": hashlib.sha256(sources[kind].encode()).hexdigest()}
    manifest["backward"] = {"plan": plan.to_dict(), "resources": resources}
    return files


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", default="build", show_default=True,
              help="folder for NAME.cu, NAME.cubin, NAME.ptx, NAME.json")
@arch_option
def build(spec_path, out_dir, arch):
    """Plan, render and compile a spec offline (no GPU needed with --arch)."""
    spec = load_spec(spec_path)
    out = Path(out_dir)
    check_out_dir(out)                          # before the compile: a bad -o should not cost its wait
    device = resolve_device(arch)
    artifacts = build_artifacts(spec, device)   # everything is produced before anything is written
    write_outputs(out, {f"{spec.name}{suffix}": data for suffix, data in artifacts.items()})
    manifest = json.loads(artifacts[".json"])
    r, p = manifest["resources"], manifest["plan"]
    spills = (f"{r['spill_bytes']} spill bytes" if r["spill_bytes"] is not None
              else f"{r['stack_frame']} B stack frame (spills unknown: ptxas skipped by the CUDA cache)")
    tiles = (f"decode {p['block_m']} rows x {p['block_n'] * p['warps']} keys per stage" if spec.layout == "kvcache"
             else f"tiles {p['block_m']}x{p['block_n']}")
    click.echo(f"{spec.name}: {device.arch}, {tiles}, {p['warps']} warps, "
               f"{p['stages']} stages, {p['smem_bytes']} B smem, {r['registers']} registers, "
               f"{spills} -> {out}/{spec.name}.{{cu,cubin,ptx,json}}")
    if "backward" in manifest:
        b = manifest["backward"]
        for kind in (k for k in ("dq", "dkdv") if k in b["plan"]):
            bp, br = b["plan"][kind], b["resources"][f"backward_{kind}"]
            click.echo(f"  backward {kind}: tiles {bp['block_m']}x{bp['block_n']}, {bp['warps']} warps, chunk "
                       f"{bp['chunk']}, {bp['smem_bytes']} B smem, {br['registers']} registers -> "
                       f"{out}/{spec.name}_bwd_{kind}.{{cu,cubin,ptx}}")


def check_out_dir(out: Path) -> None:
    """-o must be a folder or a path where one can be made: not a file, not under a file."""
    if out.exists() and not out.is_dir():
        raise UsageFailure(f"-o: {str(out)!r} is a file; allowed: a folder (existing, or one to create)")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if not out.exists() and above is not None and not above.is_dir():
        raise UsageFailure(f"-o: {str(out)!r} lies under the file {str(above)!r}; allowed: a folder "
                           "(existing, or one to create)")


def write_outputs(out: Path, files: dict) -> None:
    """All of `files` (name -> bytes) land in `out`, or none do and `out` is as it was: they are written
    to a temporary folder inside `out` (same file system) and renamed into place once all are written;
    a failure while renaming puts back what was there."""
    made = []                                   # folders this call creates, innermost first
    for folder in (out, *out.parents):
        if folder.exists():
            break
        made.append(folder)
    staging, placed, saved = None, [], []
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".attngen-build-", dir=out))
        for name, data in files.items():
            (staging / name).write_bytes(data)
        for name in files:
            if (out / name).is_dir():
                raise IsADirectoryError(errno.EISDIR, f"a folder is in the way of {name}", str(out / name))
        for name in files:                      # the manifest (.json) comes last: it vouches for the rest
            target = out / name
            if target.exists() or target.is_symlink():
                os.replace(target, staging / f"{name}.previous")
                saved.append(name)
            os.replace(staging / name, target)
            placed.append(name)
    except OSError as exc:
        for name in placed:
            with contextlib.suppress(OSError):
                os.unlink(out / name)
        kept = []                               # previous files that could not be put back
        for name in saved:
            try:
                os.replace(staging / f"{name}.previous", out / name)
            except OSError:
                kept.append(name)
        if staging is not None and not kept:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        reason = exc.strerror or type(exc).__name__
        outcome = (f"the previous {', '.join(kept)} are in {str(staging)!r}" if kept else "nothing was written")
        raise UsageFailure(f"-o {str(out)!r}: cannot write the outputs ({reason}); {outcome}") from None
    shutil.rmtree(staging, ignore_errors=True)  # the previous files' copies


@main.command("plan")
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@arch_option
@click.option("--seqlen", default=4096, show_default=True, help="sequence length for the mask report")
def plan_command(spec_path, arch, seqlen):
    """Show the budget arithmetic and the candidate table, the chosen row marked."""
    spec = load_spec(spec_path)
    device = resolve_device(arch)
    if spec.layout == "kvcache":
        from ..planner.decode import explain_decode

        try:
            click.echo(explain_decode(spec, device))
        except PlanError as exc:
            raise UsageFailure(f"{spec_path}: {exc}") from None
        return
    chosen = plan_or_fail(spec, device, spec_path)
    click.echo(explain(spec, device))
    if spec.backward:
        from ..planner.backward import explain_backward

        click.echo("\n" + explain_backward(spec, device))
    if spec.mask is not None:
        click.echo("\n" + mask_report(spec, chosen, seqlen))


def mask_report(spec: Spec, chosen, seqlen: int) -> str:
    """Density, kept/partial/full block counts and the predicted time of the mask at one seqlen."""
    from ..masks import BlockMask

    if spec.mask_pattern is None:
        return f"mask   {spec.mask['kind']}: a block layout passed at run time ({spec.mask_block_size} blocks)"
    try:
        mask = BlockMask.from_pattern(spec.mask_pattern, seqlen, seqlen, block_size=spec.mask_block_size)
    except ValueError as exc:
        return f"mask   {spec.mask['kind']}: no report at seqlen {seqlen} ({exc})"
    c = mask.counts()
    dense_us = chosen.predicted_time_us * (seqlen / REFERENCE_PROBLEM["seqlen_q"]) ** 2
    return (f"mask   {spec.mask['kind']} at seqlen {seqlen}: density {mask.density:.3f}, {c['kept']} of {c['total']} "
            f"blocks kept ({c['full']} full, {c['partial']} partial)\n"
            f"time   ~{dense_us * mask.density:.1f} us predicted for the reference batch and heads "
            f"(dense {dense_us:.1f} us x density)\n{mask}")


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--seed", default=0, show_default=True)
def check(spec_path, seed):
    """GPU: run the kernel against the float64 reference and print the errors."""
    from .checking import check_spec

    spec = load_spec(spec_path)
    require_gpu("check")
    try:
        ok = check_spec(spec, seed=seed, echo=click.echo)
    except (PlanError, ValueError) as exc:      # SpecError is a ValueError
        raise UsageFailure(f"{spec_path}: {exc}") from None
    except CompileError as exc:
        raise compile_failure(spec_path, exc) from None
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("spec_path", metavar="[SPEC.yaml]", required=False, type=click.Path(dir_okay=False))
@click.option("--suite", type=click.Choice(["flash", "varlen", "decode"]), default=None,
              help="FlashAttention's benchmark shapes (d 64/128, causal and not, seqlen 512..16384) instead of a spec; "
                   "varlen: 16384 tokens of packed documents (uniform, 8, 64, one long) through attention_varlen beside "
                   "the batch kernel, the document pattern, FlexAttention's document mask and padded SDPA flash; "
                   "decode: one new token over KV caches of 1024..131072 (batch 1/8/32, contiguous and 16-token "
                   "pages) as K/V bandwidth beside SDPA flash and cuDNN")
@click.option("--dtype", type=click.Choice(["bf16", "fp16"]), default="bf16", show_default=True, help="--suite's dtype")
@click.option("--seqlens", default=None, help="comma-separated [default: 1024,2048,4096,8192; the suite's own]")
@click.option("--head-dims", "head_dims", default=None,
              help="--suite flash: comma-separated head dims in 1..256 [default: 64,128, FlashAttention's]")
@click.option("--tokens", default=16384, show_default=True, help="batch x seqlen")
@click.option("--peers", default="sdpa_flash,sdpa_cudnn,sdpa_efficient,flex", show_default=True,
              help="the peers to time beside attngen (those that compute the same attention)")
@click.option("--backward/--no-backward", default=None,
              help="also forward + backward [default: with the suite, or when the spec has backward: true]")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON")
@click.option("--plot", "plot_path", default=None, help="also write a PNG: TFLOP/s over seqlen, a line per implementation")
def bench(spec_path, suite, dtype, seqlens, head_dims, tokens, peers, backward, json_path, plot_path):
    """GPU: time attngen beside torch SDPA (flash, cuDNN, efficient) and FlexAttention, same inputs, one run."""
    from .benchmark import PEERS, bench_case, format_rows, plot_rows, spec_cases, suite_cases

    if (spec_path is None) == (suite is None):
        raise UsageFailure("bench: give a SPEC.yaml or --suite flash (one of them)")
    try:
        lengths = [int(x) for x in seqlens.split(",")] if seqlens else None
    except ValueError:
        raise UsageFailure(f"--seqlens: got {seqlens!r}; allowed: comma-separated positive ints") from None
    if lengths is not None and (not lengths or min(lengths) < 1):
        raise UsageFailure(f"--seqlens: got {seqlens!r}; allowed: comma-separated positive ints")
    dims = None
    if head_dims is not None:
        if suite != "flash":
            raise UsageFailure("--head-dims: allowed with --suite flash only")
        try:
            dims = [int(x) for x in head_dims.split(",")]
        except ValueError:
            dims = []
        if not dims or not all(1 <= d <= 256 for d in dims):
            raise UsageFailure(f"--head-dims: got {head_dims!r}; allowed: comma-separated ints in 1..256")
    chosen = [p for p in peers.split(",") if p]
    if any(p not in PEERS for p in chosen):
        raise UsageFailure(f"--peers: got {peers!r}; allowed: a comma-separated subset of {','.join(PEERS)}")
    if plot_path is not None and not plot_path.lower().endswith(".png"):
        raise UsageFailure(f"--plot: got {plot_path!r}; allowed: a .png path")
    if suite == "decode":
        require_gpu("bench")
        from .benchmark import bench_decode, format_decode_rows

        result = bench_decode(seqlens=lengths, log=lambda line: click.echo(f"    {line}", err=True))
        if json_path:
            atomic_write(Path(json_path), (json.dumps(result, indent=1) + "\n").encode())
        click.echo(format_decode_rows(result))
        return
    if suite == "varlen":
        require_gpu("bench")
        from .benchmark import bench_varlen, format_varlen_rows

        modes = ("fwd",) if backward is False else ("fwd", "fwd+bwd")
        rows = bench_varlen(dtype, modes, log=lambda line: click.echo(f"    {line}", err=True))
        if json_path:
            atomic_write(Path(json_path), (json.dumps(rows, indent=1) + "\n").encode())
        click.echo(format_varlen_rows(rows))
        return
    if suite:
        cases, with_backward = suite_cases(suite, dtype, lengths, dims), backward is not False
    else:
        spec = load_spec(spec_path)
        cases = spec_cases(spec, lengths or (1024, 2048, 4096, 8192), tokens)
        with_backward = spec.backward if backward is None else backward
    require_gpu("bench")
    modes = ("fwd", "fwd+bwd") if with_backward else ("fwd",)
    rows = []
    for i, case in enumerate(cases, 1):
        click.echo(f"[{i}/{len(cases)}] {case.label}", err=True)
        try:
            rows += bench_case(case, modes, chosen, log=lambda line: click.echo(f"    {line}", err=True))
        except (SpecError, PlanError, ValueError) as exc:
            raise UsageFailure(f"{case.label}: {exc}") from None
        except CompileError as exc:
            raise compile_failure(case.label, exc) from None
    if json_path:
        try:
            atomic_write(Path(json_path), (json.dumps(rows, indent=1) + "\n").encode())
        except OSError as exc:
            raise UsageFailure(f"--json {json_path!r}: cannot write it ({exc.strerror or type(exc).__name__})") from None
    if plot_path:
        plot_rows(rows, plot_path)
    click.echo(format_rows(rows))


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--seqlen", default=4096, show_default=True, help="the sequence length to tune at")
@click.option("--tokens", default=16384, show_default=True, help="batch x seqlen")
@click.option("--top", default=6, show_default=True, help="candidates to measure per kernel")
def tune(spec_path, seqlen, tokens, top):
    """GPU: time the planner's top candidates and remember the fastest for this GPU (used by build)."""
    from .tune import tune as run_tune

    spec = load_spec(spec_path)
    if seqlen < 1 or tokens < 1 or top < 1:
        raise UsageFailure(f"--seqlen, --tokens, --top: expected positive ints, got {seqlen}, {tokens}, {top}")
    require_gpu("tune")
    click.echo(f"{spec.name}: tuning at seqlen {seqlen}, batch x seqlen {tokens}, top {top} candidates")
    try:
        paths, rows = run_tune(spec, seqlen, tokens, top, log=click.echo)
    except (PlanError, ValueError) as exc:
        raise UsageFailure(f"{spec_path}: {exc}") from None
    except CompileError as exc:
        raise compile_failure(spec_path, exc) from None
    except OSError as exc:                      # the tuned winners could not be saved in the cache folder
        raise UsageFailure(f"{spec_path}: cannot save the tuned choice ({exc.strerror or type(exc).__name__})") from None
    for kind in dict.fromkeys(r["kind"] for r in rows):
        timed = [r for r in rows if r["kind"] == kind and r["measured_us"]]
        best, first = min(timed, key=lambda r: r["measured_us"]), timed[0]
        click.echo(f"{kind}: fastest {'x'.join(map(str, best['config']))} ({best['measured_us']:.1f} us); the "
                   f"model's first choice {'x'.join(map(str, first['config']))} ({first['measured_us']:.1f} us, "
                   f"{first['measured_us'] / best['measured_us']:.2f}x)")
    for path in paths:
        click.echo(f"-> {path}")
