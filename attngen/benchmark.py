"""Timing attngen beside its peers (torch SDPA's flash and cuDNN backends) in one run, same shapes.

Used by `attngen bench` and bench/bench_forward.py. FlashAttention's benchmark shapes: batch x seqlen =
16384, hidden = 2048 (heads = 2048 / head_dim). FLOPs are counted as FlashAttention does:
4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when causal. Times are medians of CUDA-event
timings after warm-up; input sets rotate so that L2 holds none of them between calls.
"""

from __future__ import annotations

import math
import statistics
import sys

import attngen
from attngen.api import spec_for_inputs
from attngen.device import live_device
from attngen.plan import predict_us

L2_BYTES = 64 << 20


def flops(batch, heads, seqlen, d, causal):
    return 4.0 * batch * heads * seqlen * seqlen * d / (2 if causal else 1)


def time_ms(fn, input_sets, warmup=5, reps=30):
    import torch

    for i in range(warmup):
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    samples = []
    for i in range(reps):
        args = input_sets[i % len(input_sets)]
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return statistics.median(samples)


def forward_backward(attention):
    """A callable that runs attention(q, k, v) forward and backward (torch autograd) on fresh leaves."""
    import torch

    def run(q, k, v):
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        out = attention(q, k, v)
        out.backward(torch.ones_like(out))
    return run


def make_inputs(batch, seqlen, heads, heads_kv, d, dtype):
    import torch

    set_bytes = batch * seqlen * (heads + 2 * heads_kv) * d * 2
    n_sets = max(2, math.ceil(2 * L2_BYTES / set_bytes))
    gen = torch.Generator(device="cuda").manual_seed(seqlen * d)
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return [(torch.randn(batch, seqlen, heads, d, device="cuda", dtype=tdtype, generator=gen),
             torch.randn(batch, seqlen, heads_kv, d, device="cuda", dtype=tdtype, generator=gen),
             torch.randn(batch, seqlen, heads_kv, d, device="cuda", dtype=tdtype, generator=gen))
            for _ in range(n_sets)]


def sdpa(backend, causal):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return run


def flex(causal, seqlen):
    """torch.compile'd FlexAttention with a closed-form causal mask_mod (bottom-right = top-left here,
    seqlen_q == seqlen_k), as a user would write it."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, None, None, seqlen, seqlen)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                        enable_gqa=q.shape[2] != k.shape[2])
    return run


def peers():
    from torch.nn.attention import SDPBackend

    return (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION))


def attngen_kernel(q, causal, tiles="", spec=None):
    """The kernel for these inputs: the planner's choice, or a BMxBNxWARPSxSTAGES tile override."""
    spec = spec or spec_for_inputs(q, q, q, causal)
    if tiles:
        bm, bn, w, st = (int(x) for x in tiles.split("x"))
        fields = {f: getattr(spec, f) for f in ("head_dim", "head_dim_v", "dtype", "causal", "scale")}
        spec = attngen.Spec(**fields, tile=dict(block_m=bm, block_n=bn, warps=w, stages=st))
    return attngen.build(spec)


def measure(dtype, d, causal, seqlen, batch, heads, heads_kv=None, tiles_list=("",), spec=None, log=sys.stderr,
            with_flex=False):
    """One row: TFLOP/s of every peer and of attngen (for each tile override) on one shape."""
    heads_kv = heads_kv or heads
    inputs = make_inputs(batch, seqlen, heads, heads_kv, d, dtype)
    work = flops(batch, heads, seqlen, d, causal)
    import torch

    row = dict(gpu=torch.cuda.get_device_name(), dtype=dtype, head_dim=d, causal=causal, seqlen=seqlen,
               batch=batch, heads=heads, heads_kv=heads_kv, gflop=work / 1e9)
    for name, backend in peers():
        try:
            row[name] = work / time_ms(sdpa(backend, causal), inputs) / 1e9
        except RuntimeError as exc:
            row[name] = None
            print(f"# {name} unavailable: {str(exc).splitlines()[0]}", file=log)
    if with_flex:
        try:
            row["flex"] = work / time_ms(flex(causal, seqlen), inputs) / 1e9
        except Exception as exc:   # an optional peer: report it and go on
            row["flex"] = None
            print(f"# flex unavailable: {str(exc).splitlines()[0]}", file=log)
    for tiles in tiles_list:
        label = "attngen" + (f"[{tiles}]" if tiles else "")
        try:
            kernel = attngen_kernel(inputs[0][0], causal, tiles, spec)
        except attngen.PlanError as exc:
            row[label] = None
            print(f"# {label}: {exc}", file=log)
            continue
        row[label] = work / time_ms(lambda q, k, v: kernel(q, k, v), inputs) / 1e9
        p, r = kernel.plan, kernel.resources
        row[label + "_plan"] = f"{p.block_m}x{p.block_n}x{p.warps}x{p.stages}"
        row[label + "_regs"], row[label + "_spill"] = r.registers, r.spill_bytes
        predicted = predict_us(kernel.spec, p, live_device(), batch, seqlen, seqlen, heads)
        row[label + "_model_tflops"] = work / (predicted * 1e-6) / 1e12
    del inputs
    print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                   if k not in ("gpu", "gflop")), file=log, flush=True)
    return row


def format_table(rows, tiles_list=("",)) -> str:
    labels = ["attngen" + (f"[{t}]" if t else "") for t in tiles_list]
    nan = float("nan")
    head = f"{'dtype':>5} {'d':>4} {'causal':>6} {'seqlen':>6} {'flash':>7} {'cudnn':>7} {'flex':>7} " + " ".join(
        f"{lab[-18:]:>18} {'/flash':>6} {'/cudnn':>6}" for lab in labels)
    lines = ["TFLOP/s (median of CUDA-event timings)", head]
    for r in rows:
        fl, cu = r.get("sdpa_flash"), r.get("sdpa_cudnn")
        cells = []
        for lab in labels:
            ours = r.get(lab) or nan
            cells.append(f"{ours:>18.1f} {ours / fl if fl else nan:>6.2f} {ours / cu if cu else nan:>6.2f}")
        lines.append(f"{r['dtype']:>5} {r['head_dim']:>4} {str(r['causal']):>6} {r['seqlen']:>6} "
                     f"{fl or nan:>7.1f} {cu or nan:>7.1f} {r.get('flex') or nan:>7.1f} " + " ".join(cells))
    return "\n".join(lines)
