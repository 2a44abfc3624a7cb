"""The mma.sync path (what sm_80/sm_86/sm_89 run) against SDPA's FlashAttention-2 on the same GPU: forward,
backward alone and forward + backward, FlashAttention's shapes (batch x seqlen = 16384, hidden 2048).

    PYTHONPATH=. python3 bench/bench_mma_sync.py [--seqlens 2048,8192] [--dims 64,128,256] [--tiles 128x64x4x2,...]

On Hopper the planner would pick wgmma; here both of attngen's passes are forced onto mma.sync
(build(path="mma_sync"), build_backward(path="mma_sync")), so the table is issue 17 item 3's comparison.
--tiles adds forward-only columns for other mma.sync tiles (BMxBNxWARPSxSTAGES). TFLOP/s: forward 1x,
backward 2.5x, fwd+bwd 3.5x the forward's FLOPs; medians of CUDA-event timings over inputs rotated past L2.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import attngen
from attngen.tools.benchmark import flash_shapes, flops, make_inputs, sdpa, time_ms


def flash_passes(causal):
    """SDPA flash's forward, and its backward alone from a saved graph (retain_graph: the same forward's)."""
    run = sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION, causal)

    def backward_sets(inputs):
        sets = []
        for q, k, v in inputs:
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v)]
            out = run(*leaves)
            sets.append((out, leaves, torch.randn_like(out)))
        return sets

    def backward(out, leaves, dout):
        torch.autograd.grad(out, leaves, dout, retain_graph=True)
    return run, backward_sets, backward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,8192")
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--tiles", default="", help="extra forward tiles BMxBNxWARPSxSTAGES, comma-separated")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    tiles = [t for t in args.tiles.split(",") if t]
    rows = []
    for d, causal, seqlen, batch, heads in flash_shapes(args.dims, args.causal, args.seqlens):
        inputs = make_inputs(batch, seqlen, heads, heads, d, "bf16")
        work = flops(batch, heads, seqlen, d, causal)
        spec = attngen.Spec(head_dim=d, causal=causal)
        fwd = attngen.build(spec, path="mma_sync")
        bwd = attngen.build_backward(spec, path="mma_sync")
        flash_fwd, flash_sets, flash_bwd = flash_passes(causal)
        sets = []
        for q, k, v in inputs:
            out, lse = fwd(q, k, v)
            sets.append((q, k, v, out, lse, torch.randn_like(out)))

        def ours_fwd_bwd(q, k, v, out, lse, dout):
            out, lse = fwd(q, k, v, out=out, lse=lse)
            bwd(q, k, v, out, lse, dout)

        row = dict(d=d, causal=causal, seqlen=seqlen, batch=batch, heads=heads)
        row["fwd"] = work / time_ms(lambda q, k, v: fwd(q, k, v), inputs) / 1e9
        row["flash_fwd"] = work / time_ms(flash_fwd, inputs) / 1e9
        row["bwd"] = 2.5 * work / time_ms(lambda *a: bwd(*a), sets) / 1e9
        row["flash_bwd"] = 2.5 * work / time_ms(flash_bwd, flash_sets(inputs)) / 1e9
        row["fwd_bwd"] = 3.5 * work / time_ms(ours_fwd_bwd, sets) / 1e9
        # flash's fwd+bwd from its two halves (the same kernels; no autograd bookkeeping counted)
        row["flash_fwd_bwd"] = 3.5 / (1 / row["flash_fwd"] + 2.5 / row["flash_bwd"])
        for t in tiles:
            bm, bn, w, st = (int(x) for x in t.split("x"))
            try:
                tiled = attngen.build(attngen.Spec(head_dim=d, causal=causal, tile=dict(
                    block_m=bm, block_n=bn, warps=w, stages=st, path="mma_sync")))
            except Exception as exc:      # a tile may not fit or may spill at this head dim
                print(f"# {t} at d{d}: {str(exc).splitlines()[0]}", file=sys.stderr)
                row[f"fwd {t}"] = float("nan")
                continue
            row[f"fwd {t}"] = work / time_ms(lambda q, k, v: tiled(q, k, v), inputs) / 1e9
        p = fwd.plan
        row["plan"] = f"fwd {p.block_m}x{p.block_n}x{p.warps}x{p.stages}; " + ", ".join(
            f"{kind} {q.block_m}x{q.block_n}x{q.warps} c{q.chunk}" for kind, q in bwd.plan.passes.items())
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
        del inputs, sets
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("mma.sync path vs SDPA flash (FlashAttention-2), TFLOP/s; ratios attngen / flash")
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} {'fwd':>6} {'flash':>6} {'ratio':>5} {'bwd':>6} {'flash':>6} "
          f"{'ratio':>5} {'f+b':>6} {'flash':>6} {'ratio':>5}  " + " ".join(f"{t:>14}" for t in tiles) + "  plan")
    for r in rows:
        extra = " ".join(f"{r[f'fwd {t}']:>14.1f}" for t in tiles)
        print(f"{r['d']:>4} {str(r['causal']):>6} {r['seqlen']:>6} {r['fwd']:>6.1f} {r['flash_fwd']:>6.1f} "
              f"{r['fwd'] / r['flash_fwd']:>5.2f} {r['bwd']:>6.1f} {r['flash_bwd']:>6.1f} {r['bwd'] / r['flash_bwd']:>5.2f} "
              f"{r['fwd_bwd']:>6.1f} {r['flash_fwd_bwd']:>6.1f} {r['fwd_bwd'] / r['flash_fwd_bwd']:>5.2f}  {extra}  {r['plan']}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, attngen {attngen.__version__}")


if __name__ == "__main__":
    main()
