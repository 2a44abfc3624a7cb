"""Forward benchmark: attngen beside torch SDPA's flash and cuDNN backends, in one run, same shapes.

FlashAttention's benchmark shapes: batch x seqlen = 16384, hidden = 2048 (heads = 2048 / head_dim).
FLOPs are counted as FlashAttention does: 4 * batch * heads * seqlen^2 * head_dim, halved when causal.
Times are medians of CUDA-event timings after warm-up; input sets rotate so L2 holds none of them.

    PYTHONPATH=. python3 bench/bench_forward.py [--seqlens 512,...] [--dims 64,128] [--dtypes bf16,fp16]
                                               [--tiles 128x64x4x2,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attngen
from attngen.api import spec_for_inputs

L2_BYTES = 64 << 20


def flops(batch, heads, seqlen, d, causal):
    return 4.0 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)


def time_ms(fn, input_sets, warmup=5, reps=30):
    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    samples = []
    for i in range(reps):
        args = input_sets[i % len(input_sets)]
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def make_inputs(batch, seqlen, heads, d, dtype):
    set_bytes = 3 * batch * seqlen * heads * d * 2
    n_sets = max(2, math.ceil(2 * L2_BYTES / set_bytes))
    gen = torch.Generator(device="cuda").manual_seed(seqlen * d)
    return [tuple(torch.randn(batch, seqlen, heads, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
            for _ in range(n_sets)]


def sdpa(backend, causal):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal)
    return run


def attngen_fn(q, causal, tiles):
    spec = spec_for_inputs(q, q, q, causal)
    if tiles:
        bm, bn, w, st = (int(x) for x in tiles.split("x"))
        spec = attngen.Spec(head_dim=spec.head_dim, dtype=spec.dtype, causal=causal,
                            tile=dict(block_m=bm, block_n=bn, warps=w, stages=st))
    kernel = attngen.build(spec)
    return kernel, (lambda q, k, v: kernel(q, k, v))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--tiles", default="", help="comma-separated BMxBNxWARPSxSTAGES overrides to compare")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    tiles_list = [t for t in args.tiles.split(",") if t] or [""]
    rows = []
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu}, torch {torch.__version__}, attngen {attngen.__version__}, {time.strftime('%Y-%m-%d')}",
          file=sys.stderr)
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            for causal in (c == "true" for c in args.causal.split(",")):
                for seqlen in (int(x) for x in args.seqlens.split(",")):
                    batch, heads = max(1, args.tokens // seqlen), args.hidden // d
                    inputs = make_inputs(batch, seqlen, heads, d, torch_dtypes[dtype])
                    work = flops(batch, heads, seqlen, d, causal)
                    row = dict(gpu=gpu, dtype=dtype, head_dim=d, causal=causal, seqlen=seqlen, batch=batch,
                               heads=heads, gflop=work / 1e9)
                    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                        try:
                            row[name] = work / time_ms(sdpa(backend, causal), inputs) / 1e9
                        except RuntimeError as exc:
                            row[name] = None
                            print(f"# {name} unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
                    for tiles in tiles_list:
                        label = "attngen" + (f"[{tiles}]" if tiles else "")
                        try:
                            kernel, fn = attngen_fn(inputs[0][0], causal, tiles)
                        except attngen.PlanError as exc:
                            row[label] = None
                            print(f"# {label}: {exc}", file=sys.stderr)
                            continue
                        row[label] = work / time_ms(fn, inputs) / 1e9
                        p = kernel.plan
                        row[label + "_plan"] = f"{p.block_m}x{p.block_n}x{p.warps}x{p.stages}"
                        row[label + "_regs"] = kernel.resources.registers
                        row[label + "_spill"] = kernel.resources.spill_bytes
                    rows.append(row)
                    line = " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                    if k not in ("gpu", "gflop"))
                    print(line, file=sys.stderr, flush=True)
                    del inputs
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print_table(rows, tiles_list)


def print_table(rows, tiles_list):
    labels = ["attngen" + (f"[{t}]" if t else "") for t in tiles_list]
    head = f"{'dtype':>5} {'d':>4} {'causal':>6} {'seqlen':>6} {'flash':>7} {'cudnn':>7} " + " ".join(
        f"{lab[-18:]:>18} {'/flash':>6}" for lab in labels)
    print("TFLOP/s (median)\n" + head)
    for r in rows:
        fl, cu = r.get("sdpa_flash"), r.get("sdpa_cudnn")
        cells = []
        for lab in labels:
            ours = r[lab] or float("nan")
            cells.append(f"{ours:>18.1f} {ours / fl if fl else float('nan'):>6.2f}")
        print(f"{r['dtype']:>5} {r['head_dim']:>4} {str(r['causal']):>6} {r['seqlen']:>6} "
              f"{fl or float('nan'):>7.1f} {cu or float('nan'):>7.1f} " + " ".join(cells))


if __name__ == "__main__":
    main()
