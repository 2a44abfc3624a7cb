"""`attngen check`: run a built kernel against the float64 reference (ARCHITECTURE.md criterion) on the GPU."""

from __future__ import annotations

import numpy as np

from .reference import acceptance_check, attention_fp8_reference, attention_reference, attention_same_dtype_reference

# (seqlen_q, seqlen_k): tails and unequal lengths both ways.
CHECK_SEQLENS = ((1, 1), (17, 17), (113, 203), (203, 113), (512, 512), (1000, 1000))


def check_spec(spec, seed: int = 0, echo=print) -> bool:
    from ..api import build

    kernel = build(spec)
    echo(repr(kernel))
    if spec.mask is not None and spec.mask_pattern is None:
        echo("the mask is a runtime block layout: check it from Python with kernel(q, k, v, block_mask=...)")
        return False
    if spec.alibi:
        echo("alibi: the standard slopes for the heads")
    heads = spec.num_heads or 4
    heads_kv = spec.num_kv_heads or heads
    rng = np.random.default_rng(seed)
    all_ok = True
    for sq, sk in check_seqlens(spec):
        mask = element_mask(spec, sq, sk)
        if mask is False:
            continue
        host = [rng.standard_normal(shape).astype(np.float32) for shape in
                ((2, sq, heads, spec.head_dim), (2, sk, heads_kv, spec.head_dim), (2, sk, heads_kv, spec.head_dim_v))]
        q, k, v = (to_device(x, spec.dtype) for x in host)
        tensors = random_tensors(spec, rng, (2, heads, sq, sk))
        got, lse = (to_float64(x) for x in kernel_output(kernel, q, k, v, tensors))
        q64, k64, v64 = (to_float64(x) for x in (q, k, v))
        mods = reference_mods(spec, heads, tensors, sq, sk)
        forward_mods = {name: fn for name, fn in mods.items() if name != "score_mod_grad"}
        ref, ref_lse = attention_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale, mask=mask,
                                           **forward_mods)
        if spec.fp8:        # the baseline: the FP8 algorithm at its rounding points (P through e4m3, bf16 out)
            same, _ = attention_fp8_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale, mask=mask,
                                              **forward_mods)
        else:
            same, _ = attention_same_dtype_reference(q64, k64, v64, causal=spec.causal, scale=spec.scale,
                                                     dtype=spec.dtype, mask=mask, **forward_mods)
        ok, err, bound = acceptance_check(got, same, ref)
        finite = np.isfinite(ref_lse)
        lse_ok = np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)) and (
            not finite.any() or np.max(np.abs(lse[finite] - ref_lse[finite])) < 2e-3)
        all_ok &= ok and lse_ok
        echo(f"seqlen_q={sq:5d} seqlen_k={sk:5d}  max|out-ref64|={err:.3e}  bound={bound:.3e}  "
             f"lse {'ok' if lse_ok else 'WRONG'}  {'PASS' if ok and lse_ok else 'FAIL'}")
        if spec.backward:
            all_ok &= check_gradients(spec, q, k, v, mask, mods, tensors, rng, echo)
    return all_ok


def _torch_score_mod(score_mod, score_mod_grad):
    """A torch autograd op applying numpy score_mod / score_mod_grad callables (fp32 [b, h, sq, sk])."""
    import torch

    def index_arrays(s):
        heads, sq, sk = s.shape[1:]
        return np.arange(heads).reshape(heads, 1, 1, 1), np.arange(sq)[:, None], np.arange(sk)[None, :]

    def each_batch(fn, s):
        h, q_idx, kv_idx = index_arrays(s)
        host = s.detach().double().cpu().numpy()
        out = [np.broadcast_to(fn(host[b][:, None], b, h, q_idx, kv_idx), host[b][:, None].shape)[:, 0]
               for b in range(host.shape[0])]
        return torch.as_tensor(np.stack(out), dtype=s.dtype, device=s.device)

    class ScoreMod(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            ctx.save_for_backward(s)
            return each_batch(score_mod, s)

        @staticmethod
        def backward(ctx, grad):
            (s,) = ctx.saved_tensors
            return grad * each_batch(score_mod_grad, s)

    return ScoreMod.apply


def framework_attention(q, k, v, causal, scale, mask=None, softcap=None, alibi_slopes=None, mask_mod=None,
                        score_mod=None, score_mod_grad=None):
    """Naive attention as a framework runs it in q's dtype (torch: scores and softmax in fp32, P in the
    dtype); its autograd gradients are the same-dtype baseline of the gradient criterion. mask: bool
    [heads or 1, sq, sk] (numpy); alibi_slopes: [heads_q] (numpy); mask_mod: fn(b, h, q_idx, kv_idx) as
    the reference takes it."""
    import torch

    from ..codegen.modifiers import reference_scores

    hq, hkv = q.shape[2], k.shape[2]
    sq, sk = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    slopes = None if alibi_slopes is None else torch.as_tensor(alibi_slopes, device=q.device).float().reshape(1, hq)
    index = [torch.arange(n, device=q.device) for n in (q.shape[0], hq, sq, sk)]
    where = (index[0][:, None, None, None], index[1][None, :, None, None], index[2][:, None], index[3][None, :], sq, sk)
    s, _ = reference_scores(torch, s, {"softcap": softcap, "alibi_slopes": slopes}, where)     # modifiers.py's chain
    if score_mod is not None:
        s = _torch_score_mod(score_mod, score_mod_grad)(s)
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(sk - sq + 1)
    if mask is not None:
        hidden = hidden | ~torch.as_tensor(np.array(mask, dtype=bool), device=q.device)
    if mask_mod is not None:
        h, q_idx, kv_idx = np.arange(hq).reshape(hq, 1, 1, 1), np.arange(sq)[:, None], np.arange(sk)[None, :]
        visible = np.stack([np.broadcast_to(mask_mod(b, h, q_idx, kv_idx), (hq, 1, sq, sk))[:, 0]
                            for b in range(q.shape[0])])
        hidden = hidden | ~torch.as_tensor(visible, device=q.device)
    s = s.masked_fill(hidden, float("-inf"))
    sees = ~hidden.all(dim=-1)                                    # rows that see no key: out 0, no gradient
    s = torch.where(sees[..., None], s, torch.zeros_like(s))
    p = (torch.softmax(s, dim=-1) * sees[..., None]).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def check_gradients(spec, q, k, v, mask, mods, tensors, rng, echo) -> bool:
    """dq, dk, dv of the backward kernels against float64, each bounded by the framework's error (the
    same mask, modifiers and named tensors as the forward check)."""
    import torch

    from ..api import build, build_backward
    from .reference import attention_reference_backward

    scale = spec.softmax_scale
    dout = to_device(rng.standard_normal(q.shape[:3] + (spec.head_dim_v,)).astype(np.float32), spec.dtype)
    out, lse = build(spec)(q, k, v, tensors=tensors or None)
    grads = build_backward(spec)(q, k, v, out, lse, dout, tensors=tensors or None)
    torch.cuda.synchronize()
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    slopes = mods.get("alibi_slopes")
    user = {name: mods.get(name) for name in ("mask_mod", "score_mod", "score_mod_grad")}
    framework_attention(*leaves, spec.causal, scale, mask=mask, softcap=spec.softcap, alibi_slopes=slopes,
                        **user).backward(dout)
    refs = attention_reference_backward(*(to_float64(x) for x in (q, k, v, dout)), causal=spec.causal,
                                        scale=scale, mask=mask, softcap=spec.softcap, alibi_slopes=slopes, **user)
    ok_all, parts = True, []
    for name, mine, leaf, ref in zip(("dq", "dk", "dv"), grads, leaves, refs):
        ok, err, bound = acceptance_check(to_float64(mine), to_float64(leaf.grad), ref)
        ok_all &= ok
        parts.append(f"{name} {err:.2e}/{bound:.2e}")
    echo(f"{'':31}gradients: {'  '.join(parts)}  {'PASS' if ok_all else 'FAIL'}")
    return ok_all


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
    """float32 host array -> torch CUDA tensor in `dtype` (CuPy has no bf16; N(0, 1) values fit e4m3 as they are)."""
    import torch

    return torch.from_numpy(x).to("cuda", {"fp16": torch.float16, "bf16": torch.bfloat16,
                                           "fp8_e4m3": torch.float8_e4m3fn}[dtype])


def to_float64(x):
    import torch

    return x.detach().to("cpu", torch.float64).numpy()


def random_tensors(spec, rng, sizes):
    """Fresh values for the spec's named tensors: float32 normal, int32 in 0..3 (ids, small offsets)."""
    import torch

    from ..expressions import tensor_decls

    values = {}
    for t in tensor_decls(spec.tensors):
        shape = t.sizes(*sizes)
        host = rng.standard_normal(shape).astype(np.float32) if t.dtype == "float32" else \
            rng.integers(0, 4, shape).astype(np.int32)
        values[t.name] = torch.from_numpy(host).to("cuda")
    return values


def reference_mods(spec, heads, tensors, seqlen_q, seqlen_k) -> dict:
    """The reference's modifiers for the spec: softcap, the standard ALiBi slopes, and the user expressions
    evaluated on the GPU by the kernel's own functions (expression_evaluator)."""
    from .reference import alibi_slopes

    mods = {"softcap": spec.softcap, "alibi_slopes": alibi_slopes(heads) if spec.alibi else None}
    if spec.score_mod is not None or spec.mask_mod is not None:
        evaluate = expression_evaluator(spec, tensors, seqlen_q, seqlen_k)
        if spec.score_mod is not None:
            mods["score_mod"] = lambda s, b, h, q_idx, kv_idx: evaluate(s, b, h, q_idx, kv_idx)[0]
        if spec.score_mod_grad is not None:
            mods["score_mod_grad"] = lambda s, b, h, q_idx, kv_idx: evaluate(s, b, h, q_idx, kv_idx)[2]
        if spec.mask_mod is not None:
            mods["mask_mod"] = lambda b, h, q_idx, kv_idx: evaluate(None, b, h, q_idx, kv_idx)[1]
    return mods


def expression_evaluator(spec, tensors, seqlen_q, seqlen_k):
    """fn(scores [heads_kv, group, rows, cols] or None, b, h [heads_kv, group, 1, 1], q_idx [rows, 1],
    kv_idx [1, cols]) -> (modified scores, visible, score_mod_grad), each [heads_kv, group, rows, cols]."""
    import cupy

    from ..expressions import tensor_decls
    from ..codegen.jinja_env import render_piece
    from ..codegen.modifiers import ActiveModifiers

    decls = tensor_decls(spec.tensors)
    source = render_piece("pieces/expression_eval.cu.j2", tensors=decls, mods=ActiveModifiers(), score_mod=spec.score_mod,
                          score_mod_grad=spec.score_mod_grad, mask_mod=spec.mask_mod, probe=False)
    function = cupy.RawKernel(source, "eval_expressions", options=("-std=c++17",))
    pointers = [np.uint64(tensors[t.name].data_ptr()) for t in decls]

    def evaluate(scores, b, h, q_idx, kv_idx):
        rows, cols = np.shape(q_idx)[-2], np.shape(kv_idx)[-1]
        row0 = int(np.ravel(q_idx)[0])
        shape = np.shape(h)[:2] + (rows, cols)
        flat = cupy.asarray(np.ascontiguousarray(scores if scores is not None else np.zeros(shape)),
                            dtype=cupy.float32)
        modified, derivative = cupy.empty_like(flat), cupy.empty_like(flat)
        visible = cupy.empty(shape, dtype=cupy.uint8)
        count = flat.size
        function(((count + 255) // 256,), (256,), (flat, modified, derivative, visible, np.int64(count),
                 np.int32(shape[0] * shape[1]), np.int32(rows), np.int32(cols), np.int32(row0), np.int32(b),
                 np.int32(seqlen_q), np.int32(seqlen_k), *pointers))
        return (cupy.asnumpy(modified).astype(np.float64), cupy.asnumpy(visible).astype(bool),
                cupy.asnumpy(derivative).astype(np.float64))

    return evaluate


def kernel_output(kernel, q, k, v, tensors=None):
    import torch

    b, sq, h, _ = q.shape
    dtype = torch.bfloat16 if kernel.spec.fp8 else q.dtype
    out = torch.full((b, sq, h, kernel.spec.head_dim_v), float("nan"), device="cuda", dtype=dtype)   # poisoned
    lse = torch.full((b, h, sq), float("nan"), device="cuda", dtype=torch.float32)
    kernel(q, k, v, out=out, lse=lse, tensors=tensors or None)
    torch.cuda.synchronize()
    return out, lse
