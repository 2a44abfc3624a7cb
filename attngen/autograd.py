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
