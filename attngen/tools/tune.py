"""Autotuner: time the planner's top candidates on the GPU and remember the winner.

The cost model ranks tiles well but its level is off (BENCHMARKS.md), so `attngen tune SPEC.yaml` measures
the best-ranked candidates that compile without spills, forward and (with `backward: true`) the dK/dV
pass, and writes the winners to <cache>/tuned/<key>.json, key = hash(spec, GPU name, attngen version),
with an atomic write. build() and build_backward() try a remembered winner first. Each row reports the
model's predicted time beside the measured one, so the model can be corrected where it is wrong.
"""

from __future__ import annotations

from ..spec import Spec
from ..tuned import backward_key, forward_key, save_tuned

TUNE_TOP = 6                     # candidates measured per kernel


def top_candidates(spec: Spec, device, top: int) -> list:
    """The planner's `top` best fitting candidates, plus the best of each kernel path not among them (so
    a measurement can overturn the model's choice of path too)."""
    from ..planner.forward import candidates

    fits = [c for c in candidates(spec, device) if c.plan]
    chosen = fits[:top]
    for c in fits[top:]:
        if c.path not in {x.path for x in chosen}:
            chosen.append(c)
    return chosen


def tune(spec: Spec, seqlen: int = 4096, tokens: int = 16384, top: int = TUNE_TOP, log=print) -> tuple[list, list]:
    """Measure, remember, and return (the entries' paths, the measured rows). The forward's winner is kept
    under spec.forward_spec (the spec the forward kernel is built from), the backward's under spec."""
    import numpy as np
    import torch

    from ..api import build
    from ..runtime.backward import BackwardKernels, check_backward_support
    from .benchmark import Case, case_flops, make_inputs, time_ms
    from .checking import random_tensors
    from ..codegen.compile import compile_cached
    from ..planner.device import live_device
    from ..runtime.launch import Kernel
    from ..planner.forward import predict_us
    from ..planner.backward import BackwardPlan, pass_candidates
    from ..codegen.render import kernel_name, render

    if spec.mask is not None and spec.mask_pattern is None:
        raise ValueError("tune: a runtime block layout has no fixed mask to tune on; tune the pattern instead")
    if spec.tile is not None:
        raise ValueError("tune: the spec fixes its tile (tile:); remove it to let the tuner choose")
    device = live_device()
    heads = spec.num_heads or max(1, 2048 // spec.head_dim)
    case = Case(spec, max(1, tokens // seqlen), seqlen, heads, spec.num_kv_heads or heads)
    inputs = make_inputs(case.batch, seqlen, heads, case.heads_kv, spec.head_dim, spec.dtype)
    if spec.head_dim_v != spec.head_dim:
        inputs = [(q, k, torch.randn(*v.shape[:3], spec.head_dim_v, device="cuda", dtype=v.dtype)) for q, k, v in inputs]
    tensors = random_tensors(spec, np.random.default_rng(0), (case.batch, heads, seqlen, seqlen))
    call = {"tensors": tensors} if tensors else {}
    work = case_flops(case)
    rows = []

    def measured(kind, config, binary, predicted_us, run, factor):
        r = binary.resources
        row = dict(kind=kind, config=config, registers=r.registers, spill_bytes=r.spill_bytes,
                   predicted_us=predicted_us, measured_us=None, tflops=None)
        if r.spill_bytes or r.stack_frame:
            row["note"] = "spills: skipped"
        else:
            row["measured_us"] = time_ms(run, inputs, warmup=3, reps=20) * 1e3
            row["tflops"] = factor * work / (row["measured_us"] * 1e-6) / 1e12
        rows.append(row)
        log(f"  {kind:<14} {'x'.join(map(str, config)):<24} {r.registers:>4} regs  predicted "
            + (f"{predicted_us:>9.1f} us" if predicted_us else f"{'-':>12}")
            + (f"  measured {row['measured_us']:>9.1f} us  {row['tflops']:6.1f} TFLOP/s" if row["measured_us"]
               else f"  {row.get('note', '')}"))
        return row

    forward = {}
    for c in top_candidates(spec, device, top):
        source = render(spec, c.plan)
        binary, path = compile_cached(source, spec.name, c.plan.target, kernel_name(spec))
        kernel = Kernel(spec, c.plan, source, binary, path, kernel_name(spec))
        predicted = predict_us(spec, c.plan, device, case.batch, seqlen, seqlen, heads)
        row = measured("forward", forward_key(c.plan), binary, predicted, lambda q, k, v: kernel(q, k, v, **call), 1.0)
        if row["measured_us"]:
            forward[tuple(row["config"])] = row["measured_us"]
    if not forward:
        raise ValueError("tune: no forward candidate compiled without spills")
    paths = [save_tuned(spec.forward_spec, device.name, {"forward": list(min(forward, key=forward.get))},
                        [r for r in rows if r["kind"] == "forward"])]

    if spec.backward:
        check_backward_support(spec)
        fwd = build(spec)
        q, k, v = inputs[0]
        out, lse = fwd(q, k, v, **call)
        dout = torch.randn_like(out)
        # the dQ pass (deterministic specs) stays at the planner's choice while the dK/dV pass varies
        dq_pass = next(p for _, p, _ in pass_candidates("dq", spec, device) if p) if spec.deterministic else None
        backward = {}
        for _, cand, _ in [x for x in pass_candidates("dkdv", spec, device) if x[1]][:top]:
            sources, cubins, binaries = {}, {}, {}
            for kind, bwd in (("backward_dq", dq_pass), ("backward_dkdv", cand)):
                if bwd is not None:
                    sources[kind] = render(spec, bwd, kind)
                    binaries[kind], cubins[kind] = compile_cached(sources[kind], f"{spec.name}_{kind}", bwd.target,
                                                                  kernel_name(spec, kind))
            kernels = BackwardKernels(spec, BackwardPlan(device.arch, dq_pass, cand), sources, cubins, binaries)
            row = measured("backward_dkdv", backward_key(cand), binaries["backward_dkdv"], None,
                           lambda *_: kernels(q, k, v, out, lse, dout, **call), 2.5)
            if row["measured_us"]:
                backward[tuple(row["config"])] = row["measured_us"]
        if backward:
            paths.append(save_tuned(spec, device.name, {"backward_dkdv": list(min(backward, key=backward.get))},
                                    [r for r in rows if r["kind"] == "backward_dkdv"]))
    return sorted(set(paths)), rows
