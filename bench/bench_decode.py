"""Decode over a KV cache: attngen.attention_with_kvcache beside torch SDPA (flash, cuDNN) on the same shapes,
as K/V bandwidth (bytes of K and V read / time) against the copy peak measured in the same run. The rows of
`attngen bench --suite decode`.

    PYTHONPATH=. python3 bench/bench_decode.py [--batches 1,8,32] [--seqlens 1024,4096,32768,131072]
        [--pages 0,16] [--heads 32,8] [--head-dim 128] [--json FILE]

One new query token per sequence (Sq = 1) against a full cache of Sk tokens; GQA 32:8, bf16. Inputs rotate
past L2; median CUDA-event times after warm-up. Paged rows: pages in a shuffled page table (the peers read the
same sizes from contiguous caches).
"""

from __future__ import annotations

import argparse
import json

from attngen.tools.benchmark import bench_decode, format_decode_rows


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seqlens", default="1024,4096,32768,131072")
    parser.add_argument("--pages", default="0,16", help="page sizes; 0: a contiguous cache")
    parser.add_argument("--heads", default="32,8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = bench_decode(ints(args.batches), ints(args.seqlens), ints(args.pages), ints(args.heads), args.head_dim,
                          log=print)
    print(format_decode_rows(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
