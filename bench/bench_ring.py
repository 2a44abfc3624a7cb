"""Weak scaling of ring attention (issue 18): `world` GPUs each holding `tokens` tokens of one sequence, beside one
GPU attending `tokens` alone (attngen.attention). The bar: per-GPU throughput at 2 x 64K >= 0.9 of 1 x 64K,
causal and not, counted in attention work (each ring GPU does world times the single GPU's).

    torchrun --nproc-per-node 2 bench/bench_ring.py [--tokens 65536] [--heads 16,16] [--backward]

Run it under torchrun on a machine with several GPUs; rank 0 prints one line per mode. Median CUDA-event times
after warm-up; the single-GPU baseline runs on rank 0 before the ring.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import attngen
from attngen import distributed as ring_mod


def median_ms(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        dist.barrier()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per GPU")
    parser.add_argument("--heads", default="16,16", help="query heads, KV heads")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--backward", action="store_true")
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    world = dist.get_world_size()
    heads_q, heads_kv = (int(h) for h in args.heads.split(","))
    d, n = args.head_dim, args.tokens
    gen = torch.Generator(device="cuda").manual_seed(rank)
    shard = [torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(args.backward)
             for h in (heads_q, heads_kv, heads_kv)]
    for causal in (False, True):
        def single():
            out = attngen.attention(*shard, causal=causal)
            if args.backward:
                out.backward(torch.ones_like(out))

        def ring():
            out = ring_mod.ring_attention(*shard, causal=causal)
            if args.backward:
                out.backward(torch.ones_like(out))
        ring_ms = median_ms(ring)
        single_ms = median_ms(single) if rank == 0 else 0.0
        if rank == 0:
            # Every query of the ring meets world x n keys, so a GPU's attention work is world times that of one
            # GPU on an n-token sequence (causal too): the weak-scaling efficiency is world x single / ring.
            print(f"world {world} x {n} tokens, causal={causal}, {'fwd+bwd' if args.backward else 'fwd'}: ring "
                  f"{ring_ms:.2f} ms, one GPU on {n} tokens {single_ms:.2f} ms; tokens/s per GPU "
                  f"{n / ring_ms * 1e3:.3g} vs {n / single_ms * 1e3:.3g}; work-normalised efficiency "
                  f"{world * single_ms / ring_ms:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
