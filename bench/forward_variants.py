"""The Hopper forward with and without warpgroup ping-pong (planner.forward.wgmma_pingpong), bf16 and e4m3,
beside cuDNN, at the flash suite's shapes (batch x seqlen = 16384 tokens, heads x head_dim = 2048). One
process per variant (the planner's choice is read at build time); inputs rotated past L2, medians of CUDA
events. Issue 17's question: which dtypes and head dims should take turns at the tensor cores?

    PYTHONPATH=. python3 bench/forward_variants.py [--seqlens 4096,16384] [--dims 128,256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = ("no_turns", "turns")


def measure(variant: str, seqlens, dims) -> dict:
    import torch

    import attngen
    import attngen.planner.forward as forward
    from attngen.tools.benchmark import flops, make_inputs, sdpa, time_ms
    from torch.nn.attention import SDPBackend

    forward.wgmma_pingpong = lambda spec: variant == "turns"
    row = {"variant": variant}
    for d in dims:
        for causal in (False, True):
            for seqlen in seqlens:
                batch, heads = 16384 // seqlen, 2048 // d
                work = flops(batch, heads, seqlen, d, causal) / 1e9
                for dtype in ("bf16", "fp8_e4m3"):
                    sets = make_inputs(batch, seqlen, heads, heads, d, dtype)
                    ms = time_ms(lambda q, k, v: attngen.attention(q, k, v, causal=causal), sets)
                    row[f"{dtype}_d{d}_{'c' if causal else 'n'}_{seqlen}"] = work / ms
                    if dtype == "bf16" and variant == VARIANTS[0]:
                        cudnn = sdpa(SDPBackend.CUDNN_ATTENTION, causal)
                        row[f"cudnn_d{d}_{'c' if causal else 'n'}_{seqlen}"] = work / time_ms(cudnn, sets)
                    del sets
                    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="4096,16384")
    parser.add_argument("--dims", default="128,256")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)    # (the child process's)
    args = parser.parse_args()
    seqlens = [int(x) for x in args.seqlens.split(",")]
    dims = [int(x) for x in args.dims.split(",")]
    if args.variant:
        print(json.dumps(measure(args.variant, seqlens, dims)))
        return
    rows = {}
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--seqlens", args.seqlens,
                               "--dims", args.dims], capture_output=True, text=True)
        if done.returncode:
            print(f"{variant}: failed\n{done.stderr[-3000:]}")
            continue
        rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    print("TFLOP/s (median of CUDA-event timings, inputs rotated past L2)")
    print(f"{'case':<16} {'cudnn':>7} " + " ".join(f"{dt + ' ' + v:>18}" for dt in ("bf16", "fp8") for v in VARIANTS)
          + f" {'fp8/bf16 best':>14}")
    base = rows.get(VARIANTS[0], {})
    for key in (k for k in base if k.startswith("cudnn_")):
        case = key[len("cudnn_"):]
        got = {(dt, v): rows.get(v, {}).get(f"{dt}_{case}", float("nan")) for dt in ("bf16", "fp8_e4m3") for v in VARIANTS}
        best = max(got[("fp8_e4m3", v)] for v in VARIANTS) / max(got[("bf16", v)] for v in VARIANTS)
        print(f"{case:<16} {base[key]:>7.1f} " + " ".join(f"{x:>18.1f}" for x in got.values()) + f" {best:>14.2f}")


if __name__ == "__main__":
    main()
