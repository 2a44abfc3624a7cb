"""Where the wgmma backward's time goes: the dK/dV pass re-rendered with one piece taken out of its source
at a time (timing only: the gradients of a patched kernel are wrong), beside the kernel as built.

    PYTHONPATH=. python3 bench/bench_backward_diagnosis.py      # H100/H200; bf16, seqlen 16384, batch 1

Variants: base; no_reduce (no bulk dQ reduction); no_pair_sync (no barrier between the two compute
warpgroups); no_exp (P without the exponential). TFLOP/s count 2.5x the forward's FLOPs.
"""
import re
import sys

import torch

import attngen
from attngen.tools.benchmark import flops, make_inputs, time_ms
from attngen.runtime.backward import BackwardKernels
from attngen.planner.backward import BackwardPlan, _wgmma_dkdv_pass
from attngen.codegen.render import render, kernel_name
from attngen.codegen.compile import compile_cached
from attngen.planner.device import live_device

PATCHES = {
    "base": [],
    "no_reduce": [(r"bulk_reduce_add_f32\(dq_accum.*?\);", "")],
    "no_pair_sync": [(r"named_barrier\(1, 2 \* 128\);", "")],
    "no_exp": [(r"fast_exp2\(s\[0\]\[nt\]\[e\] \* scale_log2 - lse_log2\(nt, e\)\)", "(s[0][nt][e] * scale_log2 - lse_log2(nt, e))")],
}


def main():
    dev = live_device(0)
    rows = []
    for d, causal in ((128, False), (64, False)):
        seqlen, heads = 16384, 2048 // d
        spec = attngen.Spec(head_dim=d, causal=causal, backward=True)
        sets = []
        for q, k, v in make_inputs(1, seqlen, heads, heads, d, "bf16"):
            out, lse = attngen.attention(q, k, v, causal=causal, return_lse=True)
            sets.append((q, k, v, out, lse, torch.randn_like(out)))
        work = 2.5 * flops(1, heads, seqlen, d, causal)
        p, why = _wgmma_dkdv_pass(spec, dev, 2)
        for name, patches in PATCHES.items():
            src = render(spec, p, "backward_dkdv")
            for pat, rep in patches:
                src, n = re.subn(pat, rep, src, flags=re.S)
                assert n >= 1, (name, pat)
            b, path = compile_cached(src, f"{spec.name}_diag_{name}", p.target, kernel_name(spec, "backward_dkdv"))
            kern = BackwardKernels(spec, BackwardPlan(dev.arch, None, p), {"backward_dkdv": src}, {"backward_dkdv": path},
                                   {"backward_dkdv": b})
            ms = time_ms(lambda *a: kern(*a), sets)
            rows.append((d, causal, name, ms, work / ms / 1e9, b.resources.registers, b.resources.spill_bytes))
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"{'d':>4} {'causal':>6} {'variant':>12} {'ms':>7} {'TFLOP/s':>8}")
    for r in rows:
        print(f"{r[0]:>4} {str(r[1]):>6} {r[2]:>12} {r[3]:>7.3f} {r[4]:>8.1f}  regs {r[5]} spill {r[6]}")


if __name__ == "__main__":
    main()
