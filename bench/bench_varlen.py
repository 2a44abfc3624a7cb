"""Packed documents through attngen.attention_varlen beside attngen's batch kernel (equal lengths), its
`document` pattern, FlexAttention's document BlockMask and padded SDPA flash, 16384 tokens, hidden 2048.
`attngen bench --suite varlen` runs every mix, head dim and causality; this script a chosen subset:
    python3 bench/bench_varlen.py [--head-dims 128] [--causal-only] [--mixes uniform,docs8] [--no-backward]"""

from __future__ import annotations

import argparse
import json
import sys

from attngen.tools.benchmark import bench_varlen, format_varlen_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--mixes", default="uniform,docs8,docs64,one_long")
    parser.add_argument("--causal-only", action="store_true")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = bench_varlen(modes=("fwd",) if args.no_backward else ("fwd", "fwd+bwd"),
                        mixes=args.mixes.split(","), head_dims=[int(d) for d in args.head_dims.split(",")],
                        causal_modes=(True,) if args.causal_only else (False, True), tokens=args.tokens,
                        log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(format_varlen_rows(rows))


if __name__ == "__main__":
    main()
