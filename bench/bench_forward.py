"""Forward benchmark on FlashAttention's shapes: attngen beside torch SDPA flash and cuDNN, one run.

    PYTHONPATH=. python3 bench/bench_forward.py [--seqlens 512,...] [--dims 64,128] [--dtypes bf16,fp16]
        [--causal false,true] [--tiles 128x64x4x2,128x128x12x2xwgmma,...] [--json FILE]

batch x seqlen = --tokens (16384), heads = --hidden (2048) / head_dim. Prints a table last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import attngen
from attngen.tools.benchmark import format_table, measure


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--causal", default="false,true")
    ap.add_argument("--tiles", default="", help="comma-separated BMxBNxWARPSxSTAGES[xPATH] overrides to compare (PATH: mma_sync | wgmma)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--json", default="")
    ap.add_argument("--flex", action="store_true", help="also time torch.compile'd FlexAttention")
    args = ap.parse_args(argv)
    tiles_list = args.tiles.split(",") if args.tiles else [""]   # an empty entry is the planner's choice
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, attngen {attngen.__version__}, "
          f"{time.strftime('%Y-%m-%d')}", file=sys.stderr)
    rows = []
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            for causal in (c == "true" for c in args.causal.split(",")):
                for seqlen in (int(x) for x in args.seqlens.split(",")):
                    batch, heads = max(1, args.tokens // seqlen), args.hidden // d
                    rows.append(measure(dtype, d, causal, seqlen, batch, heads, tiles_list=tiles_list,
                                        with_flex=args.flex))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(format_table(rows, tiles_list))


if __name__ == "__main__":
    main()
