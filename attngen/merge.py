"""merge_attention: one attention over the union of two key sets, from the attention over each.

Attention over keys A ∪ B is a weighted mean of the two partial results, weighted by their softmax
denominators: with L = log-sum-exp (the `lse` attngen returns),

    L   = log(exp(L_a) + exp(L_b))
    out = exp(L_a - L) * out_a + exp(L_b - L) * out_b

This is what ring attention does as K/V blocks arrive (each rank's partial result merged into the running
one), and what split-KV decoding does with the splits. A row that sees no key in either part keeps out 0 and
lse -inf, as attngen's kernels give it; a row that sees keys in one part only gets that part's result.
"""

from __future__ import annotations

import numpy as np


def merge_attention(out_a, lse_a, out_b, lse_b):
    """(out, lse) of the attention over the keys of both parts (module doc).

    out_a, out_b: [..., seqlen_q, heads, head_dim_v] in any float dtype (attngen's [batch, seqlen_q, heads,
    head_dim_v], or varlen's [total_q, heads, head_dim_v]); lse_a, lse_b: float32 [..., heads, seqlen_q]
    (attngen's [batch, heads, seqlen_q], varlen's [heads, total_q]), natural log. Torch tensors (any device),
    CuPy or NumPy arrays, all four of one library. The merge is computed in float32 (float64 when out_a is
    float64, as a float64 reference ring needs); out has the inputs' dtype, lse the merge's. Torch autograd flows
    through it."""
    arrays = {"out_a": out_a, "lse_a": lse_a, "out_b": out_b, "lse_b": lse_b}
    kinds = {_kind(name, x) for name, x in arrays.items()}
    if len(kinds) > 1:
        raise TypeError(f"out_a, lse_a, out_b, lse_b: expected one array library, got {sorted(kinds)}")
    if tuple(out_a.shape) != tuple(out_b.shape) or len(out_a.shape) < 3:
        raise ValueError(f"out_a, out_b: expected one shape [..., seqlen_q, heads, head_dim_v], got "
                         f"{list(out_a.shape)} and {list(out_b.shape)}")
    *lead, seqlen_q, heads, _ = out_a.shape
    expected = (*lead, heads, seqlen_q)
    for name in ("lse_a", "lse_b"):
        if tuple(arrays[name].shape) != expected:
            raise ValueError(f"{name}: expected shape {list(expected)} ([..., heads, seqlen_q] of out's "
                             f"{list(out_a.shape)}), got {list(arrays[name].shape)}")
    ops = _Torch() if kinds == {"torch"} else _ArrayModule(kinds.pop())
    ops.wide = str(out_a.dtype).endswith("float64")
    la, lb = ops.float32(lse_a), ops.float32(lse_b)
    top = ops.maximum(la, lb)
    shift = ops.where(top == -np.inf, ops.zeros_like(top), top)     # both -inf: no key anywhere
    wa, wb = ops.exp(la - shift), ops.exp(lb - shift)
    total = wa + wb
    seen = total > 0
    lse = ops.where(seen, shift + ops.log(ops.where(seen, total, ops.ones_like(total))), top)
    safe_total = ops.where(seen, total, ops.ones_like(total))
    # weights [..., heads, seqlen_q] -> [..., seqlen_q, heads, 1] beside out
    weight = lambda w: ops.swap_last(w / safe_total)[..., None]  # noqa: E731
    out = weight(wa) * ops.float32(out_a) + weight(wb) * ops.float32(out_b)
    return ops.cast_like(out, out_a), lse


def _kind(name: str, x) -> str:
    module = type(x).__module__.split(".")[0]
    if module in ("torch", "cupy", "numpy"):
        return module
    raise TypeError(f"{name}: expected a torch tensor, a CuPy or a NumPy array, got {type(x).__name__}")


class _Torch:
    """The few operations the merge needs, on torch tensors."""

    def __getattr__(self, name):
        import torch

        return getattr(torch, name)

    wide = False

    def float32(self, x):
        """The merge's precision: float32, or float64 for float64 inputs (`wide`)."""
        return x.double() if self.wide else x.float()

    @staticmethod
    def swap_last(x):
        return x.transpose(-1, -2)

    @staticmethod
    def cast_like(x, like):
        return x.to(like.dtype)


class _ArrayModule:
    """The same on NumPy or CuPy arrays (one API)."""

    def __init__(self, kind: str):
        import importlib

        self.xp = importlib.import_module(kind)

    def __getattr__(self, name):
        return getattr(self.xp, name)

    wide = False

    def float32(self, x):
        return x.astype(self.xp.float64 if self.wide else self.xp.float32, copy=False)

    @staticmethod
    def swap_last(x):
        return x.swapaxes(-1, -2)

    @staticmethod
    def cast_like(x, like):
        return x.astype(like.dtype, copy=False)
