"""The `attngen` command line: build, plan, check, bench. Bad specs and arguments exit with code 2 and
one line that names the field."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import click

from . import __version__
from .compile import atomic_write, nvrtc_compile, nvrtc_version
from .device import PRESETS, live_device, preset
from .errors import PlanError, SpecError
from .plan import REFERENCE_PROBLEM, explain, make_plan
from .render import kernel_name
from .spec import Spec


class UsageFailure(click.ClickException):
    exit_code = 2


def load_spec(path: str) -> Spec:
    try:
        return Spec.from_yaml(path)
    except (SpecError, PlanError) as exc:
        raise UsageFailure(f"{path}: {exc}") from None
    except OSError as exc:
        raise UsageFailure(f"{path}: cannot read the spec ({exc.strerror})") from None


def resolve_device(arch: str | None):
    """An explicit --arch is a preset; without one, the current GPU if there is one, else sm_90."""
    if arch is not None:
        try:
            return preset(arch)
        except SpecError:
            raise UsageFailure(f"--arch: got {arch!r}; allowed: {' | '.join(PRESETS)}") from None
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


arch_option = click.option("--arch", default=None, help=f"target: {' | '.join(PRESETS)} (default: the current GPU)")


@click.group()
@click.version_option(__version__, prog_name="attngen")
def main():
    """attngen: attention-kernel compiler (spec -> plan -> CUDA C -> NVRTC -> launch)."""


def build_artifacts(spec: Spec, device) -> dict:
    """Plan, render and compile offline; returns the files to write, by suffix."""
    from .api import plan_and_compile

    name = kernel_name(spec)
    try:
        chosen, source, (binary, _) = plan_and_compile(
            spec, device, lambda src, _plan: (nvrtc_compile(src, spec.name, device.arch, name), None))
    except PlanError as exc:
        raise UsageFailure(f"{spec.name}: {exc}") from None
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


def backward_artifacts(spec: Spec, device, manifest: dict) -> dict:
    """The backward kernels (`backward: true`): NAME_bwd_dkdv.* (with the delta and dQ conversion kernels),
    and NAME_bwd_dq.* with `deterministic: true`; their plan and
    resources go into the forward's manifest."""
    from .api import plan_and_compile_backward
    from .backward import check_backward_support

    try:
        check_backward_support(spec)
        plan, sources, results = plan_and_compile_backward(spec, device, lambda src, kind: (
            nvrtc_compile(src, f"{spec.name}_{kind}", device.arch, kernel_name(spec, kind)), None))
    except (PlanError, ValueError) as exc:
        raise UsageFailure(f"{spec.name}: {exc}") from None
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
@click.option("-o", "--out", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False),
              help="folder for NAME.cu, NAME.cubin, NAME.ptx, NAME.json")
@arch_option
def build(spec_path, out_dir, arch):
    """Plan, render and compile a spec offline (no GPU needed with --arch)."""
    spec = load_spec(spec_path)
    device = resolve_device(arch)
    artifacts = build_artifacts(spec, device)   # everything is produced before anything is written
    out = Path(out_dir)
    for suffix, data in artifacts.items():
        atomic_write(out / f"{spec.name}{suffix}", data)
    manifest = json.loads(artifacts[".json"])
    r, p = manifest["resources"], manifest["plan"]
    spills = (f"{r['spill_bytes']} spill bytes" if r["spill_bytes"] is not None
              else f"{r['stack_frame']} B stack frame (spills unknown: ptxas skipped by the CUDA cache)")
    click.echo(f"{spec.name}: {device.arch}, tiles {p['block_m']}x{p['block_n']}, {p['warps']} warps, "
               f"{p['stages']} stages, {p['smem_bytes']} B smem, {r['registers']} registers, "
               f"{spills} -> {out}/{spec.name}.{{cu,cubin,ptx,json}}")
    if "backward" in manifest:
        b = manifest["backward"]
        for kind in (k for k in ("dq", "dkdv") if k in b["plan"]):
            bp, br = b["plan"][kind], b["resources"][f"backward_{kind}"]
            click.echo(f"  backward {kind}: tiles {bp['block_m']}x{bp['block_n']}, {bp['warps']} warps, chunk "
                       f"{bp['chunk']}, {bp['smem_bytes']} B smem, {br['registers']} registers -> "
                       f"{out}/{spec.name}_bwd_{kind}.{{cu,cubin,ptx}}")


@main.command("plan")
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@arch_option
@click.option("--seqlen", default=4096, show_default=True, help="sequence length for the mask report")
def plan_command(spec_path, arch, seqlen):
    """Show the budget arithmetic and the candidate table, the chosen row marked."""
    spec = load_spec(spec_path)
    device = resolve_device(arch)
    chosen = plan_or_fail(spec, device, spec_path)
    click.echo(explain(spec, device))
    if spec.backward:
        from .plan_backward import explain_backward

        click.echo("\n" + explain_backward(spec, device))
    if spec.mask is not None:
        click.echo("\n" + mask_report(spec, chosen, seqlen))


def mask_report(spec: Spec, chosen, seqlen: int) -> str:
    """Density, kept/partial/full block counts and the predicted time of the mask at one seqlen."""
    from .masks import BlockMask

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
    ok = check_spec(spec, seed=seed, echo=click.echo)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("spec_path", metavar="SPEC.yaml", type=click.Path(dir_okay=False))
@click.option("--seqlens", default="1024,2048,4096,8192", show_default=True)
@click.option("--tokens", default=16384, show_default=True, help="batch x seqlen")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON")
def bench(spec_path, seqlens, tokens, json_path):
    """GPU: time the spec's kernel beside torch SDPA's flash and cuDNN backends."""
    from .benchmark import format_table, measure

    spec = load_spec(spec_path)
    heads = spec.num_heads or max(1, 2048 // spec.head_dim)
    rows = []
    for seqlen in (int(s) for s in seqlens.split(",")):
        rows.append(measure(spec.dtype, spec.head_dim, spec.causal, seqlen, max(1, tokens // seqlen), heads,
                            spec.num_kv_heads or heads, spec=spec))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
    click.echo(format_table(rows))
