"""One kernel, called repeatedly, for Nsight Compute to read (no timing here): the KV-cache kernels beside the
kernel each is measured against.

    ncu --clock-control none -k regex:NAME --launch-skip 4 --launch-count 1 \
        python3 bench/profile_kvcache.py --what prefill --page 16

--what prefill: attention_with_kvcache over a chunk of new tokens (batch x chunk x cached, 32/8 heads, d128);
--what dense: attention() on the same tokens; --what decode: one new token per sequence against a full cache;
--what cudnn: SDPA's cuDNN kernel on the decode shape.
"""

from __future__ import annotations

import argparse

import torch

import attngen
from bench_prefill import input_set

HEADS, HEADS_KV, D = 32, 8, 128


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("prefill", "dense", "decode", "cudnn"), required=True)
    parser.add_argument("--case", default="1x2048x14336", help="batch x chunk x cached (prefill, dense)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=32768, help="cached tokens (decode, cudnn)")
    parser.add_argument("--page", type=int, default=0)
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.what in ("prefill", "dense"):
        batch, chunk, cached = (int(x) for x in args.case.split("x"))
        prefill, dense = input_set(batch, chunk, cached, args.page, gen)
        if args.what == "prefill":
            call = lambda: attngen.attention_with_kvcache(*prefill[:3], prefill[3], prefill[4],  # noqa: E731
                                                          cache_seqlens=prefill[5], block_table=prefill[6], causal=True)
        else:
            call = lambda: attngen.attention(*dense, causal=True)  # noqa: E731
    else:
        rows = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
        q = rows(args.batch, 1, HEADS, D)
        if args.what == "cudnn":              # the bench's peer: SDPA with GQA over [batch, heads, seq, d]
            from torch.nn.attention import SDPBackend, sdpa_kernel
            k, v = (rows(args.batch, args.seqlen, HEADS_KV, D).transpose(1, 2) for _ in range(2))
            qt = q.transpose(1, 2)

            def call():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qt, k, v, enable_gqa=True)
        else:
            lengths = torch.full((args.batch,), args.seqlen, dtype=torch.int32, device="cuda")
            if args.page:
                per = -(-args.seqlen // args.page)
                table = torch.randperm(args.batch * per, device="cuda", generator=gen).to(torch.int32).view(args.batch, per)
                k = rows(args.batch * per, args.page, HEADS_KV, D)
            else:
                table, k = None, rows(args.batch, args.seqlen, HEADS_KV, D)
            v = torch.randn_like(k)
            call = lambda: attngen.attention_with_kvcache(q, k, v, cache_seqlens=lengths, block_table=table)  # noqa: E731
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
