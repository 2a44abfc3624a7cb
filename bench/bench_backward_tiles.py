"""Backward tile sweep: times each backward pass (dQ, dK/dV) for the planner's ranked candidates, so the
ranking can be checked against measurement (the autotuner's job later).

    PYTHONPATH=. python3 bench/bench_backward_tiles.py [--dims 64,128] [--seqlen 8192] [--top 6] [--deterministic]
        [--path mma_sync] [--tiles 32x64x4c128s3,32x128x8c128s2k16]

bf16, batch x seqlen = 16384, hidden 2048, causal and not; prints the whole backward's time with one pass
swapped for each candidate (the other pass at rank 0).
"""

from __future__ import annotations

import argparse
import sys

import torch

import attngen
from attngen.planner import device as device_mod
from attngen.runtime.backward import BackwardKernels
from attngen.tools.benchmark import make_inputs, time_ms
from attngen.codegen.compile import compile_cached
from attngen.planner.backward import BackwardPlan, pass_candidates, pass_kinds
from attngen.codegen.render import kernel_name, render


def kernels_for(spec, dev, dq, dkdv):
    sources, paths, binaries = {}, {}, {}
    for kind, bwd in (("backward_dq", dq), ("backward_dkdv", dkdv)):
        if bwd is None:
            continue
        sources[kind] = render(spec, bwd, kind)
        binaries[kind], paths[kind] = compile_cached(sources[kind], f"{spec.name}_{kind}", bwd.target, kernel_name(spec, kind))
    return BackwardKernels(spec, BackwardPlan(dev.arch, dq, dkdv), sources, paths, binaries), binaries


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--seqlen", type=int, default=8192)
    ap.add_argument("--top", type=int, default=6)
    ap.add_argument("--deterministic", action="store_true", help="the two-pass backward (default: dQ with atomics)")
    ap.add_argument("--path", choices=("mma_sync", "wgmma"), help="only this path's candidates (default: both)")
    ap.add_argument("--tiles", default="", help="only these candidates, BMxBNxWARPScCHUNKsSTAGES[kKEYS_PER_WARP], comma-separated")
    args = ap.parse_args(argv)
    wanted = {t for t in args.tiles.split(",") if t}

    def chosen(p) -> bool:
        label = f"{p.block_m}x{p.block_n}x{p.warps}c{p.chunk}s{p.stages}"
        return (args.path in (None, p.path)) and (not wanted or label in wanted or f"{label}k{p.warp_keys}" in wanted)
    dev = device_mod.live_device(torch.cuda.current_device())
    print(f"{'d':>4} {'causal':>6} {'pass':>5} {'tile':>9} {'warps':>5} {'keys':>4} {'chunk':>5} {'stages':>6} {'regs':>5} {'spill':>5} "
          f"{'ms':>8}  rank")
    for d in (int(x) for x in args.dims.split(",")):
        heads, seqlen = 2048 // d, args.seqlen
        batch = max(1, 16384 // seqlen)
        for causal in (False, True):
            spec = attngen.Spec(head_dim=d, causal=causal, deterministic=args.deterministic)
            q, k, v = make_inputs(batch, seqlen, heads, heads, d, "bf16")[0]
            out, lse = attngen.attention(q, k, v, causal=causal, return_lse=True)
            dout = torch.randn_like(out)
            kinds = pass_kinds(spec)
            ranked = {kind: [p for _, p, _ in pass_candidates(kind, spec, dev) if p and chosen(p)][:args.top]
                      for kind in kinds}
            for kind in kinds:
                for rank, cand in enumerate(ranked[kind]):
                    pair = {k: ranked[k][0] if k in kinds else None for k in ("dq", "dkdv")} | {kind: cand}
                    try:
                        kernels, binaries = kernels_for(spec, dev, pair["dq"], pair["dkdv"])
                    except Exception as exc:
                        print(f"# {kind} {cand.block_m}x{cand.block_n}: {str(exc).splitlines()[0]}", file=sys.stderr)
                        continue
                    r = binaries[f"backward_{kind}"].resources
                    ms = time_ms(lambda *a: kernels(*a), [(q, k, v, out, lse, dout)], warmup=3, reps=15)
                    print(f"{d:>4} {str(causal):>6} {kind:>5} {cand.block_m:>4}x{cand.block_n:<4} {cand.warps:>5} "
                          f"{cand.warp_keys:>4} {cand.chunk:>5} {cand.stages:>6} {r.registers:>5} {str(r.spill_bytes):>5} {ms:>8.3f}  {rank}",
                          flush=True)
    print(f"# {torch.cuda.get_device_name()}: whole-backward ms with one pass swapped (the other at rank 0)")


if __name__ == "__main__":
    main()
