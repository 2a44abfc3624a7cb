"""Document masks: the cost of creating them beside the attention they mask (issue 14, item 4).

    PYTHONPATH=. python3 bench/bench_mask_creation.py [--tokens 16384,131072,1048576] [--documents 64,4096]

For each row of packed documents (random lengths, causal within each): the host time of
BlockMask.from_pattern(Document & Causal) at 128x128 blocks and of its kv-major transpose (the dK/dV pass's
layout), beside the GPU forward time of the same attention through that BlockMask (attngen.attention with
block_mask=) and through attention_varlen, which needs no mask at all. 16 heads, d128, bf16; medians of CUDA
events after warm-up (a single input set: at 1M tokens one set is 12 GB, past any cache).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import attngen
from attngen.masks import BlockMask, Causal, Document
from attngen.tools.benchmark import time_ms


def lengths_of(tokens: int, documents: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, tokens), size=documents - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [tokens]])).tolist()


def host_ms(fn, reps: int = 3) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16384,131072,1048576")
    parser.add_argument("--documents", default="64,4096")
    args = parser.parse_args()
    heads, d = 16, 128
    print(f"{'tokens':>8} {'docs':>5} {'from_pattern':>13} {'kv-major':>9} {'fwd BlockMask':>14} {'fwd varlen':>11}"
          f" {'creation / fwd':>15}")
    for tokens in (int(x) for x in args.tokens.split(",")):
        gen = torch.Generator(device="cuda").manual_seed(tokens)
        q, k, v = (torch.randn(tokens, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
        for documents in (int(x) for x in args.documents.split(",")):
            lengths = lengths_of(tokens, documents)
            pattern = Document(tuple(lengths)) & Causal()
            create = host_ms(lambda: BlockMask.from_pattern(pattern, tokens, tokens))
            mask = BlockMask.from_pattern(pattern, tokens, tokens)
            transpose = host_ms(lambda: mask.transposed())
            fwd_mask = time_ms(lambda q, k, v: attngen.attention(q[None], k[None], v[None], block_mask=mask),
                               [(q, k, v)], warmup=2, reps=5)
            cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
            fwd_varlen = time_ms(lambda q, k, v: attngen.attention_varlen(q, k, v, cu, cu, causal=True),
                                 [(q, k, v)], warmup=2, reps=5)
            print(f"{tokens:>8} {documents:>5} {create:>10.1f} ms {transpose:>6.1f} ms {fwd_mask:>11.2f} ms "
                  f"{fwd_varlen:>8.2f} ms {create / fwd_mask:>14.2f}x", flush=True)
        del q, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
