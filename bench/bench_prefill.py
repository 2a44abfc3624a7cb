"""Chunked prefill over a KV cache: attngen.attention_with_kvcache with a chunk of new tokens (appended, then
attended causally over the whole cache) beside attngen.attention's dense forward on the same tokens (q: the
chunk; k, v: the cached tokens and the chunk, contiguous). The bar (issue 15): paged within 10 % of dense.

    PYTHONPATH=. python3 bench/bench_prefill.py [--cases 1x4096x28672,1x2048x14336] [--pages 0,16,128]

A case is batch x chunk x cached tokens; 32 query / 8 KV heads, d128, bf16. Median CUDA-event times after
warm-up over two input sets; TFLOP/s on the causal pairs (chunk rows x their visible keys).
"""

from __future__ import annotations

import argparse

import torch

import attngen
from attngen.tools.benchmark import time_ms

HEADS, HEADS_KV, D = 32, 8, 128


def cases(text: str):
    return [tuple(int(x) for x in case.split("x")) for case in text.split(",") if case]


def input_set(batch, chunk, cached, page_size, gen):
    total = cached + chunk
    rows = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)  # noqa: E731
    q = rows(batch, chunk, HEADS, D)
    k_full, v_full = rows(batch, total, HEADS_KV, D), rows(batch, total, HEADS_KV, D)
    k_new, v_new = k_full[:, cached:].contiguous(), v_full[:, cached:].contiguous()
    if page_size:
        per = -(-total // page_size)
        table = torch.randperm(batch * per, device="cuda", generator=gen).to(torch.int32).view(batch, per)
        k_cache = torch.zeros(batch * per, page_size, HEADS_KV, D, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        positions = torch.arange(total, device="cuda")
        for b in range(batch):
            pages = table[b, positions // page_size].long()
            k_cache[pages, positions % page_size] = k_full[b]
            v_cache[pages, positions % page_size] = v_full[b]
    else:
        table, k_cache, v_cache = None, k_full.clone(), v_full.clone()
    lengths = torch.full((batch,), cached, dtype=torch.int32, device="cuda")
    return (q, k_cache, v_cache, k_new, v_new, lengths, table), (q, k_full, v_full)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x4096x28672,1x2048x14336,4x1024x7168")
    parser.add_argument("--pages", default="0,16,128")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'batch':>5} {'chunk':>6} {'cached':>7} {'page':>5} {'prefill us':>11} {'dense us':>9} {'TFLOP/s':>8} "
          f"{'prefill/dense':>13} {'max|diff|':>10}")
    for batch, chunk, cached in cases(args.cases):
        pairs = batch * HEADS * sum(cached + i + 1 for i in range(chunk))       # causal, bottom-right
        for page_size in (int(p) for p in args.pages.split(",")):
            sets = [input_set(batch, chunk, cached, page_size, gen) for _ in range(2)]
            prefill = [s[0] for s in sets]
            dense = [s[1] for s in sets]
            run = lambda q, kc, vc, kn, vn, n, t: attngen.attention_with_kvcache(  # noqa: E731
                q, kc, vc, kn, vn, cache_seqlens=n, block_table=t, causal=True)
            ms = time_ms(run, prefill)
            dense_ms = time_ms(lambda q, k, v: attngen.attention(q, k, v, causal=True), dense)
            diff = (run(*prefill[0]).float() - attngen.attention(*dense[0], causal=True).float()).abs().max().item()
            print(f"{batch:>5} {chunk:>6} {cached:>7} {page_size:>5} {ms * 1e3:>11.1f} {dense_ms * 1e3:>9.1f} "
                  f"{4 * pairs * D / ms / 1e9:>8.1f} {ms / dense_ms:>13.3f} {diff:>10.2e}")
            del sets, prefill, dense
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
