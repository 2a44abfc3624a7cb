"""Timing attngen beside its peers (torch SDPA's flash and cuDNN backends) in one run, same shapes.

Used by `attngen bench` and bench/bench_forward.py. FlashAttention's benchmark shapes: batch x seqlen =
16384, hidden = 2048 (heads = 2048 / head_dim). FLOPs are counted as FlashAttention does:
4 * batch * heads * seqlen_q * seqlen_k * head_dim, halved when causal. Times are medians of CUDA-event
timings after warm-up; input sets rotate so that L2 holds none of them between calls.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass

import numpy as np

import attngen
from attngen.api import spec_for_inputs
from attngen.planner.device import live_device
from attngen.planner.forward import predict_us

L2_BYTES = 64 << 20


def flash_shapes(dims: str, causal_modes: str, seqlens: str):
    """(d, causal, seqlen, batch, heads) of FlashAttention's benchmark shapes (batch x seqlen = 16384 tokens,
    heads x d = 2048) for the scripts' comma-separated options, e.g. ("64,128", "false,true", "2048,8192")."""
    for d in (int(x) for x in dims.split(",")):
        for causal in (c == "true" for c in causal_modes.split(",")):
            for seqlen in (int(s) for s in seqlens.split(",")):
                yield d, causal, seqlen, max(1, 16384 // seqlen), 2048 // d


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


def time_ms_graph(fn, input_sets, calls: int = 20, reps: int = 10):
    """Per-call GPU time of fn with no host time in it: `calls` calls (rotating over input_sets) captured in one
    CUDA graph, replayed; the median replay over `calls`. What serving sees (decode steps run in graphs) and
    what a kernel costs where the host would otherwise set the pace (calls under ~200 us)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):                   # warm-up off the default stream, as capture requires
        for i in range(3):
            fn(*input_sets[i % len(input_sets)])
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*input_sets[i % len(input_sets)])
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / calls)
    del graph
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
    tdtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8_e4m3": torch.bfloat16}[dtype]
    sets = [(torch.randn(batch, seqlen, heads, d, device="cuda", dtype=tdtype, generator=gen),
             torch.randn(batch, seqlen, heads_kv, d, device="cuda", dtype=tdtype, generator=gen),
             torch.randn(batch, seqlen, heads_kv, d, device="cuda", dtype=tdtype, generator=gen))
            for _ in range(n_sets)]
    return fp8_inputs(sets) if dtype == "fp8_e4m3" else sets     # N(0, 1) values fit e4m3 as they are


def sdpa(backend, causal, expand_kv=False):
    """torch SDPA on one backend. expand_kv: repeat K/V to the query heads inside the call, for backends
    without GQA (flash, efficient), as their users must."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        group = q.shape[2] // k.shape[2]
        if expand_kv and group > 1:
            k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    if expand_kv:
        run.note = "K/V repeated to the query heads inside the call (this backend has no GQA)"
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
    """The kernel for these inputs: the planner's choice, or a BMxBNxWARPSxSTAGES[xPATH] tile override
    (PATH: mma_sync, the default, or wgmma)."""
    spec = spec or spec_for_inputs(q, q, q, causal)
    if tiles:
        bm, bn, w, st, *path = tiles.split("x")
        fields = {f: getattr(spec, f) for f in ("head_dim", "head_dim_v", "dtype", "causal", "scale")}
        spec = attngen.Spec(**fields, tile=dict(block_m=int(bm), block_n=int(bn), warps=int(w), stages=int(st),
                                                path=path[0] if path else "mma_sync"))
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
        f"{(t or 'attngen')[:18]:>18} {'/flash':>6} {'/cudnn':>6}" for t in tiles_list)
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


# ---- `attngen bench`: a spec (or FlashAttention's suite) against every peer present ----------------

FLASH_SUITE = dict(seqlens=(512, 1024, 2048, 4096, 8192, 16384), head_dims=(64, 128), causal=(False, True),
                   tokens=16384, hidden=2048)   # FlashAttention's benchmark_flash_attention.py shapes
PEERS = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flex")
MAX_MASK_BYTES = 1 << 30        # a dense element mask for a peer (Flex lookup, SDPA attn_mask) up to this


@dataclass(frozen=True)
class Case:
    """One benchmarked problem: a spec at one shape."""

    spec: object
    batch: int
    seqlen: int
    heads: int
    heads_kv: int

    @property
    def label(self) -> str:
        s = self.spec
        what = s.mask["kind"] if s.mask else ("causal" if s.causal else "dense")
        return f"{s.name} d{s.head_dim} {s.dtype} {what} seqlen {self.seqlen} ({self.batch}x{self.heads})"


def suite_cases(name: str, dtype: str = "bf16", seqlens=None, head_dims=None) -> list[Case]:
    """The flash suite's cases: its head dims (or `head_dims`, e.g. 256 beside them), causal and not, its
    seqlens (or `seqlens`), at batch x seqlen = 16384 tokens and heads x head_dim = 2048."""
    if name != "flash":
        raise ValueError(f"--suite: unknown suite {name!r}; allowed: flash")
    cases = []
    for d in head_dims or FLASH_SUITE["head_dims"]:
        for causal in FLASH_SUITE["causal"]:
            for seqlen in seqlens or FLASH_SUITE["seqlens"]:
                heads = FLASH_SUITE["hidden"] // d
                spec = attngen.Spec(head_dim=d, dtype=dtype, causal=causal, backward=True)
                cases.append(Case(spec, max(1, FLASH_SUITE["tokens"] // seqlen), seqlen, heads, heads))
    return cases


def spec_cases(spec, seqlens, tokens: int) -> list[Case]:
    heads = spec.num_heads or max(1, 2048 // spec.head_dim)
    return [Case(spec, max(1, tokens // s), s, heads, spec.num_kv_heads or heads) for s in seqlens]


def visible_pairs(spec, seqlen: int) -> float:
    """(query, key) pairs per head that the mask keeps (mean over heads): the useful work."""
    if spec.mask is None:
        return seqlen * (seqlen + 1) / 2 if spec.causal else float(seqlen) * seqlen
    pattern = spec.mask_pattern
    if pattern is None:
        raise ValueError("a runtime block layout has no fixed work: bench it with bench/bench_sparse.py")
    return pattern.visible_pairs(seqlen, seqlen)      # O(seqlen) for causal, windows and documents


def case_flops(case: Case) -> float:
    """Forward FLOPs on kept pairs: 2 * pairs * (head_dim + head_dim_v) per head (FlashAttention's 4 * d)."""
    s = case.spec
    return 2.0 * case.batch * case.heads * visible_pairs(s, case.seqlen) * (s.head_dim + s.head_dim_v)


def _dense_mask(case: Case):
    """The spec's element mask as a torch bool tensor [heads or 1, S, S] on the GPU, or None if too big."""
    import torch

    pattern, n = case.spec.mask_pattern, case.seqlen
    if pattern.heads * n * n > MAX_MASK_BYTES:
        return None
    return torch.from_numpy(np.ascontiguousarray(pattern.element(
        np.arange(pattern.heads)[:, None, None], np.arange(n)[None, :, None], np.arange(n)[None, None, :], n, n))).cuda()


def is_plain(spec) -> bool:
    """Plain softmax attention (causal or not): no mask, softcap, ALiBi, score_mod or mask_mod."""
    return (spec.mask is None and spec.softcap is None and not spec.alibi and spec.score_mod is None
            and spec.mask_mod is None)


def peer_functions(case: Case) -> dict:
    """name -> fn(q, k, v) for each peer that computes the same attention, or name -> why not."""
    import torch

    s = case.spec
    if s.fp8:
        why = "no peer here takes e4m3 inputs (--suite flash sets attngen's FP8 beside its bf16)"
        return {name: why for name in PEERS}
    plain = is_plain(s)
    peers = {}
    if plain:
        backend, gqa = torch.nn.attention.SDPBackend, case.heads != case.heads_kv
        peers["sdpa_flash"] = sdpa(backend.FLASH_ATTENTION, s.causal, expand_kv=gqa)
        peers["sdpa_cudnn"] = sdpa(backend.CUDNN_ATTENTION, s.causal)
        peers["sdpa_efficient"] = sdpa(backend.EFFICIENT_ATTENTION, s.causal, expand_kv=gqa)
    else:
        why = "SDPA takes no mask pattern, softcap, ALiBi or expression (not the same attention)"
        peers.update({name: why for name in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")})
    if s.score_mod is not None or s.mask_mod is not None:
        peers["flex"] = "a CUDA expression has no torch form for FlexAttention"
    else:
        peers["flex"] = flex_for_spec(case)
    return peers


def flex_for_spec(case: Case):
    """torch.compile'd FlexAttention with the spec's mask (closed form for causal, a lookup of the element
    mask for patterns) and modifiers (softcap, the standard ALiBi slopes)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from .reference import alibi_slopes

    s, n = case.spec, case.seqlen
    mask_mod = None
    if s.causal:
        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx
    elif s.mask is not None:
        dense = _dense_mask(case)
        if dense is None:
            return f"the element mask at seqlen {n} exceeds {MAX_MASK_BYTES >> 20} MB"
        per_head = dense.shape[0] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            return dense[h if per_head else 0, q_idx, kv_idx]
    slopes = torch.tensor(alibi_slopes(case.heads), device="cuda", dtype=torch.float32) if s.alibi else None

    def score_mod(score, b, h, q_idx, kv_idx):
        if s.softcap is not None:
            score = s.softcap * torch.tanh(score / s.softcap)
        if slopes is not None:
            score = score - slopes[h] * (q_idx - kv_idx).abs()
        return score

    block_mask = None if mask_mod is None else create_block_mask(mask_mod, None, None, n, n)
    compiled = torch.compile(flex_attention)
    modified = s.softcap is not None or s.alibi

    def run(q, k, v):
        return compiled(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                        score_mod=score_mod if modified else None, scale=s.softmax_scale,
                        enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2)
    return run


def fp8_applies(spec, device) -> bool:
    """Whether the suite adds attngen's FP8 forward beside the bf16 one: plain attention at an FP8 head dim on
    Hopper."""
    from ..spec import FP8_HEAD_DIMS

    return is_plain(spec) and not spec.fp8 and device.cc == 90 and spec.head_dim == spec.head_dim_v and spec.head_dim in FP8_HEAD_DIMS


def fp8_function(spec):
    """attngen's FP8 forward of the spec's attention (descale factors 1: the suite's N(0, 1) inputs fit e4m3)."""
    kernel = attngen.build(attngen.Spec(head_dim=spec.head_dim, dtype="fp8_e4m3", causal=spec.causal))
    return lambda q, k, v: kernel(q, k, v)[0]


def quantised_e4m3(x, heads_kv: int, per_head: bool):
    """(x8, descale) with x8 * descale ~ x [batch, seqlen, heads, d], as a user quantises for the FP8 forward:
    descale = amax / 448 over the whole tensor (one factor, shape [1]) or per (batch, KV head) over that KV
    head's group of heads ([batch, heads_kv] float32, the kernel's per-head form)."""
    import torch

    from .reference import E4M3_MAX

    batch, seqlen, heads, d = x.shape
    if not per_head:
        descale = (x.abs().amax().float().clamp(min=1e-6) / E4M3_MAX).reshape(1)
        return (x.float() / descale).to(torch.float8_e4m3fn), descale
    amax = x.abs().view(batch, seqlen, heads_kv, heads // heads_kv, d).amax(dim=(1, 3, 4)).float()
    descale = (amax.clamp(min=1e-6) / E4M3_MAX).contiguous()
    per_query_head = descale.repeat_interleave(heads // heads_kv, dim=1)[:, None, :, None]
    return (x.float() / per_query_head).to(torch.float8_e4m3fn), descale


def fp8_inputs(inputs):
    import torch

    return [tuple(x.to(torch.float8_e4m3fn) for x in qkv) for qkv in inputs]


def attngen_function(case: Case, backward: bool):
    """attngen on the case's spec: the kernel call, or (backward) autograd through attngen's kernels."""
    from ..autograd import attention_with_grad
    from .checking import random_tensors

    spec = case.spec
    tensors = random_tensors(spec, np.random.default_rng(0), (case.batch, case.heads, case.seqlen, case.seqlen))
    call = dict(scale=None, alibi_slopes=None, block_mask=None) | ({"tensors": tensors} if tensors else {})
    if backward:
        return lambda q, k, v: attention_with_grad(spec, q, k, v, call)[0]
    kernel = attngen.build(spec)
    return lambda q, k, v: kernel(q, k, v, **call)[0]


def time_into(row: dict, functions: dict, mode: str, flop: float, inputs, log=None, label: str = "") -> None:
    """row[name] = TFLOP/s of each function (fwd, or fwd+bwd through autograd) doing `flop` on the rotating
    inputs; a function given as a string (why it does not apply), or one that fails, gets None and a note.
    log: gets one line, `label mode: name TFLOP/s, ...`."""
    for name, fn in functions.items():
        if isinstance(fn, str):
            row[name], row[name + "_note"] = None, fn
            continue
        if getattr(fn, "note", None):
            row[name + "_note"] = fn.note
        try:
            run = forward_backward(fn) if mode == "fwd+bwd" else fn
            row[name] = flop / time_ms(run, inputs) / 1e9
        except Exception as exc:        # a peer may not take this shape: say so and go on
            row[name], row[name + "_note"] = None, str(exc).splitlines()[0][:160]
    if log:
        log(f"{label} {mode}: " + ", ".join(f"{n} {row[n]:.1f}" if row.get(n) else f"{n} -" for n in functions)
            + " TFLOP/s")


def bench_case(case: Case, modes=("fwd",), peers=PEERS, log=None) -> list[dict]:
    """One row per mode ("fwd", "fwd+bwd"): TFLOP/s of attngen and of each peer, on the same rotating
    inputs. fwd+bwd counts 3.5x the forward FLOPs (FlashAttention's convention)."""
    import torch

    spec = case.spec
    inputs = make_inputs(case.batch, case.seqlen, case.heads, case.heads_kv, spec.head_dim, spec.dtype)
    if spec.head_dim_v != spec.head_dim:
        inputs = [(q, k, torch.randn(*v.shape[:3], spec.head_dim_v, device="cuda", dtype=v.dtype)) for q, k, v in inputs]
    work = case_flops(case)
    device = live_device()
    peak = device.matrix_peak_tflops * (2 if spec.fp8 else 1)       # e4m3's matrix peak is twice bf16's
    import torch._dynamo

    torch._dynamo.reset()          # FlexAttention compiles per shape: without a reset the suite hits dynamo's limit
    functions = {name: fn for name, fn in peer_functions(case).items() if name in peers}
    rows = []
    for mode in modes:
        factor = 3.5 if mode == "fwd+bwd" else 1.0
        row = dict(gpu=torch.cuda.get_device_name(), spec=spec.name, dtype=spec.dtype, head_dim=spec.head_dim,
                   head_dim_v=spec.head_dim_v, causal=spec.causal, mask=(spec.mask or {}).get("kind"), seqlen=case.seqlen,
                   batch=case.batch, heads=case.heads, heads_kv=case.heads_kv, mode=mode, gflop=factor * work / 1e9,
                   peak_tflops=peak)
        timed = {"attngen": attngen_function(case, mode == "fwd+bwd")} | functions
        time_into(row, timed, mode, factor * work, inputs, log, case.label)
        if mode == "fwd" and fp8_applies(spec, device):
            time_into(row, {"attngen_fp8": fp8_function(spec)}, mode, work, fp8_inputs(inputs), log, case.label)
        kernel = attngen.build(spec)
        row["attngen_plan"] = f"{kernel.plan.block_m}x{kernel.plan.block_n}x{kernel.plan.warps}x{kernel.plan.stages}"
        if mode == "fwd":
            predicted = predict_us(kernel.spec, kernel.plan, device, case.batch, case.seqlen, case.seqlen, case.heads)
            row["attngen_model_tflops"] = work / (predicted * 1e-6) / 1e12
        row["attngen_roofline"] = row["attngen"] / peak if row["attngen"] else None
        rows.append(row)
    del inputs
    return rows


# ---- `attngen bench --suite varlen`: packed documents -----------------------------------------------

VARLEN_SUITE = dict(tokens=16384, hidden=2048, head_dims=(64, 128),
                    mixes=("uniform", "docs8", "docs64", "one_long"))
VARLEN_PEERS = ("attngen_batch", "attngen_document", "flex_document", "sdpa_flash_padded")


def document_lengths(mix: str, tokens: int, seed: int = 0) -> list[int]:
    """Lengths of the packed documents of a mix, summing to tokens: uniform (16 of tokens/16), docs8 /
    docs64 (random lengths, each at least 64), one_long (half the tokens in one document, 64 short ones)."""
    rng = np.random.default_rng(seed)
    if mix == "uniform":
        return [tokens // 16] * 16
    if mix in ("docs8", "docs64"):
        n = int(mix[4:])
        cuts = np.sort(rng.choice(np.arange(1, tokens // 64), size=n - 1, replace=False)) * 64
        return np.diff(np.concatenate([[0], cuts, [tokens]])).tolist()
    if mix == "one_long":
        rest = document_lengths("docs64", tokens // 2, seed)
        return [tokens // 2] + rest
    raise ValueError(f"mix: got {mix!r}; allowed: {', '.join(VARLEN_SUITE['mixes'])}")


def _pairs(n: int, causal: bool) -> float:
    return n * (n + 1) / 2 if causal else float(n) * n


def varlen_functions(lengths, causal: bool, d: int, heads: int, dtype: str) -> dict:
    """name -> fn(q, k, v) on packed [tokens, heads, d] inputs for attngen's varlen kernel and the peers that
    compute the same attention, or name -> why not: attngen's batch kernel (equal lengths), attngen's
    `document` pattern and FlexAttention's document BlockMask on the one long row, SDPA flash on the
    documents padded to the longest (causal only: right padding is then invisible to real queries)."""
    import torch

    tokens, batch, longest = sum(lengths), len(lengths), max(lengths)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    fns = {"attngen": lambda q, k, v: attngen.attention_varlen(q, k, v, cu, cu, longest, longest, causal=causal)}
    if len(set(lengths)) == 1:
        fns["attngen_batch"] = lambda q, k, v: attngen.attention(
            *(x.view(batch, longest, *x.shape[1:]) for x in (q, k, v)), causal=causal)
    else:
        fns["attngen_batch"] = "documents of different lengths"
    document = {"kind": "document", "seq_lens": list(lengths)}
    mask = {"kind": "and", "of": [{"kind": "causal"}, document]} if causal else document
    spec = attngen.Spec(head_dim=d, dtype=dtype, mask=mask, backward=True)
    fns["attngen_document"] = lambda q, k, v: _with_grad(spec, q[None], k[None], v[None])[0]
    doc = torch.repeat_interleave(torch.arange(batch, device="cuda"), torch.tensor(lengths, device="cuda"))
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def document_mask(b, h, q_idx, kv_idx):
        same = doc[q_idx] == doc[kv_idx]
        return same & (kv_idx <= q_idx) if causal else same
    block_mask = create_block_mask(document_mask, None, None, tokens, tokens)
    compiled = torch.compile(flex_attention)
    fns["flex_document"] = lambda q, k, v: compiled(
        q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
        block_mask=block_mask).transpose(1, 2)[0]
    if causal:
        flash = sdpa(torch.nn.attention.SDPBackend.FLASH_ATTENTION, True)
        fns["sdpa_flash_padded"] = padded(flash, lengths)
    else:
        fns["sdpa_flash_padded"] = "non-causal padding needs a key mask, which SDPA flash does not take"
    return fns


def _with_grad(spec, q, k, v):
    from ..autograd import attention_with_grad

    call = dict(scale=None, alibi_slopes=None, block_mask=None)
    if q.requires_grad:
        return attention_with_grad(spec, q, k, v, call)
    return attngen.build(spec)(q, k, v, **call)


def padded(fn, lengths):
    """fn on the documents padded to the longest, [batch, longest, heads, d]: the inputs are padded once per
    input set (a padded user already holds such tensors), the call is what is timed."""
    cache = {}

    def run(q, k, v):
        key = (q.data_ptr(), q.requires_grad)           # one padded copy per input set
        if key not in cache:
            longest, starts = max(lengths), np.concatenate([[0], np.cumsum(lengths)])
            pads = []
            for x in (q, k, v):
                out = x.new_zeros(len(lengths), longest, *x.shape[1:])
                for b, n in enumerate(lengths):
                    out[b, :n] = x[starts[b]:starts[b] + n]
                pads.append(out.detach().requires_grad_(x.requires_grad))
            cache[key] = pads
        return fn(*cache[key])
    return run


def bench_varlen(dtype="bf16", modes=("fwd",), peers=VARLEN_PEERS, mixes=None, head_dims=None, causal_modes=(False, True),
                 tokens=None, log=None) -> list[dict]:
    """Rows of TFLOP/s on the useful pairs (within documents) for each mix, head dim and causality: attngen's
    varlen kernel beside its batch kernel, its document pattern, FlexAttention and padded SDPA."""
    import torch
    import torch._dynamo

    rows = []
    for d in head_dims or VARLEN_SUITE["head_dims"]:
        heads = VARLEN_SUITE["hidden"] // d
        for mix in mixes or VARLEN_SUITE["mixes"]:
            lengths = document_lengths(mix, tokens or VARLEN_SUITE["tokens"])
            for causal in causal_modes:
                torch._dynamo.reset()
                tokens = sum(lengths)
                work = sum(2.0 * heads * _pairs(n, causal) * 2 * d for n in lengths)
                inputs = make_inputs(1, tokens, heads, heads, d, dtype)
                inputs = [tuple(x[0] for x in s) for s in inputs]
                functions = {n: f for n, f in varlen_functions(lengths, causal, d, heads, dtype).items()
                             if n == "attngen" or n in peers}
                for mode in modes:
                    factor = 3.5 if mode == "fwd+bwd" else 1.0
                    row = dict(gpu=torch.cuda.get_device_name(), spec=f"varlen {mix}", dtype=dtype, head_dim=d,
                               causal=causal, documents=len(lengths), longest=max(lengths), seqlen=tokens,
                               heads=heads, mode=mode, gflop=factor * work / 1e9)
                    time_into(row, functions, mode, factor * work, inputs, log,
                              f"varlen {mix} d{d} {'causal' if causal else 'full'}")
                    rows.append(row)
                del inputs
    return rows


def format_varlen_rows(rows) -> str:
    nan = float("nan")
    names = [n for n in VARLEN_PEERS if any(r.get(n) for r in rows)]
    head = (f"{'mix':<18} {'d':>4} {'causal':>6} {'mode':>7} {'docs':>4} {'attngen':>8} "
            + " ".join(f"{n:>17}" for n in names) + " " + " ".join(f"{'/' + n:>18}" for n in names))
    lines = ["TFLOP/s on the pairs within documents (median CUDA-event timings, inputs rotated past L2; "
             "fwd+bwd counts 3.5x the forward)", head]
    for r in rows:
        ours = r.get("attngen") or nan
        lines.append(f"{r['spec']:<18} {r['head_dim']:>4} {str(r['causal']):>6} {r['mode']:>7} {r['documents']:>4} "
                     f"{ours:>8.1f} " + " ".join(f"{r.get(n) or nan:>17.1f}" for n in names) + " "
                     + " ".join(f"{ours / r[n] if r.get(n) else nan:>18.2f}" for n in names))
    if rows:
        lines.append(f"# {rows[0]['gpu']}, {rows[0]['seqlen']} tokens, hidden 2048")
    return "\n".join(lines)


def format_rows(rows) -> str:
    """TFLOP/s per implementation, attngen's ratio to each peer, and its fraction of the matrix peak."""
    nan = float("nan")
    names = [n for n in PEERS if any(r.get(n) for r in rows)]
    fp8 = any(r.get("attngen_fp8") for r in rows)
    head = (f"{'spec':<22} {'mode':>7} {'seqlen':>6} {'attngen':>8} " + " ".join(f"{n:>14}" for n in names)
            + " " + " ".join(f"{'/' + n.removeprefix('sdpa_'):>10}" for n in names) + f" {'roofline':>8}"
            + (f" {'fp8':>8} {'fp8/bf16':>8}" if fp8 else ""))
    lines = ["TFLOP/s (median of CUDA-event timings, inputs rotated past L2; fwd+bwd counts 3.5x the forward)",
             head]
    for r in rows:
        ours = r.get("attngen") or nan
        cells = " ".join(f"{r.get(n) or nan:>14.1f}" for n in names)
        ratios = " ".join(f"{ours / r[n] if r.get(n) else nan:>10.2f}" for n in names)
        eight = r.get("attngen_fp8") or nan
        lines.append(f"{r['spec'][:22]:<22} {r['mode']:>7} {r['seqlen']:>6} {ours:>8.1f} {cells} {ratios} "
                     f"{r.get('attngen_roofline') or nan:>8.2f}" + (f" {eight:>8.1f} {eight / ours:>8.2f}" if fp8 else ""))
    if rows:
        lines.append(f"# {rows[0]['gpu']}; roofline: the bf16/fp16 matrix peak, {rows[0]['peak_tflops']:.0f} TFLOP/s")
    return "\n".join(lines)


def plot_rows(rows, path) -> None:
    """x: seqlen, y: TFLOP/s, one line per implementation; a panel per (spec, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["spec"], r["mode"]) for r in rows})
    cols = min(4, len(panels))
    fig, axes = plt.subplots(-(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(panels) // cols)),
                             squeeze=False)
    for ax, (spec, mode) in zip(axes.flat, panels):
        mine = sorted((r for r in rows if (r["spec"], r["mode"]) == (spec, mode)), key=lambda r: r["seqlen"])
        for name in ("attngen",) + PEERS:
            points = [(r["seqlen"], r[name]) for r in mine if r.get(name)]
            if points:
                ax.plot(*zip(*points), marker="o", label=name, linewidth=2.5 if name == "attngen" else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{spec} {mode}", fontsize=9)
        ax.set_xlabel("seqlen")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"attngen vs peers, {rows[0]['gpu']}" if rows else "attngen", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- decode over a KV cache: K/V bandwidth beside SDPA -------------------------------------------------------
DECODE_SUITE = dict(batches=(1, 8, 32), seqlens=(1024, 4096, 32768, 131072), page_sizes=(0, 16), heads=(32, 8),
                    head_dim=128)
DECODE_MEMORY_LIMIT = 24 << 30      # K/V bytes of one input set past which a shape is left out
DECODE_COLUMNS = ("attngen_page0", "attngen_page16", "sdpa_flash", "sdpa_cudnn", "flex_decoding")


def copy_peak_gbps() -> float:
    """(read + write bytes) / time of a 2 GiB device-to-device copy: what a streaming kernel can reach."""
    import torch

    x = torch.empty(2 ** 30, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda a, b: b.copy_(a), [(x, y)], warmup=3, reps=10)
    return 2 * x.numel() * 2 / ms / 1e6


def decode_input_sets(batch, seqlen, heads_q, heads_kv, d, page_size):
    """Rotating input sets (q, k_cache, v_cache, cache_seqlens, block_table) past L2, and the K/V bytes of one:
    Sq = 1 against full caches of seqlen tokens, contiguous (page_size 0) or in shuffled pages."""
    import torch

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


def bench_decode(batches=None, seqlens=None, page_sizes=None, heads=None, head_dim=None, log=None) -> dict:
    """{"copy_peak_gbps": ..., "rows": [...]}: per (batch, Sk) the time and K/V bandwidth of attngen over a
    contiguous cache and over each page size, and of SDPA flash and cuDNN and torch.compile'd FlexAttention
    (its decoding kernel at one query token) on the contiguous caches."""
    import torch
    import torch._dynamo
    from torch.nn.attention import SDPBackend

    s = DECODE_SUITE
    batches, seqlens = batches or s["batches"], seqlens or s["seqlens"]
    page_sizes, (heads_q, heads_kv), d = page_sizes or s["page_sizes"], heads or s["heads"], head_dim or s["head_dim"]
    peers = {"sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION, False), "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION, False)}
    peak, rows = copy_peak_gbps(), []
    for batch in batches:
        for seqlen in seqlens:
            if 2 * batch * seqlen * heads_kv * d * 2 > DECODE_MEMORY_LIMIT:
                continue
            row = {"batch": batch, "seqlen_k": seqlen, "heads_q": heads_q, "heads_kv": heads_kv, "head_dim": d,
                   "gpu": torch.cuda.get_device_name()}
            for page_size in page_sizes:
                sets, kv_bytes = decode_input_sets(batch, seqlen, heads_q, heads_kv, d, page_size)
                functions = {f"attngen_page{page_size}": lambda q, k, v, n, t: attngen.attention_with_kvcache(
                    q, k, v, cache_seqlens=n, block_table=t)}
                if page_size == 0:
                    torch._dynamo.reset()      # FlexAttention compiles per shape: keep under dynamo's limit
                    flex_decoding = flex(False, seqlen)
                    functions |= {name: (lambda fn: lambda q, k, v, n, t: fn(q, k, v))(fn)
                                  for name, fn in (peers | {"flex_decoding": flex_decoding}).items()}
                for name, fn in functions.items():
                    try:
                        ms = time_ms(fn, sets)
                        row[f"{name}_us"], row[f"{name}_gbps"] = ms * 1e3, kv_bytes / ms / 1e6
                        graph_ms = time_ms_graph(fn, sets)     # the kernels alone (captured, no host time)
                        row[f"{name}_graph_us"], row[f"{name}_graph_gbps"] = graph_ms * 1e3, kv_bytes / graph_ms / 1e6
                    except Exception as exc:                 # a backend may refuse the shape: say so, go on
                        row[f"{name}_us"] = row[f"{name}_gbps"] = None
                        row[f"{name}_note"] = str(exc).splitlines()[0][:120]
                del sets
                torch.cuda.empty_cache()
            rows.append(row)
            if log:
                log(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    return {"copy_peak_gbps": peak, "rows": rows}


def format_decode_rows(result: dict) -> str:
    """K/V bandwidth per implementation, its fraction of the copy peak and its time; attngen / cuDNN: the calls
    as a program makes them (host time included where it sets the pace), then, where measured, in CUDA graphs
    (the kernels alone)."""
    peak, rows = result["copy_peak_gbps"], result["rows"]
    lines = []
    for suffix, how in (("", "median CUDA events around each call"), ("_graph", "in CUDA graphs, no host time")):
        columns = [c for c in DECODE_COLUMNS if any(r.get(c + suffix + "_gbps") for r in rows)]
        if not columns:
            continue
        lines += [f"K/V bandwidth, GB/s (fraction of the {peak:.0f} GB/s copy peak) and time; Sq = 1; {how}, "
                  "inputs rotated past L2",
                  f"{'batch':>5} {'Sk':>7} " + " ".join(f"{c:>24}" for c in columns) + "  attngen/cudnn"]
        for r in rows:
            cells = []
            for c in columns:
                g = r.get(c + suffix + "_gbps")
                cells.append(f"{g:8.0f} ({g / peak:4.2f}) {r[c + suffix + '_us']:7.0f} us" if g else f"{'-':>24}")
            cudnn, ours = r.get("sdpa_cudnn" + suffix + "_gbps"), r.get("attngen_page0" + suffix + "_gbps")
            lines.append(f"{r['batch']:>5} {r['seqlen_k']:>7} " + " ".join(cells)
                         + (f"  {ours / cudnn:11.2f}" if cudnn and ours else ""))
    if rows:
        r = rows[0]
        lines.append(f"# {r['gpu']}, {r['heads_q']} query / {r['heads_kv']} KV heads, d{r['head_dim']}, bf16")
    return "\n".join(lines)
