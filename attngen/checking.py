"""`attngen check`: run a built kernel against the float64 reference (DESIGN.md criterion) on the GPU."""

from __future__ import annotations

import numpy as np

from .reference import acceptance_check, attention_reference, attention_same_dtype_reference

# (seqlen_q, seqlen_k): tails and unequal lengths both ways.
CHECK_SEQLENS = ((1, 1), (17, 17), (113, 203), (203, 113), (512, 512), (1000, 1000))


def check_spec(spec, seed: int = 0, echo=print) -> bool:
    from .api import build

    kernel = build(spec)
    echo(repr(kernel))
    heads = spec.num_heads or 4
    heads_kv = spec.num_kv_heads or heads
    rng = np.random.default_rng(seed)
    all_ok = True
    for sq, sk in CHECK_SEQLENS:
        host = [rng.standard_normal(shape).astype(np.float32) for shape in
                ((2, sq, heads, spec.head_dim), (2, sk, heads_kv, spec.head_dim), (2, sk, heads_kv, spec.dv))]
        q, k, v = (to_device(x, spec.dtype) for x in host)
        got, lse = (to_float64(x) for x in kernel_output(kernel, q, k, v))
        q64, k64, v64 = (to_float64(x) for x in (q, k, v))
        ref, ref_lse = attention_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale)
        same, _ = attention_same_dtype_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale, dtype=spec.dtype)
        ok, err, bound = acceptance_check(got, same, ref)
        finite = np.isfinite(ref_lse)
        lse_ok = np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and (
            not finite.any() or np.max(np.abs(lse[finite] - ref_lse[finite])) < 2e-3)
        all_ok &= ok and lse_ok
        echo(f"seqlen_q={sq:5d} seqlen_k={sk:5d}  max|out-ref64|={err:.3e}  bound={bound:.3e}  "
             f"lse {'ok' if lse_ok else 'WRONG'}  {'PASS' if ok and lse_ok else 'FAIL'}")
    return all_ok


def to_device(x, dtype):
    """float32 host array -> torch CUDA tensor in `dtype` (CuPy has no bf16)."""
    import torch

    return torch.from_numpy(x).to("cuda", {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype])


def to_float64(x):
    import torch

    return x.detach().to("cpu", torch.float64).numpy()


def kernel_output(kernel, q, k, v):
    import torch

    b, sq, h, _ = q.shape
    out = torch.full((b, sq, h, kernel.spec.dv), float("nan"), device="cuda", dtype=q.dtype)   # poisoned
    lse = torch.full((b, h, sq), float("nan"), device="cuda", dtype=torch.float32)
    kernel(q, k, v, out=out, lse=lse)
    torch.cuda.synchronize()
    return out, lse
