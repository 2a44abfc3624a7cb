"""One forward kernel, called repeatedly, for Nsight Compute to read (no timing here): the Hopper forward at
the flash suite's long-sequence shape in bf16 or e4m3, so the two can be compared pipe by pipe.

    ncu --clock-control none -k regex:_fwd --launch-skip 3 --launch-count 1 \
        python3 bench/profile_forward.py --dtype fp8 --seqlen 16384

Shape: batch x seqlen = 16384 tokens, heads x head_dim = 2048 (the suite's), non-causal unless --causal.
"""

from __future__ import annotations

import argparse

import torch

import attngen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp8"), default="bf16")
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    batch, heads = max(1, 16384 // args.seqlen), 2048 // args.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, args.seqlen, heads, args.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen) for _ in range(3))
    if args.dtype == "fp8":                 # N(0, 1) values fit e4m3's range as they are: no descale factors
        q, k, v = (x.to(torch.float8_e4m3fn) for x in (q, k, v))
    for _ in range(args.calls):
        attngen.attention(q, k, v, causal=args.causal)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
