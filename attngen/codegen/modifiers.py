"""Score modifiers, each defined once: what it adds to a kernel's parameters and ModContext, its device code
for the forward (the modified score) and the backward (the same, plus its derivative), the values a launch
passes for it, and its reference (numpy or torch, the same formula).

The chain, in order, turns the raw q.k into the score the softmax sees (natural units):
    score = q.k * softmax_scale -> softcap * tanh(score / softcap) -> score - slope * |aligned q - kv| -> score_mod
and `grad` accumulates d(score) / d(q.k * softmax_scale), which the backward multiplies into dS.

Masks are not here: a mask (causal, a window, a document layout, ...) is a pattern in masks.py, which
carries its numpy, element and tile predicates in one class; a mask_mod is a user expression. Both only
hide elements, through the one `element_hidden` predicate the forward and backward share.

This module imports nothing from attngen: the spec stage (expressions' probe), codegen, the runtime and the
tools all read it. A modifier reads the variant's fields (duck-typed) and a launch's `call` (arguments.py).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Param:
    """One kernel parameter: its C type and name (signature.py orders them into each kernel's list)."""

    ctype: str
    name: str

    @property
    def declaration(self) -> str:
        restrict = " __restrict__" if self.ctype.endswith("*") else ""
        return f"{self.ctype}{restrict} {self.name}"


class Modifier:
    """The base: a modifier contributes nothing unless it overrides a part."""

    name = ""

    def active(self, variant) -> bool:
        raise NotImplementedError

    def params(self, variant) -> tuple[Param, ...]:
        """Kernel parameters (after the kernel's own), in this order."""
        return ()

    def constants(self, variant) -> str:
        """File-scope C ahead of the device code (e.g. a constexpr)."""
        return ""

    def fields(self, variant) -> tuple[tuple[str, str, str], ...]:
        """ModContext members: (C type, name, comment)."""
        return ()

    def init(self, variant) -> str:
        """C statements that set this modifier's ModContext members from the kernel parameters, once per CTA."""
        return ""

    def head_init(self, variant) -> str:
        """C statements that set the members that depend on the query head `head` of batch `batch` (after
        init, and again where a kernel moves to another head)."""
        return ""

    def score_code(self, variant, grad: bool) -> str:
        """C statements on `float score` (and, with grad, `float grad`, the chain's derivative so far)."""
        return ""

    def reference(self, xp, s, values: dict, where):
        """(modified s, d(modified)/d(s) or None for 1) over an array s; xp: numpy or torch; values: the
        reference call's keywords; where: (b, h, q_idx, kv_idx, seqlen_q, seqlen_k), broadcastable to s."""
        return s, None

    def launch_values(self, variant, call) -> dict:
        """{parameter name: value} for one launch (`call`: arguments.ModifierCall)."""
        return {}


class ScoreScale(Modifier):
    """With modifiers the kernel scales q.k itself (natural units) before the rest of the chain."""

    name = "scale"

    def active(self, variant) -> bool:
        return variant.score_mods

    def params(self, variant):
        return (Param("float", "softmax_scale"),)

    def fields(self, variant):
        return (("float", "softmax_scale", "scores are modified in natural units"),)

    def init(self, variant):
        return "ctx.softmax_scale = softmax_scale;"

    def score_code(self, variant, grad):
        return "score *= ctx.softmax_scale;"

    def launch_values(self, variant, call):
        return {"softmax_scale": call.scale}


class Softcap(Modifier):
    """score -> softcap * tanh(score / softcap) (Gemma 2, Grok); derivative 1 - tanh^2. The cap is a
    compile-time constant (a spec field)."""

    name = "softcap"

    def active(self, variant) -> bool:
        return variant.softcap is not None

    def constants(self, variant):
        return f"constexpr float SOFTCAP = {variant.softcap}f;"

    def score_code(self, variant, grad):
        code = "const float t = tanh_approx(score * (1.f / SOFTCAP));\nscore = SOFTCAP * t;"
        return code + ("\ngrad *= 1.f - t * t;" if grad else "")

    def reference(self, xp, s, values, where):
        cap = values.get("softcap")
        if cap is None:
            return s, None
        t = xp.tanh(s / cap)
        return cap * t, 1.0 - t * t


class Alibi(Modifier):
    """score -> score - slope[b, h] * |q_idx + seqlen_k - seqlen_q - kv_idx| (bottom-right aligned, as
    FlashAttention's alibi_slopes); slopes fp32 [heads_q] or [batch, heads_q], default ALiBi's standard ones."""

    name = "alibi"

    def active(self, variant) -> bool:
        return variant.alibi

    def params(self, variant):
        return (Param("const float*", "alibi_slopes"), Param("int", "alibi_batch_stride"))

    def fields(self, variant):
        return (("float", "alibi_slope", "this (batch, head)'s ALiBi slope"),)

    def head_init(self, variant):
        return "ctx.alibi_slope = alibi_slopes[batch * alibi_batch_stride + head];"

    def score_code(self, variant, grad):
        return "score -= ctx.alibi_slope * fabsf((float)(q_idx + ctx.causal_offset - kv_idx));"

    def reference(self, xp, s, values, where):
        slopes = values.get("alibi_slopes")
        if slopes is None:
            return s, None
        b, h, q_idx, kv_idx, seqlen_q, seqlen_k = where
        slope = xp.asarray(slopes[b % slopes.shape[0], h], dtype=s.dtype)     # slopes: [batch or 1, heads_q]
        distance = xp.asarray(xp.abs(q_idx + seqlen_k - seqlen_q - kv_idx), dtype=s.dtype)
        return s - slope * distance, None

    def launch_values(self, variant, call):
        slopes = call.alibi_slopes
        if slopes is None:
            heads = call.heads_q
            pointer = call.upload(("alibi", heads), heads, lambda: [standard_alibi_slopes(heads)])
            return {"alibi_slopes": pointer, "alibi_batch_stride": 0}
        view = call.view("alibi_slopes", slopes)
        batch, heads = call.batch, call.heads_q
        if view.kind != call.kind or view.dtype not in ("float32", "torch.float32") or view.device != call.device \
                or view.shape not in ((heads,), (batch, heads)) or view.strides[-1] != 1 \
                or (len(view.shape) == 2 and view.strides[0] != heads):
            raise ValueError(f"alibi_slopes: expected a contiguous {call.kind} float32 array of shape [{heads}] or "
                             f"[{batch}, {heads}] on device {call.device}, got {view.dtype} {view.shape}")
        return {"alibi_slopes": view.ptr, "alibi_batch_stride": heads if len(view.shape) == 2 else 0}


class UserScoreMod(Modifier):
    """The spec's score_mod expression (user_expressions.cuh.j2 defines user_score_mod and, for the backward,
    user_score_mod_grad). Pairs past either sequence are skipped, so its tensor reads stay in bounds."""

    name = "score_mod"

    def active(self, variant) -> bool:
        return variant.score_mod is not None

    def score_code(self, variant, grad):
        return ("if (q_idx < ctx.seqlen_q && kv_idx < ctx.seqlen_k) {\n"
                + ("    grad *= user_score_mod_grad(ctx, score, h, q_idx, kv_idx);\n" if grad else "")
                + "    score = user_score_mod(ctx, score, h, q_idx, kv_idx);\n}")

    def reference(self, xp, s, values, where):
        fn = values.get("score_mod")
        if fn is None:
            return s, None
        b, h, q_idx, kv_idx = where[:4]
        grad_fn = values.get("score_mod_grad")
        grad = None if grad_fn is None else grad_fn(s, b, h, q_idx, kv_idx)
        return fn(s, b, h, q_idx, kv_idx), grad


MODIFIERS: tuple[Modifier, ...] = (ScoreScale(), Softcap(), Alibi(), UserScoreMod())


class ActiveModifiers:
    """The modifiers a variant uses, as the templates and launchers read them."""

    def __init__(self, variant=None):
        """variant None: none (the expression probe's context)."""
        self.variant = variant
        self.chain = () if variant is None else tuple(m for m in MODIFIERS if m.active(variant))

    def __iter__(self):
        return iter(self.chain)

    def params(self) -> tuple[Param, ...]:
        return tuple(p for m in self.chain for p in m.params(self.variant))

    def constants(self) -> list[str]:
        return [c for m in self.chain if (c := m.constants(self.variant))]

    def fields(self) -> list[tuple[str, str, str]]:
        return [f for m in self.chain for f in m.fields(self.variant)]

    def init(self) -> list[str]:
        return [c for m in self.chain if (c := m.init(self.variant))]

    def head_init(self) -> list[str]:
        return [c for m in self.chain if (c := m.head_init(self.variant))]

    def score_code(self, grad: bool) -> list[str]:
        return [c for m in self.chain if (c := m.score_code(self.variant, grad))]

    def launch_values(self, call) -> dict:
        values = {}
        for m in self.chain:
            values.update(m.launch_values(self.variant, call))
        return values


@functools.lru_cache(maxsize=256)
def active_modifiers(variant) -> ActiveModifiers:
    """ActiveModifiers of a variant, made once: the launchers ask on every call."""
    return ActiveModifiers(variant)


def reference_scores(xp, s, values: dict, where):
    """The chain after the scale over s (= scale * q.k) in the reference: (modified s, d modified / d s or
    None for 1). values: softcap, alibi_slopes ([batch or 1, heads_q]), score_mod, score_mod_grad."""
    grad = None
    for m in MODIFIERS:
        s, g = m.reference(xp, s, values, where)
        if g is not None:
            grad = g if grad is None else grad * g
    return s, grad


def standard_alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi's default per-head slopes (Press et al.): 2^(-8 i / n) for n a power of two, else those of
    the nearest lower power of two followed by every other slope of twice that many heads."""
    def powers(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    low = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = powers(low) + powers(2 * low)[0::2][:num_heads - low]
    return np.asarray(slopes, dtype=np.float32)
