"""The decode kernel's shape constants against each other, in CUDA graphs (the kernels alone), beside cuDNN:
keys per warp per stage (16 or 32) and the shared-memory target that sets the ring's depth and CTAs per SM.
One process per variant (the planner's constants are read at build time); the kernels are attngen's own
template, only the plan differs. Issue 15's open question: does a 32-key warp slice (half the softmax,
rescale and fragment work per byte) close the last ~5 % to cuDNN at batch 32?

    PYTHONPATH=. python3 bench/decode_variants.py [--seqlens 4096,32768] [--pages 0,16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANTS = {                     # name: (keys per warp, shared-memory target per CTA in KB)
    "16x3_2cta": (16, 110),      # the planner's choice: 3 stages, two CTAs per SM
    "16x4_1cta": (16, 160),
    "32x2_1cta": (32, 150),
    "32x3_1cta": (32, 215),
}


def measure(variant: str, seqlens, pages) -> dict:
    import torch

    import attngen
    import attngen.planner.decode as decode
    from attngen.tools.benchmark import decode_input_sets, sdpa, time_ms_graph
    from torch.nn.attention import SDPBackend

    decode.DECODE_KEYS_PER_WARP, target_kb = VARIANTS[variant]
    decode.DECODE_SMEM_TARGET = target_kb * 1024
    cudnn = sdpa(SDPBackend.CUDNN_ATTENTION, False)
    row = {"variant": variant}
    for seqlen in seqlens:
        for page in pages:
            sets, kv_bytes = decode_input_sets(32, seqlen, 32, 8, 128, page)
            ms = time_ms_graph(lambda q, k, v, n, t: attngen.attention_with_kvcache(q, k, v, cache_seqlens=n,
                                                                                     block_table=t), sets)
            row[f"p{page}_{seqlen}"] = kv_bytes / ms / 1e6
            if page == 0:
                row[f"cudnn_{seqlen}"] = kv_bytes / time_ms_graph(lambda q, k, v, n, t: cudnn(q, k, v), sets) / 1e6
            del sets
            torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="4096,32768")
    parser.add_argument("--pages", default="0,16")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)    # (the child process's)
    args = parser.parse_args()
    seqlens = [int(x) for x in args.seqlens.split(",")]
    pages = [int(x) for x in args.pages.split(",")]
    if args.variant:
        print(json.dumps(measure(args.variant, seqlens, pages)))
        return
    rows = []
    for variant in VARIANTS:
        done = subprocess.run([sys.executable, __file__, "--variant", variant, "--seqlens", args.seqlens,
                               "--pages", args.pages], capture_output=True, text=True)
        if done.returncode:
            print(f"{variant}: failed\n{done.stderr[-2000:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    keys = [k for k in rows[0] if k != "variant"] if rows else []
    print("K/V GB/s in CUDA graphs, batch 32, 32/8 heads, d128 (pN: N-token pages, 0 contiguous)")
    print(f"{'variant':>10} " + " ".join(f"{k:>12}" for k in keys) + "  " +
          " ".join(f"{'/cudnn ' + str(s):>12}" for s in seqlens))
    for r in rows:
        ratios = " ".join(f"{r[f'p0_{s}'] / r[f'cudnn_{s}']:>12.3f}" for s in seqlens)
        print(f"{r['variant']:>10} " + " ".join(f"{r[k]:>12.0f}" for k in keys) + "  " + ratios)


if __name__ == "__main__":
    main()
