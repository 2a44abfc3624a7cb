"""User expressions: the spec's ``score_mod`` / ``mask_mod`` and the named tensors they read.

A score_mod is a CUDA float expression over ``score`` (q.k * scale, after softcap and ALiBi), the ints
``b, h, q_idx, kv_idx, seqlen_q, seqlen_k, num_heads, causal_offset`` (the key position query row 0 is
aligned at: seqlen_k - seqlen_q, or as a call's position_offsets shift it) and the named tensors; a mask_mod is a boolean
expression over the same names without ``score``. A score_mod_grad is d(score_mod)/d(score) over the
same names as the score_mod (training needs it). A named tensor is a ``const float*`` or
``const int*`` the caller passes by name (``kernel(q, k, v, tensors={"bias": ...})``); its declared
shape uses the symbols batch, heads (query heads), seqlen_q, seqlen_k or ints, and expressions index it
flat (``bias[h]``, ``doc_id[kv_idx]``, ``w[b * num_heads + h]``).

A spec file is shared and copied, so an expression is untrusted text: it is tokenized and parsed against a
small grammar first (names above, numbers, operators, ``?:``, parentheses, indexing of the declared tensors,
casts to float/int/bool and calls of EXPRESSION_FUNCTIONS; see the grammar below), and anything else is
refused with the token and its column -- it can neither read a file (``#include``, digraph ``%:include``)
nor run code of its own (statements, lambdas, asm, assignments). Then, as a second line, it is compiled with
NVRTC (front end only) inside the same functions the kernel uses, with ``#line`` markers, so a type error
points into the user's expression.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .errors import SpecError

TENSOR_DTYPES = {"float32": "float", "int32": "int"}
SHAPE_SYMBOLS = ("batch", "heads", "seqlen_q", "seqlen_k")
INDEX_NAMES = ("b", "h", "q_idx", "kv_idx", "seqlen_q", "seqlen_k", "num_heads", "causal_offset")
RESERVED_NAMES = INDEX_NAMES + ("score", "ctx", "block_bit", "floor_div")
MAX_EXPRESSION_CHARS = 2000
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")


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
        if (name in EXPRESSION_FUNCTIONS or name in CAST_TYPES + CONSTANTS + ("ModContext",)
                or name in _CXX_KEYWORDS or re.match(r"__|_[A-Z]", name)):
            raise SpecError("tensors", name, "tensor names that are not C++ keywords, reserved names (__x, _X), "
                            "ModContext or a function expressions may call")
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


# ---- the expression grammar ---------------------------------------------------------------------
# A user expression is tokenized and parsed here, before NVRTC sees it, and only this grammar passes:
#   expression  := logical_or [ "?" expression ":" expression ]
#   logical_or  := operand { binary_op operand }      binary_op: || && | ^ & == != < > <= >= << >> + - * / %
#   operand     := { "+" | "-" | "!" | "~" | "(" cast_type ")" } primary
#   primary     := number | true | false | name | tensor "[" expression "]"
#                | function "(" expression { "," expression } ")" | cast_type "(" expression ")"
#                | "(" expression ")"
# name: score (score_mod, score_mod_grad), b, h, q_idx, kv_idx, seqlen_q, seqlen_k, num_heads; tensor: the
# spec's declared tensors (only ever indexed); cast_type: float, int, bool; function: EXPRESSION_FUNCTIONS.
# Numbers are decimal or hex ints (u suffix) and decimal floats (exponent, f suffix). Everything else --
# string and character literals, digraphs (%: <% %> <: :>), trigraphs, '#', braces, ';', assignment,
# ++/--, ',' outside a call's arguments, '.', '->', '::', unary '&'/'*', keywords and every other name --
# is refused with the token and its column. An expression with a refused character or punctuator is never
# handed to NVRTC.
EXPRESSION_FUNCTIONS = {                               # name -> number of arguments
    **dict.fromkeys(("expf", "exp2f", "expm1f", "logf", "log2f", "log10f", "log1pf", "sqrtf", "rsqrtf", "cbrtf",
                     "sinf", "cosf", "tanf", "asinf", "acosf", "atanf", "sinhf", "coshf", "tanhf", "erff",
                     "erfcf", "fabsf", "floorf", "ceilf", "roundf", "truncf", "rintf"), 1),
    **dict.fromkeys(("powf", "fminf", "fmaxf", "fmodf", "atan2f", "copysignf", "hypotf"), 2),
    **dict.fromkeys(("exp", "log", "tanh", "sqrt", "fabs", "floor", "ceil"), 1),   # float overloads
    **dict.fromkeys(("pow", "fmin", "fmax"), 2),
    "abs": 1, "min": 2, "max": 2,                      # int and float overloads
    "floor_div": 2,                                    # int division rounding toward -inf (mod_context)
}
CAST_TYPES = ("float", "int", "bool")
CONSTANTS = ("true", "false")
MAX_NESTING = 32
_ALLOWED_OPERATORS = frozenset("+ - * / % < > <= >= == != && || ! ~ & | ^ << >> ? : ( ) [ ] ,".split())
_BINARY_PRECEDENCE = {"||": 1, "&&": 2, "|": 3, "^": 4, "&": 5, "==": 6, "!=": 6, "<": 7, ">": 7, "<=": 7,
                      ">=": 7, "<<": 8, ">>": 8, "+": 9, "-": 9, "*": 10, "/": 10, "%": 10}
# Every C++ punctuator, longest first (the lexer takes the longest match, as C++'s does), digraphs included.
_PUNCTUATORS = sorted(("%:%:", "...", "<=>", "<<=", ">>=", "->*", "::", "->", ".*", "++", "--", "<<", ">>", "<=",
                       ">=", "==", "!=", "&&", "||", "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "##", "<:",
                       ":>", "<%", "%>", "%:", *"{}[]();:?.+-*/%^&|~!=<>,#"), key=len, reverse=True)
_DIGRAPHS = {"<:": "[", ":>": "]", "<%": "{", "%>": "}", "%:": "#", "%:%:": "##"}
_TRIGRAPHS = {"??=": "#", "??/": "\\", "??'": "^", "??(": "[", "??)": "]", "??!": "|", "??<": "{", "??>": "}",
              "??-": "~"}
_PP_NUMBER = re.compile(r"\.?[0-9](?:[eEpP][+-]|'[A-Za-z0-9_]|[A-Za-z0-9_.])*")
_NUMBER = re.compile(r"(?:0|[1-9][0-9]*|0[xX][0-9a-fA-F]+)[uU]?|(?:(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
                     r"|[0-9]+[eE][+-]?[0-9]+)[fF]?")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CXX_KEYWORDS = frozenset((
    "alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t char32_t class "
    "compl concept const consteval constexpr constinit const_cast continue co_await co_return co_yield decltype "
    "default delete do double dynamic_cast else enum explicit export extern false float for friend goto if inline "
    "int long mutable namespace new noexcept not not_eq nullptr operator or or_eq private protected public register "
    "reinterpret_cast requires restrict return short signed sizeof static static_assert static_cast struct switch "
    "template this thread_local throw true try typedef typeid typename union unsigned using virtual void volatile "
    "wchar_t while xor xor_eq _Pragma").split())


@dataclass(frozen=True)
class _Token:
    kind: str          # "number" | "name" | "op" | "end" | "bad"
    text: str
    pos: int           # 0-based offset into the (stripped) expression
    why: str = ""      # for "bad": why it is refused


class _Refused(Exception):
    """The expression leaves the grammar at token ``token``; ``lexical`` when it holds a refused character
    or punctuator (then it is never compiled)."""

    def __init__(self, token: _Token, why: str, lexical: bool):
        super().__init__(why)
        self.token, self.why, self.lexical = token, why, lexical


def _tokens(text: str) -> list[_Token]:
    """C++'s tokens of ``text`` (maximal munch); refused characters and punctuators come back as kind "bad"."""
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c in " \t":
            i += 1
            continue
        m = _PP_NUMBER.match(text, i)
        if m:
            ok = _NUMBER.fullmatch(m.group())
            out.append(_Token("number" if ok else "bad", m.group(), i, "" if ok else
                              "not a number attngen accepts (ints like 7 or 0x1f, floats like 0.5f or 1e-3f)"))
            i = m.end()
            continue
        m = _NAME.match(text, i)
        if m:
            if text[m.end():m.end() + 1] in ("'", '"'):         # u8"..", L'x', R"(..)": a literal's prefix
                out.append(_Token("bad", text[i:m.end() + 1], i, "string and character literals are not allowed"))
                i = m.end() + 1
                continue
            out.append(_Token("name", m.group(), i))
            i = m.end()
            continue
        trigraph = text[i:i + 3]
        if trigraph in _TRIGRAPHS:
            out.append(_Token("bad", trigraph, i, f"a trigraph (C++ may read it as {_TRIGRAPHS[trigraph]!r})"))
            i += 3
            continue
        if text.startswith("<::", i) and text[i + 3:i + 4] not in (":", ">"):
            op = "<"                                            # C++11: '<::' is '<' '::' here
        else:
            op = next((p for p in _PUNCTUATORS if text.startswith(p, i)), None)
        if op is None:
            if c in "\"'":
                why = "string and character literals are not allowed"
            elif c == "\\":
                why = "backslashes (escapes, line splices, universal character names) are not allowed"
            else:
                why = "not a character an expression may contain"
            out.append(_Token("bad", c, i, why))
            i += 1
            continue
        if op in _ALLOWED_OPERATORS:
            out.append(_Token("op", op, i))
        else:
            out.append(_Token("bad", op, i, _punctuator_refusal(op)))
        i += len(op)
    out.append(_Token("end", "", len(text)))
    return out


def _punctuator_refusal(op: str) -> str:
    if op in _DIGRAPHS:
        return f"a digraph (C++ reads it as {_DIGRAPHS[op]!r})"
    if op.endswith("=") and op not in ("==", "!=", "<=", ">=") or op in ("++", "--"):
        return "assignment, ++ and -- are not allowed (an expression only reads)"
    if op in (".", "->", ".*", "->*", "::"):
        return "member access and '::' are not allowed"
    if op in (";", "{", "}"):
        return "statements and blocks are not allowed"
    if op in ("#", "##"):
        return "preprocessor directives are not allowed"
    return "not an operator an expression may use"


class _Parser:
    """Recursive descent over the grammar above; raises _Refused at the first token outside it."""

    def __init__(self, tokens: list[_Token], values: frozenset, tensors: frozenset):
        self.tokens, self.values, self.tensors, self.at, self.depth = tokens, values, tensors, 0, 0

    def peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.at + ahead, len(self.tokens) - 1)]

    def take(self) -> _Token:
        token = self.peek()
        self.at += 1
        return token

    def refuse(self, token: _Token, why: str):
        raise _Refused(token, why, lexical=False)

    def expect(self, op: str, why: str) -> None:
        if self.peek().text != op or self.peek().kind != "op":
            self.refuse(self.peek(), "the comma operator is not allowed (',' only separates a function's "
                        "arguments)" if self.peek().text == "," else why)
        self.take()

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            self.refuse(self.peek(), f"nested more than {MAX_NESTING} deep")

    def whole(self) -> None:
        self.expression()
        if self.peek().kind != "end":
            self.refuse(self.peek(), "the comma operator is not allowed (',' only separates a function's "
                        "arguments)" if self.peek().text == "," else "expected an operator or the end of the "
                        "expression here")

    def expression(self) -> None:
        self.nest()
        self.binary(1)
        if self.peek().text == "?" and self.peek().kind == "op":
            self.take()
            self.expression()
            self.expect(":", "expected ':' of the '?:'")
            self.expression()
        self.depth -= 1

    def binary(self, lowest: int) -> None:
        self.operand()
        while self.peek().kind == "op" and _BINARY_PRECEDENCE.get(self.peek().text, 0) >= lowest:
            self.binary(_BINARY_PRECEDENCE[self.take().text] + 1)

    def operand(self) -> None:
        prefixes = 0
        while True:
            token = self.peek()
            if token.kind == "op" and token.text in ("+", "-", "!", "~"):
                self.take()
            elif (token.kind == "op" and token.text == "(" and self.peek(1).text in CAST_TYPES
                  and self.peek(2).text == ")"):
                self.at += 3
            elif token.kind == "op" and token.text in ("&", "*"):
                self.refuse(token, "address-of and dereference are not allowed (index a named tensor instead)")
            else:
                break
            prefixes += 1
            if prefixes > MAX_NESTING:
                self.refuse(token, f"more than {MAX_NESTING} prefix operators in a row")
        self.primary()

    def primary(self) -> None:
        token = self.take()
        if token.kind == "number" or token.text in CONSTANTS:
            pass
        elif token.kind == "name" and token.text in self.values:
            pass
        elif token.kind == "name" and token.text in self.tensors:
            self.expect("[", f"the named tensor {token.text!r} is read by indexing it: {token.text}[...]")
            self.expression()
            self.expect("]", "expected ']'")
        elif token.kind == "name" and (token.text in EXPRESSION_FUNCTIONS or token.text in CAST_TYPES):
            self.expect("(", f"casts are written ({token.text})x or {token.text}(x)" if token.text in CAST_TYPES
                        else f"{token.text!r} is a function: {token.text}(...)")
            arity, given = EXPRESSION_FUNCTIONS.get(token.text, 1), 1
            self.expression()
            while self.peek().text == "," and self.peek().kind == "op":
                self.take()
                self.expression()
                given += 1
            self.expect(")", "expected ')' or ','" if given < arity else "expected ')'")
            if given != arity:
                self.refuse(token, f"{token.text} takes {arity} argument{'s' * (arity > 1)}, not {given}")
        elif token.kind == "op" and token.text == "(":
            self.expression()
            self.expect(")", "expected ')'")
        elif token.kind == "end":
            self.refuse(token, "the expression ends where an operand is expected")
        else:
            self.refuse(token, "expected a name, a number, a function call or '(' here")
        following = self.peek()
        if following.kind == "op" and following.text in ("(", "["):
            self.refuse(following, "only declared tensors are indexed and only the listed functions are called")


def _name_refusal(name: str, values: frozenset, tensors: frozenset) -> str | None:
    """Why a name may not appear in this field's expression (None: it may)."""
    if name in values or name in tensors or name in EXPRESSION_FUNCTIONS or name in CAST_TYPES or name in CONSTANTS:
        return None
    if name == "score":
        return "score is only for score_mod and score_mod_grad"
    if name in _CXX_KEYWORDS or name.startswith("__"):
        return "C++ keywords and reserved names are not allowed"
    return ("not a name this expression may use (" + ", ".join(sorted(values) + sorted(tensors))
            + ", a function of the documented list, float/int/bool casts, true, false)")


def check_expression_grammar(field: str, text: str, tensors) -> None:
    """Raise _Refused unless ``text`` is in the grammar above for this field (score_mod, score_mod_grad or
    mask_mod) with these declared tensor names. The first offending token by position is reported."""
    values = frozenset(INDEX_NAMES + (("score",) if field in ("score_mod", "score_mod_grad") else ()))
    tensors = frozenset(tensors or ())
    tokens = _tokens(text)
    bad = next((t for t in tokens if t.kind == "bad"), None)
    unknown = next((t for t in tokens if t.kind == "name" and _name_refusal(t.text, values, tensors)), None)
    culprit = min((t for t in (bad, unknown) if t is not None), key=lambda t: t.pos, default=None)
    if culprit is not None:
        why = culprit.why if culprit.kind == "bad" else _name_refusal(culprit.text, values, tensors)
        raise _Refused(culprit, why, lexical=bad is not None)
    try:
        _Parser(tokens, values, tensors).whole()
    except RecursionError:
        raise _Refused(tokens[0], "nested too deeply", lexical=False) from None


def _pointer(text: str, token: _Token) -> str:
    """The expression and a caret under the token (tabs kept so the caret lines up)."""
    lead = "".join(c if c == "\t" else " " for c in text[:token.pos])
    return f"    {text}\n    {lead}^"


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
    text = expr.strip()
    try:
        check_expression_grammar(field, text, tensors)
    except _Refused as refused:
        token = refused.token
        shown = "the end of the expression" if token.kind == "end" else repr(token.text)
        message = f"{allowed}; found {shown} at column {token.pos + 1}: {refused.why}\n{_pointer(text, token)}"
        if not refused.lexical:        # only names, numbers and operators: NVRTC's view is safe to add
            errors = _compile_errors(field, text, tuple(tensor_decls(tensors)))
            message += f"\nNVRTC says:\n{errors}" if errors else ""
        raise SpecError(field, expr, message) from None
    errors = _compile_errors(field, text, tuple(tensor_decls(tensors)))
    if errors:
        raise SpecError(field, expr, f"{allowed}; NVRTC says:\n{errors}")
    return expr.strip()


@functools.lru_cache(maxsize=128)
def _compile_errors(field: str, expr: str, decls: tuple[TensorDecl, ...]) -> str | None:
    """NVRTC's complaints about the expression, trimmed to the lines that point into it (or None)."""
    from .codegen.compile import nvrtc_errors
    from .codegen.jinja_env import render_piece
    from .codegen.modifiers import ActiveModifiers

    source = render_piece("pieces/expression_probe.cuh.j2", field=field, expr=expr, tensors=decls,
                          mods=ActiveModifiers())
    log = nvrtc_errors(source, f"{field}_probe")
    if log is None:
        return None
    blocks, on = {field: [], "probe": []}, None
    for line in log.splitlines():              # an error in the expression, its source line and caret
        header = re.match(r"(\S[^(]*)\((\d+)\): ", line)
        if header:                             # a diagnostic of any other file is never shown
            on = header.group(1) if header.group(1) in blocks else None
        if on and line.strip() and "detected in the compilation" not in line:
            blocks[on].append(line)
    return "\n".join(blocks[field] or blocks["probe"]) or "NVRTC rejected it (no message points into it)"
