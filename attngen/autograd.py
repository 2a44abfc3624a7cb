"""torch.autograd integration: attngen's forward and backward kernels as one autograd Function."""

from __future__ import annotations

import torch

from .spec import Spec


class AttentionFunction(torch.autograd.Function):
    """out, lse = attention(q, k, v); backward recomputes P from the saved LSE (never stores it)."""

    @staticmethod
    def forward(ctx, q, k, v, spec: Spec, call: dict):
        from .build import build

        out, lse = build(spec, q.device.index)(q, k, v, **call)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.call = spec, call          # scale, alibi_slopes, block_mask: the backward takes them too
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from .build import build_backward

        q, k, v, out, lse = ctx.saved_tensors
        # Autograd may hand over an expanded or strided gradient; the kernels want 16-byte aligned rows.
        if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]) or dout.data_ptr() % 16:
            dout = dout.contiguous()
        dq, dk, dv = build_backward(ctx.spec, q.device.index)(q, k, v, out, lse, dout, **ctx.call)
        return dq, dk, dv, None, None


def attention_with_grad(spec: Spec, q, k, v, call: dict):
    """Refuses up front (before the forward runs) what the backward kernels do not cover."""
    from .runtime.backward import check_backward_support

    check_backward_support(spec)
    return AttentionFunction.apply(q, k, v, spec, call)


# ---- torch custom operators: what torch.compile and CUDA graphs see ------------------------------------------
# The entry points under torch.compile call these ops, opaque to the compiler (no graph break): their fake
# implementations give the outputs' shapes and dtypes and build (compile) the kernels at trace time, so a
# compiled graph's first run launches kernels that already exist. Arguments are the keywords as primitives;
# the ops rebuild the spec from them (calls.spec_for_inputs, memoised on those primitives).

from typing import Optional  # noqa: E402  (the ops' schemas are read from these annotations)

from torch import Tensor  # noqa: E402


def _window(window: Optional[list[int]]):
    return None if window is None else tuple(window)


def _op_spec(q, k, v, causal, window, softcap, alibi, deterministic, varlen: bool) -> Spec:
    """The spec of an op's call, memoised on the primitives it depends on (fake tensors have no data to view)."""
    # head dims are compile-time sizes of a kernel: int() pins a symbolic one (dynamic shapes) to its value
    key = (q.dtype, int(q.shape[-1]), int(v.shape[-1]), causal, None if window is None else tuple(window), softcap,
           alibi, deterministic, varlen)
    spec = _op_specs.get(key)
    if spec is None:
        spec = _op_specs[key] = _spec_from_shapes(q, v, causal, window, softcap, alibi, deterministic, varlen)
    return spec


_op_specs: dict = {}
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def _spec_from_shapes(q, v, causal, window, softcap, alibi, deterministic, varlen: bool) -> Spec:
    """spec_for_inputs for fake tensors (no data pointer to view): the same spec from dtype and head dims."""
    from .calls import spec_from

    return spec_from(_DTYPES.get(q.dtype, str(q.dtype)), int(q.shape[-1]), int(v.shape[-1]), causal,
                     window=_window(window), softcap=softcap, alibi=alibi, deterministic=deterministic,
                     layout="varlen" if varlen else "batch")


def _built_ahead(spec: Spec, device, backward: bool = False) -> None:
    """Build (compile and load) the kernels of `spec` for `device` at trace time, where a GPU is present."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    from .build import build, build_backward

    index = device.index if device.index is not None else torch.cuda.current_device()
    if backward:
        build_backward(spec, index)
    else:
        build(spec.forward_spec, index)


@torch.library.custom_op("attngen::attention", mutates_args=(), device_types="cuda")
def attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                 causal: bool, scale: Optional[float], window: Optional[list[int]], softcap: Optional[float],
                 alibi_slopes: Optional[Tensor], deterministic: bool, position_shift: int) -> tuple[Tensor, Tensor]:
    """(out, lse) of attngen.attention (cu_seqlens None) or attention_varlen."""
    from .build import build

    varlen = cu_seqlens_q is not None
    spec = _op_spec(q, k, v, causal, window, softcap, alibi_slopes is not None, deterministic, varlen)
    call = dict(scale=scale, alibi_slopes=alibi_slopes, position_shift=position_shift)
    if varlen:
        call |= dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return build(spec.forward_spec, q.device.index)(q, k, v, **call)


@attention_op.register_fake
def _attention_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap, alibi_slopes, deterministic,
                    position_shift):
    varlen = cu_seqlens_q is not None
    _built_ahead(_op_spec(q, k, v, causal, window, softcap, alibi_slopes is not None, deterministic, varlen), q.device)
    if varlen:      # out [total_q, heads_q, dv], lse [heads_q, total_q]
        return q.new_empty((*q.shape[:2], v.shape[-1])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return (q.new_empty((*q.shape[:3], v.shape[-1])),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))


@torch.library.custom_op("attngen::attention_backward", mutates_args=(), device_types="cuda")
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], causal: bool,
                          scale: Optional[float], window: Optional[list[int]], softcap: Optional[float],
                          alibi_slopes: Optional[Tensor], deterministic: bool,
                          position_shift: int) -> tuple[Tensor, Tensor, Tensor]:
    from .build import build_backward

    varlen = cu_seqlens_q is not None
    spec = _op_spec(q, k, v, causal, window, softcap, alibi_slopes is not None, deterministic, varlen)
    if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]) or dout.data_ptr() % 16:
        dout = dout.contiguous()
    call = dict(scale=scale, alibi_slopes=alibi_slopes, position_shift=position_shift)
    if varlen:
        call |= dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return build_backward(spec, q.device.index)(q, k, v, out, lse, dout, **call)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                             alibi_slopes, deterministic, position_shift):
    spec = _op_spec(q, k, v, causal, window, softcap, alibi_slopes is not None, deterministic, cu_seqlens_q is not None)
    _built_ahead(spec, q.device, backward=True)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, causal, scale, window, softcap, alibi_slopes, deterministic, shift = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi_slopes)
    ctx.options = (causal, scale, window, softcap, deterministic, shift)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi_slopes = ctx.saved_tensors
    causal, scale, window, softcap, deterministic, shift = ctx.options
    dq, dk, dv = attention_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale, window, softcap,
                                       alibi_slopes, deterministic, shift)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)


def compiling(x) -> bool:
    """Whether a torch tensor's call is being traced by torch.compile (the ops' route)."""
    return type(x).__module__.startswith("torch") and torch.compiler.is_compiling()


def window_list(window):
    """The op's form of a window keyword: a list of two ints, or None."""
    return None if window is None else [int(w) for w in window]


@torch.library.custom_op("attngen::attention_with_kvcache", mutates_args=("k_cache", "v_cache"), device_types="cuda")
def attention_with_kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor], v: Optional[Tensor],
                              cache_seqlens: Tensor, block_table: Optional[Tensor], causal: bool,
                              scale: Optional[float], window: Optional[list[int]], softcap: Optional[float],
                              alibi_slopes: Optional[Tensor], num_splits: int) -> tuple[Tensor, Tensor]:
    """(out, lse) of attngen.attention_with_kvcache; k, v are appended into the caches in place."""
    from .build import build_decode

    spec = _kvcache_spec(q, k_cache, v_cache, block_table, causal, window, softcap, alibi_slopes is not None)
    return build_decode(spec, q.device.index)(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                              block_table=block_table, scale=scale, alibi_slopes=alibi_slopes,
                                              num_splits=num_splits)


@attention_with_kvcache_op.register_fake
def _kvcache_fake(q, k_cache, v_cache, k, v, cache_seqlens, block_table, causal, scale, window, softcap, alibi_slopes,
                  num_splits):
    spec = _kvcache_spec(q, k_cache, v_cache, block_table, causal, window, softcap, alibi_slopes is not None)
    if q.device.type == "cuda" and torch.cuda.is_available():
        from .build import build_decode

        build_decode(spec, q.device.index if q.device.index is not None else torch.cuda.current_device())
    return (q.new_empty((*q.shape[:3], v_cache.shape[-1])),
            q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32))


def _kvcache_spec(q, k_cache, v_cache, block_table, causal, window, softcap, alibi) -> Spec:
    page_size = int(k_cache.shape[1]) if block_table is not None else None
    from .calls import spec_from

    return spec_from(_DTYPES.get(q.dtype, str(q.dtype)), int(q.shape[-1]), int(v_cache.shape[-1]), causal,
                     window=_window(window), softcap=softcap, alibi=alibi, layout="kvcache", page_size=page_size)
