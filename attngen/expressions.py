"""User expressions: the spec's ``score_mod`` / ``mask_mod`` and the named tensors they read.

A score_mod is a CUDA float expression over ``score`` (q.k * scale, after softcap and ALiBi), the ints
``b, h, q_idx, kv_idx, seqlen_q, seqlen_k, num_heads`` and the named tensors; a mask_mod is a boolean
expression over the same names without ``score``. A score_mod_grad is d(score_mod)/d(score) over the
same names as the score_mod (training needs it). A named tensor is a ``const float*`` or
``const int*`` the caller passes by name (``kernel(q, k, v, tensors={"bias": ...})``); its declared
shape uses the symbols batch, heads (query heads), seqlen_q, seqlen_k or ints, and expressions index it
flat (``bias[h]``, ``doc_id[kv_idx]``, ``w[b * num_heads + h]``).

Expressions are validated by compiling them with NVRTC (front end only) inside the same functions the
kernel uses, with ``#line`` markers, so an error points into the user's expression.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import SpecError

TENSOR_DTYPES = {"float32": "float", "int32": "int"}
SHAPE_SYMBOLS = ("batch", "heads", "seqlen_q", "seqlen_k")
INDEX_NAMES = ("b", "h", "q_idx", "kv_idx", "seqlen_q", "seqlen_k", "num_heads")
RESERVED_NAMES = INDEX_NAMES + ("score", "ctx", "block_bit", "floor_div")
MAX_EXPRESSION_CHARS = 2000
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
# Statements, preprocessor lines, strings and inline assembly have no place in an expression.
_FORBIDDEN = re.compile(r"[;{}#\"'\\`]|\basm\b|\b__asm")


@dataclass(frozen=True)
class TensorDecl:
    """One named tensor: its C element type and declared shape (symbols or ints)."""

    name: str
    dtype: str                # "float32" | "int32"
    shape: tuple

    @property
    def ctype(self) -> str:
        return TENSOR_DTYPES[self.dtype]

    def sizes(self, batch: int, heads: int, seqlen_q: int, seqlen_k: int) -> tuple[int, ...]:
        """The concrete shape for one call."""
        values = dict(batch=batch, heads=heads, seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        return tuple(values[d] if isinstance(d, str) else d for d in self.shape)


def tensor_decls(tensors: dict | None) -> tuple[TensorDecl, ...]:
    """The spec's validated ``tensors:`` mapping as declarations, in name order."""
    return tuple(TensorDecl(name, t["dtype"], tuple(t["shape"])) for name, t in sorted((tensors or {}).items()))


def validate_tensors(value) -> dict | None:
    """Check the ``tensors:`` mapping: name -> {dtype: float32|int32, shape: [symbol or int, ...]}."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise SpecError("tensors", value, "a non-empty mapping name -> {dtype, shape}")
    out = {}
    for name, decl in value.items():
        field = f"tensors.{name}"
        if not isinstance(name, str) or not _IDENT_RE.match(name) or name in RESERVED_NAMES:
            raise SpecError("tensors", name, "tensor names that are C identifiers (at most 32 characters) and "
                            "not one of " + ", ".join(RESERVED_NAMES))
        if not isinstance(decl, dict) or set(decl) - {"dtype", "shape"} or "shape" not in decl:
            raise SpecError(field, decl, "a mapping {dtype: float32 | int32, shape: [...]}")
        dtype = decl.get("dtype", "float32")
        if dtype not in TENSOR_DTYPES:
            raise SpecError(f"{field}.dtype", dtype, " | ".join(TENSOR_DTYPES))
        shape = decl["shape"]
        ok = isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4 and all(
            d in SHAPE_SYMBOLS if isinstance(d, str) else (isinstance(d, int) and not isinstance(d, bool) and d >= 1)
            for d in shape)
        if not ok:
            raise SpecError(f"{field}.shape", shape, "1 to 4 dims, each one of " + ", ".join(SHAPE_SYMBOLS)
                            + " or a positive int")
        out[name] = {"dtype": dtype, "shape": list(shape)}
    return out


def validate_expression(field: str, expr, tensors: dict | None) -> str | None:
    """Check one user expression (score_mod or mask_mod) by compiling it; SpecError points into it."""
    if expr is None:
        return None
    has_score = field in ("score_mod", "score_mod_grad")
    kind = "a float" if has_score else "a boolean"
    allowed = f"{kind} CUDA expression over " + ", ".join(
        (("score",) if has_score else ()) + INDEX_NAMES + tuple(sorted(tensors or {})))
    if not isinstance(expr, str) or not expr.strip():
        raise SpecError(field, expr, allowed)
    if len(expr) > MAX_EXPRESSION_CHARS or "\n" in expr.strip():
        raise SpecError(field, expr, f"{allowed}, on one line of at most {MAX_EXPRESSION_CHARS} characters")
    bad = _FORBIDDEN.search(expr)
    if bad:
        raise SpecError(field, expr, f"{allowed}; no statements, braces, strings, preprocessor or asm "
                        f"(found {bad.group()!r} at column {bad.start() + 1})")
    errors = _compile_errors(field, expr.strip(), tuple(tensor_decls(tensors)))
    if errors:
        raise SpecError(field, expr, f"{allowed}; NVRTC says:\n{errors}")
    return expr.strip()


@functools.lru_cache(maxsize=128)
def _compile_errors(field: str, expr: str, decls: tuple[TensorDecl, ...]) -> str | None:
    """NVRTC's complaints about the expression, trimmed to the lines that point into it (or None)."""
    from .compile import nvrtc_errors
    from .render import render_piece

    source = render_piece("pieces/expression_probe.cuh.j2", field=field, expr=expr, tensors=decls)
    log = nvrtc_errors(source, f"{field}_probe")
    if log is None:
        return None
    lines = log.splitlines()
    keep, on = [], False
    for line in lines:                         # an error in the expression, its source line and caret
        if line.startswith(f"{field}(") or line.startswith("probe("):
            on = line.startswith(f"{field}(")
        if on and line.strip() and "detected in the compilation" not in line:
            keep.append(line)
    return "\n".join(keep) or log.strip()
