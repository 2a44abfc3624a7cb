"""Block-sparse forward benchmark: attngen on kept blocks beside its own dense kernel and FlexAttention
with the same block mask, one run, same inputs.

    PYTHONPATH=. python3 bench/bench_sparse.py [--seqlens 4096,16384] [--json FILE] [--no-flex]

TFLOP/s count only the kept blocks' work, 4 * heads * (kept block area) * head_dim per batch element,
as FlexAttention's benchmarks do; bf16, head_dim 128, batch x seqlen = 16384, 16 heads.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

import attngen
from attngen.tools.benchmark import forward_backward, make_inputs, time_ms
from attngen.masks import BlockMask, Causal, SlidingWindow

BLOCK = 128


def kept_flops(mask: BlockMask, batch, heads, d):
    rows = np.minimum(BLOCK, mask.seqlen_q - np.arange(mask.n_q_blocks) * BLOCK)
    cols = np.minimum(BLOCK, mask.seqlen_k - np.arange(mask.n_kv_blocks) * BLOCK)
    area = (mask.kept_blocks().astype(np.float64) * rows[:, None] * cols[None, :]).sum(axis=(1, 2))
    per_head = area.mean() if mask.num_heads > 1 else area[0]
    return 4.0 * batch * heads * per_head * d


SOFTCAP = 30.0


def flex_fn(mask: BlockMask, seqlen, heads, name):
    """FlexAttention with the same mask: closed-form mask_mods for the window and causal (as a user
    writes them), a block-table lookup for the random layout, a tanh score_mod for the softcap."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    kept_blocks = torch.from_numpy(mask.kept_blocks()[0]).cuda()
    window = lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx <= 1024)  # noqa: E731
    causal = lambda b, h, q_idx, kv_idx: kv_idx <= q_idx  # noqa: E731
    mask_mods = {"sliding window 1024": window, "window 1024 (CSR)": window, "causal": causal,
                 "causal softcap 30": causal}
    mask_mod = mask_mods.get(name, lambda b, h, q_idx, kv_idx: kept_blocks[q_idx // BLOCK, kv_idx // BLOCK])
    score_mod = None
    if "softcap" in name:
        def score_mod(score, b, h, q_idx, kv_idx):
            return SOFTCAP * torch.tanh(score / SOFTCAP)

    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen, BLOCK_SIZE=BLOCK)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                        score_mod=score_mod)
    return run


# The masks as attention() keywords (autograd through attngen's forward and backward kernels).
BACKWARD_CALLS = {
    "random 25%": lambda mask: dict(block_mask=mask),
    "sliding window 1024": lambda mask: dict(causal=True, window=(1024, 0)),
    "causal": lambda mask: dict(causal=True),
}


def fwd_bwd_row(name, mask, seqlen, heads, work, inputs, no_flex) -> dict:
    """fwd+bwd TFLOP/s (3.5x the kept blocks' forward FLOPs) for attngen and FlexAttention."""
    call = BACKWARD_CALLS[name](mask)
    row = {"attngen_fwd_bwd": 3.5 * work / time_ms(forward_backward(lambda q, k, v: attngen.attention(q, k, v, **call)), inputs) / 1e9}
    if not no_flex:
        try:
            row["flex_fwd_bwd"] = 3.5 * work / time_ms(forward_backward(flex_fn(mask, seqlen, heads, name)), inputs) / 1e9
        except Exception as exc:
            row["flex_fwd_bwd"] = None
            print(f"# flex backward unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", default="4096,16384")
    ap.add_argument("--json", default="")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward (3.5x the kept FLOPs)")
    args = ap.parse_args(argv)
    d, heads, rows = 128, 16, []
    dense = attngen.build(attngen.Spec(head_dim=d, dtype="bf16"))
    runtime = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", mask={"kind": "runtime"}))
    window_mod = "kv_idx <= q_idx && q_idx - kv_idx <= 1024"      # the window again, as a runtime mask_mod
    runtime_window = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", mask={"kind": "runtime"}, mask_mod=window_mod))
    softcap = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", mask={"kind": "causal"}, softcap=SOFTCAP))
    for seqlen in (int(s) for s in args.seqlens.split(",")):
        batch = max(1, 16384 // seqlen)
        inputs = make_inputs(batch, seqlen, heads, heads, d, "bf16")
        n = -(-seqlen // BLOCK)
        rng = np.random.default_rng(0)
        window = BlockMask.from_pattern(SlidingWindow(1024, 0), seqlen, seqlen)
        causal = BlockMask.from_pattern(Causal(), seqlen, seqlen)
        masks = {
            "random 25%": BlockMask.from_dense(rng.random((1, n, n)) < 0.25, seqlen, seqlen),
            "sliding window 1024": window,
            "window 1024 (CSR)": window,
            "causal": causal,
            "causal softcap 30": causal,
        }
        dense_tflops = 4.0 * batch * heads * seqlen * seqlen * d / time_ms(lambda q, k, v: dense(q, k, v), inputs) / 1e9
        for name, mask in masks.items():
            work = kept_flops(mask, batch, heads, d)
            kernel, call = runtime, {"block_mask": mask}
            if name == "window 1024 (CSR)":      # block-CSR tensors, the window evaluated by a mask_mod
                kernel = runtime_window
            elif name == "causal softcap 30":
                kernel, call = softcap, {}
            elif mask.pattern is not None:       # the pattern compiled into the kernel as code
                kernel = attngen.build(attngen.Spec(head_dim=d, dtype="bf16", mask=mask.pattern.to_dict()))
                call = {}
            ours = work / time_ms(lambda q, k, v: kernel(q, k, v, **call), inputs) / 1e9
            row = dict(seqlen=seqlen, mask=name, density=mask.density, attngen=ours, attngen_dense=dense_tflops,
                       plan=f"{kernel.plan.block_m}x{kernel.plan.block_n}x{kernel.plan.warps}x{kernel.plan.stages}")
            if not args.no_flex:
                try:
                    row["flex"] = work / time_ms(flex_fn(mask, seqlen, heads, name), inputs) / 1e9
                except Exception as exc:   # report and go on: the peer is optional
                    row["flex"] = None
                    print(f"# flex unavailable: {str(exc).splitlines()[0]}", file=sys.stderr)
            if args.backward and name in BACKWARD_CALLS:
                row |= fwd_bwd_row(name, mask, seqlen, heads, work, inputs, args.no_flex)
            rows.append(row)
            print(row, file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{'seqlen':>6} {'mask':>20} {'density':>7} {'attngen':>8} {'dense':>7} {'kept/dense':>10} {'flex':>7} {'/flex':>6}"
          f" {'fwd+bwd':>8} {'flex f+b':>8} {'/flex':>6}  plan")
    nan = float("nan")
    for r in rows:
        flex = r.get("flex") or nan
        ours_fb, flex_fb = r.get("attngen_fwd_bwd", nan), r.get("flex_fwd_bwd") or nan
        print(f"{r['seqlen']:>6} {r['mask']:>20} {r['density']:>7.3f} {r['attngen']:>8.1f} {r['attngen_dense']:>7.1f} "
              f"{r['attngen'] / r['attngen_dense']:>10.2f} {flex:>7.1f} {r['attngen'] / flex:>6.2f}"
              f" {ours_fb:>8.1f} {flex_fb:>8.1f} {ours_fb / flex_fb:>6.2f}  {r['plan']}")


if __name__ == "__main__":
    main()
