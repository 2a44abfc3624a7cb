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
    if spec.mask is not None and spec.mask_pattern is None:
        echo("the mask is a runtime block layout: check it from Python with kernel(q, k, v, block_mask=...)")
        return False
    heads = spec.num_heads or 4
    heads_kv = spec.num_kv_heads or heads
    rng = np.random.default_rng(seed)
    all_ok = True
    for sq, sk in check_seqlens(spec):
        mask = element_mask(spec, sq, sk)
        if mask is False:
            continue
        host = [rng.standard_normal(shape).astype(np.float32) for shape in
                ((2, sq, heads, spec.head_dim), (2, sk, heads_kv, spec.head_dim), (2, sk, heads_kv, spec.dv))]
        q, k, v = (to_device(x, spec.dtype) for x in host)
        got, lse = (to_float64(x) for x in kernel_output(kernel, q, k, v))
        q64, k64, v64 = (to_float64(x) for x in (q, k, v))
        ref, ref_lse = attention_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale, mask=mask)
        same, _ = attention_same_dtype_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale,
                                                 dtype=spec.dtype, mask=mask)
        ok, err, bound = acceptance_check(got, same, ref)
        finite = np.isfinite(ref_lse)
        lse_ok = np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and (
            not finite.any() or np.max(np.abs(lse[finite] - ref_lse[finite])) < 2e-3)
        all_ok &= ok and lse_ok
        echo(f"seqlen_q={sq:5d} seqlen_k={sk:5d}  max|out-ref64|={err:.3e}  bound={bound:.3e}  "
             f"lse {'ok' if lse_ok else 'WRONG'}  {'PASS' if ok and lse_ok else 'FAIL'}")
    return all_ok


def check_seqlens(spec):
    """The default pairs, plus the one length a document mask is defined for."""
    pairs = list(CHECK_SEQLENS)
    total = _document_length(spec.mask) if spec.mask is not None else None
    if total:
        pairs.append((total, total))
    return pairs


def _document_length(section):
    if isinstance(section, dict):
        if section.get("kind") == "document":
            return sum(section["seq_lens"])
        return next((n for n in map(_document_length, section.get("of", [])) if n), None)
    return None


def element_mask(spec, sq, sk):
    """The spec's element mask at these lengths (None without a mask, False where it is undefined)."""
    if spec.mask is None:
        return None
    pattern = spec.mask_pattern
    try:
        return np.broadcast_to(pattern.element(np.arange(pattern.heads)[:, None, None], np.arange(sq)[None, :, None],
                                               np.arange(sk)[None, None, :], sq, sk), (pattern.heads, sq, sk))
    except ValueError:      # e.g. a document mask at lengths other than its documents' total
        return False


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
