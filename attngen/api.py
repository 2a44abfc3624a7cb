"""The public entry points: plan, build, attention. They all drive the same pipeline functions."""

from __future__ import annotations

from .planner import device as device_mod
from .build import build, build_backward, build_decode, plan_and_compile, plan_and_compile_backward  # noqa: F401  (public)
from .calls import UNBOUNDED_WINDOW, _check_block_mask, position_shift, spec_for_inputs  # noqa: F401  (public: spec_for_inputs)
from .runtime.launch import _view
from .planner.forward import Plan, make_plan
from .spec import Spec


def plan(spec: Spec, arch: str | None = None) -> Plan:
    """Choose tiles for `spec` on `arch` (a preset; no GPU needed) or, with arch=None, the current GPU."""
    return make_plan(spec, device_mod.resolve(arch))


def attention_backward(q, k, v, out, lse, dout, causal: bool = False, scale: float | None = None, *,
                       window=None, softcap: float | None = None, alibi_slopes=None, deterministic: bool = False,
                       position_offsets=None):
    """(dq, dk, dv) of attention(q, k, v, causal, scale, window=, softcap=, alibi_slopes=, position_offsets=)
    from out and lse and the output gradient dout; torch CUDA tensors or CuPy arrays, in the inputs' dtype.
    out and lse may be those of a longer attention that q's rows took part in (ring attention's merged
    result): the gradients are then this block's share of it. dQ is summed with fp32 atomics unless
    deterministic=True (a separate dQ pass, bit-identical run to run, as FlashAttention's deterministic flag)."""
    shift = position_shift(position_offsets, q, k)
    spec = spec_for_inputs(q, k, v, causal, window=window, softcap=softcap, alibi=alibi_slopes is not None,
                           deterministic=deterministic)
    return build_backward(spec, _view("q", q).device)(q, k, v, out, lse, dout, scale=scale,
                                                      alibi_slopes=alibi_slopes, position_shift=shift)


def attention(q, k, v, causal: bool = False, scale: float | None = None, return_lse: bool = False, *,
              window=None, softcap: float | None = None, alibi_slopes=None, block_mask=None,
              deterministic: bool = False, position_offsets=None, q_descale=None, k_descale=None, v_descale=None):
    """softmax(scale * q k^T [modified, masked]) v, compiled for these inputs on first use and cached.

    q [batch, seqlen_q, heads_q, head_dim], k [batch, seqlen_k, heads_kv, head_dim],
    v [batch, seqlen_k, heads_kv, head_dim_v]; torch CUDA tensors or CuPy arrays, fp16 or bf16; or torch
    float8_e4m3fn on Hopper (head_dim = head_dim_v 128 or 256, forward only, bf16 out) with q_descale,
    k_descale, v_descale: float32, one factor or [batch, heads_kv] (FlashAttention-3's), None for 1.
    window=(left, right): each query sees keys within left before and right after its (bottom-right
    aligned) position, -1 for no limit; softcap: scores become softcap * tanh(score / softcap);
    alibi_slopes: fp32 [heads_q] or [batch, heads_q], adds -slope * |i + seqlen_k - seqlen_q - j|;
    block_mask: an attngen.BlockMask (FlexAttention's block_mask): only its kept blocks are computed.
    deterministic: the backward (when q, k or v require grad) computes dQ in its own pass instead of
    with fp32 atomics: bit-identical gradients run to run, somewhat slower.
    position_offsets=(q_start, kv_start): q and k are shards of one longer sequence starting at these global
    positions (context parallelism, ring attention); causal, window and ALiBi compare q_start + i with
    kv_start + j. None: bottom-right alignment. Merge the shards' results with merge_attention.
    Returns out (same library and device as q; q's dtype, bf16 for fp8), and lse [batch, heads_q, seqlen_q] fp32
    if asked."""
    descales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
    descaled = any(x is not None for x in descales.values())
    if block_mask is None and _compiling(q):      # torch.compile: the custom op, opaque to the tracer
        if descaled or "float8" in str(q.dtype):
            raise ValueError("q: fp8_e4m3 attention does not run under torch.compile yet; call attention eagerly")
        from .autograd import attention_op, window_list

        out, lse = attention_op(q, k, v, None, None, causal, scale, window_list(window), softcap, alibi_slopes,
                                deterministic, position_shift(position_offsets, q, k))
        return (out, lse) if return_lse else out
    plain = (window is None and softcap is None and alibi_slopes is None and block_mask is None
             and deterministic is False and position_offsets is None and (causal is True or causal is False)
             and not descaled)
    if plain:       # the common call: one dict lookup to the kernel (the call-overhead budget is ~30 us)
        try:
            plain_key = (type(q), q.dtype, q.shape[-1:], v.shape[-1:], len(q.shape), len(v.shape), causal,
                         _device_index(q))
        except (AttributeError, TypeError):             # not arrays: the general path explains
            plain, plain_key = False, None
        kernel = _plain_kernels.get(plain_key)
        if kernel is not None and not _needs_grad(q, k, v):
            out, lse = kernel(q, k, v, scale=scale)
            return (out, lse) if return_lse else out
    shift = position_shift(position_offsets, q, k)
    spec = _spec_for_call(q, k, v, causal, window=window, softcap=softcap, alibi=alibi_slopes is not None,
                          block_mask=block_mask, deterministic=deterministic)
    call = dict(scale=scale, alibi_slopes=alibi_slopes, block_mask=block_mask, position_shift=shift,
                **(descales if descaled else {}))
    if _needs_grad(q, k, v):
        from .autograd import attention_with_grad

        out, lse = attention_with_grad(spec, q, k, v, call)
    else:
        kernel = build(spec, _device_index(q))
        out, lse = kernel(q, k, v, **call)
        if plain:
            if len(_plain_kernels) >= MAX_CALL_SPECS:
                _plain_kernels.clear()
            _plain_kernels[plain_key] = kernel
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int | None = None,
                     max_seqlen_k: int | None = None, causal: bool = False, scale: float | None = None,
                     return_lse: bool = False, *, window=None, softcap: float | None = None, alibi_slopes=None,
                     deterministic: bool = False):
    """Attention over a packed batch of sequences of different lengths (FlashAttention's varlen call).

    q [total_q, heads_q, head_dim], k [total_k, heads_kv, head_dim], v [total_k, heads_kv, head_dim_v];
    sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k
    and v (int32 [batch + 1] arrays on q's device, rising from 0; sequences may be empty). causal aligns
    each sequence's diagonal bottom-right (FlashAttention's convention); window, softcap, alibi_slopes
    ([heads_q] or [batch, heads_q]) and deterministic as attention(). max_seqlen_q / max_seqlen_k are
    accepted for FlashAttention's signature and never needed: the launch sizes its grid from the totals
    and reads the lengths on the GPU. Offsets that do not rise from 0 to at most the totals run no tile
    (nothing outside the arrays is touched) and leave out unwritten, as rows in no sequence are.
    Returns out [total_q, heads_q, head_dim_v] (q's library, dtype and device), and lse [heads_q, total_q]
    fp32 if asked; differentiable for torch tensors."""
    if _compiling(q):                              # torch.compile: the custom op, opaque to the tracer
        from .autograd import attention_op, window_list

        out, lse = attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window_list(window), softcap,
                                alibi_slopes, deterministic, 0)
        return (out, lse) if return_lse else out
    for name, hint in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, int) or hint < 0):
            raise ValueError(f"{name}: expected None or an int >= 0 (a hint), got {hint!r}")
    spec = _spec_for_call(q, k, v, causal, window=window, softcap=softcap, alibi=alibi_slopes is not None,
                          block_mask=None, deterministic=deterministic, layout="varlen")
    call = dict(scale=scale, alibi_slopes=alibi_slopes, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    if _needs_grad(q, k, v):
        from .autograd import attention_with_grad

        out, lse = attention_with_grad(spec, q, k, v, call)
    else:
        out, lse = build(spec, _device_index(q))(q, k, v, **call)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, block_table=None,
                           causal: bool = False, scale: float | None = None, window=None, softcap: float | None = None,
                           alibi_slopes=None, num_splits: int = 0, return_lse: bool = False):
    """Attention of new queries over a KV cache (FlashAttention's flash_attn_with_kvcache): decode, speculative
    decoding, chunked prefill.

    q [batch, seqlen_q, heads_q, head_dim]; the cache contiguous, k_cache [batch, capacity, heads_kv, head_dim]
    and v_cache [..., head_dim_v], or paged, [num_pages, page_size, heads_kv, ...] with block_table int32
    [batch, max_pages] (position p of sequence b in page block_table[b, p // page_size], row p % page_size;
    page sizes 1..256). cache_seqlens int32 [batch] on q's device: the tokens cached per sequence (or one int for
    every sequence, as FlashAttention takes it: a device array is made of it on q's stream). k, v
    [batch, seqlen_new, heads_kv, ...] (optional, together) are written into the cache in place at
    cache_seqlens[b] .. + seqlen_new - 1, then attended; cache_seqlens itself is not changed. Sequence b
    attends to its first cache_seqlens[b] + seqlen_new keys; causal aligns bottom-right (the last query at
    the last key); window, softcap, alibi_slopes as attention(). num_splits: how many CTAs share a
    sequence's keys (0: the planner chooses from the SMs, batch, heads and the cache's capacity). Returns out
    [batch, seqlen_q, heads_q, head_dim_v], and lse [batch, heads_q, seqlen_q] fp32 if asked. GQA/MQA:
    heads_q a multiple of heads_kv. No autograd (the cache is an inference structure)."""
    cache_seqlens = _lengths_array(cache_seqlens, q)
    if _compiling(q):                              # torch.compile: the custom op (it appends in place)
        from .autograd import attention_with_kvcache_op, window_list

        out, lse = attention_with_kvcache_op(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale,
                                             window_list(window), softcap, alibi_slopes, num_splits)
        return (out, lse) if return_lse else out
    page_size = k_cache.shape[1] if block_table is not None and len(k_cache.shape) == 4 else None
    spec = _spec_for_call(q, k_cache, v_cache, causal, window=window, softcap=softcap, alibi=alibi_slopes is not None,
                          block_mask=None, deterministic=False, layout="kvcache", page_size=page_size)
    out, lse = build_decode(spec, _device_index(q))(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                                     block_table=block_table, scale=scale, alibi_slopes=alibi_slopes,
                                                     num_splits=num_splits)
    return (out, lse) if return_lse else out


def _lengths_array(cache_seqlens, q):
    """cache_seqlens as the kernels read it: an int becomes an int32 [batch] array on q's device (torch or CuPy)."""
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
        return cache_seqlens                       # an array: the launcher checks it
    if cache_seqlens < 0:
        raise ValueError(f"cache_seqlens: expected an int >= 0 or an int32 [batch] array, got {cache_seqlens}")
    shape = getattr(q, "shape", ())
    if len(shape) != 4:
        raise ValueError(f"q: expected [batch, seqlen_q, heads_q, head_dim], got {list(shape)}")
    if type(q).__module__.startswith("torch"):
        import torch

        return torch.full((shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    import cupy

    with cupy.cuda.Device(q.device.id):
        return cupy.full((shape[0],), cache_seqlens, dtype=cupy.int32)


def _compiling(q) -> bool:
    """A torch tensor under torch.compile's tracing (torch imported only when q is a torch tensor)."""
    if not type(q).__module__.startswith("torch"):
        return False
    from .autograd import compiling

    return compiling(q)


_plain_kernels: dict = {}       # (q, v types/dtype/head dims/rank, causal, device) -> Kernel, for keyword-free calls
_call_specs: dict = {}          # what a call's spec depends on -> that spec (spec_for_inputs costs ~30 us)
MAX_CALL_SPECS = 1024


def _spec_for_call(q, k, v, causal, **keywords) -> Spec:
    """spec_for_inputs, memoised on exactly what it reads: the head dims, dtype and rank of q and v, and
    the keywords with their types (so that causal=1 is still refused). Failures are never memoised."""
    try:
        window = keywords["window"]
        key = (type(q), str(q.dtype), tuple(q.shape[-1:]), len(q.shape), tuple(v.shape[-1:]), len(v.shape),
               causal, type(causal), tuple((w, type(w)) for w in window) if isinstance(window, (list, tuple)) else window,
               keywords["softcap"], type(keywords["softcap"]), keywords["alibi"], keywords["deterministic"],
               type(keywords["deterministic"]),
               _block_mask_key(keywords["block_mask"]), keywords.get("layout", "batch"), keywords.get("page_size"))
        spec = _call_specs.get(key)
    except (AttributeError, TypeError):        # unusual arguments: no memo, spec_for_inputs explains
        key, spec = None, None
    if spec is None:
        spec = spec_for_inputs(q, k, v, causal, **keywords)
        if key is not None:
            if len(_call_specs) >= MAX_CALL_SPECS:
                _call_specs.clear()
            _call_specs[key] = spec
    return spec


def _block_mask_key(block_mask):
    """What a call's spec takes from its BlockMask: the block size and the partial blocks' predicate."""
    if block_mask is None:
        return None
    _check_block_mask(block_mask)
    return tuple(block_mask.block_size), block_mask.kernel_predicate()


def _device_index(x) -> int:
    """x's CUDA device, cheaply for a torch CUDA tensor; _view explains anything else."""
    if type(x).__module__ == "torch":
        index = x.get_device()
        if index >= 0:
            return index
    return _view("q", x).device


def _needs_grad(*tensors) -> bool:
    """torch tensors that require grad, with autograd recording (not under torch.no_grad)."""
    if type(tensors[0]).__module__.split(".")[0] != "torch":
        return False
    import torch

    # k or v may be of another library: check_inputs refuses the mix with a TypeError naming them
    return any(getattr(t, "requires_grad", False) is True for t in tensors) and torch.is_grad_enabled()
