"""Decode over a KV cache: attngen.attention_with_kvcache beside torch SDPA (flash, cuDNN) on the same shapes,
as K/V bandwidth (bytes of K and V read / time) against the copy peak measured in the same run.

    PYTHONPATH=. python3 bench/bench_decode.py [--batches 1,8,32] [--seqlens 1024,4096,32768,131072]
        [--pages 0,16] [--heads 32,8] [--head-dim 128] [--json FILE]

One new query token per sequence (Sq = 1) against a full cache of Sk tokens; GQA 32:8, bf16. Inputs rotate
past L2; median CUDA-event times after warm-up. Paged rows: 16-token pages in a shuffled page table (the
peers read the same sizes from contiguous caches).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

import attngen
from attngen.tools.benchmark import L2_BYTES, sdpa, time_ms


def copy_peak_gbps() -> float:
    """(read + write bytes) / time of a 2 GiB device-to-device copy: the bandwidth a streaming kernel can reach."""
    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda a, b: b.copy_(a), [(x, y)], warmup=3, reps=10)
    return 2 * x.numel() * 2 / ms / 1e6


def cache_sets(batch, seqlen, heads_q, heads_kv, d, page_size):
    """Rotating input sets (q, k_cache, v_cache, cache_seqlens, block_table)."""
    kv_bytes = 2 * batch * seqlen * heads_kv * d * 2
    n_sets = max(2, math.ceil(2 * L2_BYTES / kv_bytes))
    gen = torch.Generator(device="cuda").manual_seed(seqlen + batch)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, 1, heads_q, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        if page_size:
            pages = batch * seqlen // page_size
            shape = (pages, page_size, heads_kv, d)
            table = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(batch, -1)
        else:
            shape, table = (batch, seqlen, heads_kv, d), None
        k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
        lengths = torch.full((batch,), seqlen, dtype=torch.int32, device="cuda")
        sets.append((q, k, v, lengths, table))
    return sets, kv_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--seqlens", default="1024,4096,32768,131072")
    parser.add_argument("--pages", default="0,16", help="page sizes; 0: a contiguous cache")
    parser.add_argument("--heads", default="32,8")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    heads_q, heads_kv = (int(x) for x in args.heads.split(","))
    d = args.head_dim
    peak = copy_peak_gbps()
    print(f"copy peak (read + write) {peak:.0f} GB/s")
    from torch.nn.attention import SDPBackend
    peers = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, False), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, False)}
    rows = []
    for batch in (int(x) for x in args.batches.split(",")):
        for seqlen in (int(x) for x in args.seqlens.split(",")):
            if 2 * batch * seqlen * heads_kv * d * 2 > 24 * 2 ** 30:
                continue                                               # past the rotation's memory
            row = {"batch": batch, "seqlen_k": seqlen}
            for page_size in (int(x) for x in args.pages.split(",")):
                sets, kv_bytes = cache_sets(batch, seqlen, heads_q, heads_kv, d, page_size)
                run = lambda q, k, v, n, t: attngen.attention_with_kvcache(q, k, v, cache_seqlens=n, block_table=t)  # noqa: E731
                ms = time_ms(run, sets)
                row[f"attngen_page{page_size}_us"] = ms * 1e3
                row[f"attngen_page{page_size}_gbps"] = kv_bytes / ms / 1e6
                if page_size == 0:
                    for name, fn in peers.items():
                        try:
                            peer_ms = time_ms(lambda q, k, v, n, t: fn(q, k, v), sets)
                            row[f"{name}_us"], row[f"{name}_gbps"] = peer_ms * 1e3, kv_bytes / peer_ms / 1e6
                        except Exception as exc:               # a backend may refuse the shape
                            row[f"{name}_us"] = row[f"{name}_gbps"] = None
                            row[f"{name}_note"] = str(exc).splitlines()[0][:120]
                del sets
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row))
    print(f"\nK/V bandwidth, GB/s (fraction of the {peak:.0f} GB/s copy peak); Sq=1, {heads_q}q/{heads_kv}kv heads, d{d}, bf16")
    cols = [c for c in ("attngen_page0", "attngen_page16", "sdpa_flash", "sdpa_cudnn") if any(c + "_gbps" in r for r in rows)]
    print(f"{'batch':>5} {'Sk':>7} " + " ".join(f"{c:>22}" for c in cols) + "  attngen/cudnn")
    for r in rows:
        cells = []
        for c in cols:
            g = r.get(c + "_gbps")
            cells.append(f"{g:8.0f} ({g / peak:4.2f}) {r[c + '_us']:6.0f}us" if g else f"{'-':>22}")
        cudnn, mine = r.get("sdpa_cudnn_gbps"), r.get("attngen_page0_gbps")
        print(f"{r['batch']:>5} {r['seqlen_k']:>7} " + " ".join(cells) + (f"  {mine / cudnn:5.2f}" if cudnn and mine else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"copy_peak_gbps": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
