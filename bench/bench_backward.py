"""Forward + backward benchmark: attngen (autograd through its kernels) beside torch SDPA's flash and
cuDNN backends, one run, same inputs, FlashAttention's shapes (batch x seqlen = 16384, hidden 2048).

    PYTHONPATH=. python3 bench/bench_backward.py [--seqlens 2048,8192,16384] [--dims 64,128] [--json FILE]

fwd+bwd TFLOP/s count 3.5x the forward's FLOPs (FlashAttention's convention: the backward does 2.5x the
forward's matmul work); the backward-only columns count 2.5x. attngen runs twice: the default (dQ added
with atomics from the dK/dV pass, as FlashAttention's default) and deterministic=True (a separate dQ pass).
The backward alone is timed on the planner's path and, on Hopper, on the mma.sync path too.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import attngen
from attngen.tools.benchmark import flash_shapes, flops, forward_backward, make_inputs, sdpa, time_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="2048,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    rows = []
    for d, causal, seqlen, batch, heads in flash_shapes(args.dims, args.causal, args.seqlens):
        inputs = make_inputs(batch, seqlen, heads, heads, d, "bf16")
        work = flops(batch, heads, seqlen, d, causal)
        peers = {"flash": torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                 "cudnn": torch.nn.attention.SDPBackend.CUDNN_ATTENTION}
        row = dict(d=d, causal=causal, seqlen=seqlen, batch=batch, heads=heads)
        for name, backend in peers.items():
            try:
                run = sdpa(backend, causal)
                row[name] = 3.5 * work / time_ms(forward_backward(lambda q, k, v: run(q, k, v)), inputs) / 1e9
            except Exception as exc:   # a peer may not support the shape; report and go on
                row[name] = None
                print(f"# {name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
        for key, det in (("attngen", False), ("deterministic", True)):
            ours = lambda q, k, v: attngen.attention(q, k, v, causal=causal, deterministic=det)  # noqa: E731
            row[key] = 3.5 * work / time_ms(forward_backward(ours), inputs) / 1e9
        kernel = attngen.build_backward(attngen.Spec(head_dim=d, causal=causal))
        mma_sync = attngen.build_backward(attngen.Spec(head_dim=d, causal=causal), path="mma_sync")
        bwd_sets = []
        for q, k, v in inputs:
            out, lse = attngen.attention(q, k, v, causal=causal, return_lse=True)
            bwd_sets.append((q, k, v, out, lse, torch.randn_like(out)))
        row["attngen_bwd"] = 2.5 * work / time_ms(lambda *a: kernel(*a), bwd_sets) / 1e9
        row["mma_sync_bwd"] = 2.5 * work / time_ms(lambda *a: mma_sync(*a), bwd_sets) / 1e9
        row["plan"] = ", ".join(f"{kind} {p.block_m}x{p.block_n}x{p.warps} c{p.chunk} {p.path}"
                                for kind, p in kernel.plan.passes.items())
        rows.append(row)
        print(row, file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("fwd+bwd TFLOP/s (3.5x forward FLOPs; median of CUDA-event timings)")
    print(f"{'d':>4} {'causal':>6} {'seqlen':>6} {'flash':>7} {'cudnn':>7} {'attngen':>8} {'/flash':>6} {'determ.':>8} "
          f"{'/flash':>6} {'bwd only':>8} {'mma.sync':>8}  plan")
    for r in rows:
        flash = r["flash"] or float("nan")
        print(f"{r['d']:>4} {str(r['causal']):>6} {r['seqlen']:>6} {flash:>7.1f} {r['cudnn'] or float('nan'):>7.1f} "
              f"{r['attngen']:>8.1f} {r['attngen'] / flash:>6.2f} {r['deterministic']:>8.1f} "
              f"{r['deterministic'] / flash:>6.2f} {r['attngen_bwd']:>8.1f} {r['mma_sync_bwd']:>8.1f}  {r['plan']}")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, attngen {attngen.__version__}")


if __name__ == "__main__":
    main()
