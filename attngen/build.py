"""The build layer: the one place kernels are planned, rendered, compiled (spill retries) and wrapped, and
where a kernel learns its fallback (the mma.sync kernel of the same spec, for inputs the Hopper path's copy
engine cannot address). Below the public API: api, autograd and the tools call it; it calls nothing above.
"""

from __future__ import annotations

import functools
import threading

from .planner import device as device_mod
from .codegen.compile import compile_cached
from .errors import PlanError
from .runtime.launch import Kernel
from .planner.forward import candidates, check_dtype, make_plan
from .codegen.render import kernel_name, render
from .spec import Spec

_kernels: dict = {}
_kernels_lock = threading.Lock()


MAX_COMPILE_TRIES = 4


def plan_and_compile(spec: Spec, device, compile_source, path: str | None = None):
    """The planner's best candidate that ptxas compiles without spilling.

    The register model is an estimate fitted to ptxas; near 255 registers ptxas may still spill, so the
    ranked candidates are compiled in order (at most MAX_COMPILE_TRIES) and the first clean one wins.
    `compile_source(source, plan)` returns (Binary, anything); returns (plan, source, that pair). `path`
    ("mma_sync" | "wgmma") keeps only that kernel path's candidates."""
    from .tuned import forward_key, load_tuned, tuned_first

    if spec.tile is not None:
        ranked = [make_plan(spec, device)]
    else:      # `attngen tune`'s measured winner for this GPU first, when there is one
        check_dtype(spec, device)
        ranked = [c.plan for c in candidates(spec, device) if c.plan is not None and path in (None, c.plan.path)]
        if not ranked:
            raise PlanError(f"no {path + ' ' if path else ''}candidate fits {spec.name} on {device.arch}")
        ranked = tuned_first(ranked, load_tuned(spec, device.name).get("forward"), forward_key)
    chosen, (source, result), rejected = first_clean(ranked, lambda plan: _render_and_compile(
        spec, plan, lambda source: compile_source(source, plan)))
    if chosen is not None:
        return chosen, source, result
    raise PlanError(f"no candidate for {spec.name} on {device.arch} compiles without spills: " + "; ".join(
        f"{c.block_m}x{c.block_n}x{c.warps}x{c.stages}: {r.spill_bytes} spill bytes, {r.stack_frame} B stack frame"
        + (", wgmma serialized" if r.wgmma_serialized else "") for c, r in rejected))


def _render_and_compile(spec, plan, compile_source, kind="forward"):
    source = render(spec, plan, kind)
    return source, compile_source(source)


def first_clean(ranked, compile_one):
    """(candidate, compile_one(candidate), rejected) for the first ranked candidate that compiles clean,
    compiling at most MAX_COMPILE_TRIES; once a path's wgmma is serialised its other candidates are passed
    over (the same code would be). No clean one: (None, (None, None), [(candidate, resources), ...])."""
    rejected, serialized = [], set()
    for candidate in ranked:
        if len(rejected) == MAX_COMPILE_TRIES:
            break
        if candidate.path in serialized:
            continue
        compiled = compile_one(candidate)
        r = compiled[1][0].resources
        if clean(r):
            return candidate, compiled, rejected
        if r.wgmma_serialized:
            serialized.add(candidate.path)
        rejected.append((candidate, r))
    return None, (None, None), rejected


def clean(resources) -> bool:
    """A compiled candidate to keep: no spills, no stack frame, and no wgmma that ptxas had to serialise
    (its warpgroup MMAs would then wait for each other: slower than the mma.sync candidate after it)."""
    return resources.stack_frame == 0 and not resources.spill_bytes and not resources.wgmma_serialized


def build(spec: Spec, device: int | None = None, path: str | None = None) -> Kernel:
    """Plan, render and compile `spec` for a live GPU (the current one by default); cached in memory and
    on disk (ATTNGEN_CACHE_DIR). Backward-only keys (`deterministic`) do not change the forward kernel.
    `path` forces the kernel path ("mma_sync", or "wgmma" on Hopper); by default the planner chooses."""
    import cupy

    if path not in (None, "mma_sync", "wgmma"):
        raise ValueError(f"path: got {path!r}; allowed: None | 'mma_sync' | 'wgmma'")
    spec = spec.forward_spec
    index = cupy.cuda.runtime.getDevice() if device is None else device
    key = (spec, index, path)
    with _kernels_lock:
        if key in _kernels:
            return _kernels[key]
    with cupy.cuda.Device(index):
        dev = device_mod.live_device(index)
        name = kernel_name(spec)
        chosen, source, (binary, cubin_path) = plan_and_compile(
            spec, dev, lambda src, chosen: compile_cached(src, spec.name, chosen.target, name), path)
        # inputs the copy engine cannot address (stride-0 K/V, say) run on the mma.sync kernel instead
        # (FP8 has no mma.sync kernel: inputs the copy engine cannot address are refused)
        fallback = functools.partial(build, spec, index, "mma_sync") if chosen.path == "wgmma" and not spec.fp8 else None
        kernel = Kernel(spec, chosen, source, binary, cubin_path, name, fallback=fallback)
    with _kernels_lock:
        return _kernels.setdefault(key, kernel)


def plan_and_compile_backward(spec: Spec, device, compile_source, path: str | None = None):
    """Each backward pass's best-ranked candidate that ptxas compiles without spilling (as plan_and_compile);
    path = "mma_sync" leaves the wgmma dK/dV pass out. `compile_source(source, kind, target)` returns
    (Binary, anything); returns (BackwardPlan, sources, results)."""
    from .planner.backward import BackwardPlan, make_backward_plan, pass_candidates, pass_kinds
    from .tuned import backward_key, load_tuned, tuned_first

    make_backward_plan(spec, device)                 # raises PlanError when nothing fits
    chosen, sources, results = {"dq": None}, {}, {}
    tuned = load_tuned(spec, device.name)
    for kind in pass_kinds(spec):
        name = f"backward_{kind}"
        ranked = [p for _, p, _ in pass_candidates(kind, spec, device) if p is not None and path in (None, p.path)]
        ranked = tuned_first(ranked, tuned.get(name), backward_key)
        candidate, (source, result), _ = first_clean(ranked, lambda plan: _render_and_compile(
            spec, plan, lambda source: compile_source(source, name, plan.target), name))
        if candidate is None:
            raise PlanError(f"no {kind} backward candidate for {spec.name} on {device.arch} compiles without spills")
        chosen[kind], sources[name], results[name] = candidate, source, result
    return BackwardPlan(device.arch, chosen["dq"], chosen["dkdv"]), sources, results


def build_backward(spec: Spec, device: int | None = None, path: str | None = None):
    """The backward kernels of `spec` (delta, dQ, dK/dV) for a live GPU, cached like build(); path =
    "mma_sync" keeps the dK/dV pass off the wgmma path (the fallback for inputs TMA cannot address)."""
    import cupy

    from .runtime.backward import BackwardKernels, check_backward_support

    check_backward_support(spec)
    index = cupy.cuda.runtime.getDevice() if device is None else device
    if path not in (None, "mma_sync", "wgmma"):
        raise ValueError(f"path: got {path!r}; allowed: None | 'mma_sync' | 'wgmma'")
    key = ("backward", spec, index, path)
    with _kernels_lock:
        if key in _kernels:
            return _kernels[key]
    with cupy.cuda.Device(index):
        dev = device_mod.live_device(index)
        plan, sources, compiled = plan_and_compile_backward(
            spec, dev, lambda src, kind, target: compile_cached(src, f"{spec.name}_{kind}", target, kernel_name(spec, kind)),
            path)
        fallback = (functools.partial(build_backward, spec, index, "mma_sync") if plan.dkdv.path == "wgmma"
                    else None)
        kernels = BackwardKernels(spec, plan, sources, {k: c[1] for k, c in compiled.items()},
                                  {k: c[0] for k, c in compiled.items()}, fallback=fallback)
    with _kernels_lock:
        return _kernels.setdefault(key, kernels)


def build_decode(spec: Spec, device: int | None = None):
    """The decode kernels of a `layout: kvcache` spec (append, decode, combine: one module) for a live GPU, and on
    Hopper the prefill kernel beside them (the wgmma forward over the cache's pages), cached like build()."""
    import cupy

    from .planner.decode import make_decode_plan, make_prefill_plan
    from .runtime.kvcache import DecodeKernel, Prefill

    if spec.layout != "kvcache":
        raise ValueError(f"spec.layout: expected 'kvcache' for the decode kernels, got {spec.layout!r}")
    index = cupy.cuda.runtime.getDevice() if device is None else device
    key = ("decode", spec, index)
    with _kernels_lock:
        if key in _kernels:
            return _kernels[key]
    with cupy.cuda.Device(index):
        dev = device_mod.live_device(index)
        plan = make_decode_plan(spec, dev)
        source = render(spec, plan, "decode")
        binary, cubin_path = compile_cached(source, spec.name, plan.target, kernel_name(spec, "decode"))
        if not clean(binary.resources):
            raise PlanError(f"decode: {spec.name} spills on {dev.arch} ({binary.resources.spill_bytes} B)")
        prefill = None
        prefill_plan = make_prefill_plan(spec, dev)
        if prefill_plan is not None:
            prefill_source = render(spec, prefill_plan, "prefill")
            prefill_binary, prefill_path = compile_cached(prefill_source, spec.name, prefill_plan.target,
                                                          kernel_name(spec, "prefill"))
            if clean(prefill_binary.resources):       # else the decode kernel serves every seqlen_q
                prefill = Prefill(spec, prefill_plan, prefill_source, prefill_binary, prefill_path)
        kernel = DecodeKernel(spec, plan, source, binary, cubin_path, dev.sm_count, prefill)
    with _kernels_lock:
        return _kernels.setdefault(key, kernel)
