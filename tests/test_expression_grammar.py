"""CPU tests of the expression grammar (issue 12, finding 8): a spec's score_mod / mask_mod /
score_mod_grad is untrusted text, so it is tokenized and parsed before NVRTC sees it. Anything outside the
grammar -- digraphs and trigraphs that spell '#', '{' and '}', literals, statements, assignments, the comma
operator, member access, keywords, calls of anything but the documented math functions, indexing of
anything but a declared tensor -- is refused with the field, the token and its column, and a refused
character never reaches the compiler (so no file can be included and echoed back)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attngen.codegen.compile
from attngen import Spec, SpecError
from attngen import masks
from attngen.expressions import EXPRESSION_FUNCTIONS, _tokens

BIAS = {"bias": {"dtype": "float32", "shape": ["heads"]}}
DOC = {"doc": {"dtype": "int32", "shape": ["seqlen_k"]}}
SECRET = "ATTNGEN_SECRET_FIRST_LINE_7f3a"


@pytest.fixture()
def secret_file(tmp_path) -> Path:
    """A file whose text must never reach a kernel or an error message: a marker line and a kernel of its own."""
    path = tmp_path / "secret.cuh"
    path.write_text(f"{SECRET}\n__global__ void intruder() {{ asm volatile(\"trap;\"); }}\n")
    return path


def refusal(field: str, expr: str, tensors=None) -> SpecError:
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, **{field: expr}, tensors=tensors)
    assert info.value.field == field
    return info.value


def assert_points_at(err: SpecError, expr: str, token: str, column: int) -> None:
    """The message names the token and its column and puts a caret under it in the user's expression."""
    msg = str(err)
    assert f"found {token!r} at column {column}:" in msg, msg
    lines = msg.splitlines()
    at = next(i for i, line in enumerate(lines) if line == "    " + expr.strip())
    assert lines[at + 1] == "    " + " " * (column - 1) + "^", msg
    assert expr.strip()[column - 1:].startswith(token)


# field, expression, the token named, its column, tensors; each compiled (or compiled with a foreign file) today
EXPLOITS = [
    ("mask_mod", "%:include </etc/hostname>", "%:", 1, None),                          # digraph '#'
    ("mask_mod", "%:%: q_idx", "%:%:", 1, None),                                       # digraph '##'
    ("score_mod", "([&]() <% while (kv_idx >= 0) <% %> %>(), score)", "<%", 8, None),  # digraph braces: a loop
    ("score_mod", "[&]() <% return score; %>()", "<%", 7, None),                       # a lambda
    ("score_mod", "bias<:h:>", "<:", 5, BIAS),                                          # digraph '['
    ("score_mod", "(const_cast<float*>(bias)[0] = 1.0f, score)", "const_cast", 2, BIAS),  # writes a tensor
    ("score_mod", "reinterpret_cast<const float*>(bias)[h]", "reinterpret_cast", 1, BIAS),
    ("score_mod", "static_cast<float>(q_idx)", "static_cast", 1, None),
    ("mask_mod", "??=include </etc/hostname>", "??=", 1, None),                        # trigraph '#'
    ("mask_mod", "q_idx ??' kv_idx", "??'", 7, None),
    ("mask_mod", "#include </etc/hostname>", "#", 1, None),
    ("score_mod", 'score + "abc"[0]', '"', 9, None),                                   # string literal
    ("score_mod", "score + 'a'", "'", 9, None),                                        # character literal
    ("score_mod", 'score + L"x"[0]', 'L"', 9, None),                                   # prefixed literal
    ("mask_mod", "kv_idx = q_idx", "=", 8, None),                                      # assignment
    ("score_mod", "(score += 1.0f)", "+=", 8, None),
    ("mask_mod", "kv_idx++ < q_idx", "++", 7, None),
    ("mask_mod", "--kv_idx < q_idx", "--", 1, None),
    ("score_mod", "(score, score)", ",", 7, None),                                     # comma operator
    ("score_mod", "bias[h, 0]", ",", 7, BIAS),
    ("score_mod", 'asm("trap;")', "asm", 1, None),
    ("score_mod", 'score + __asm__("trap;")', "__asm__", 9, None),
    ("score_mod", "b.x + score", ".", 2, None),                                        # member access
    ("score_mod", "ctx.b + score", "ctx", 1, None),
    ("score_mod", "bias->x", "->", 5, BIAS),
    ("score_mod", "::expf(score)", "::", 1, None),
    ("mask_mod", 'printf("%d", q_idx) > 0', "printf", 1, None),                        # an unknown function
    ("mask_mod", "clock64() > 0", "clock64", 1, None),
    ("mask_mod", "atomicAdd(&kv_idx, 1) > 0", "atomicAdd", 1, None),
    ("score_mod", "bias(h)", "(", 5, BIAS),                                            # a tensor called
    ("score_mod", "score + h[bias]", "[", 10, BIAS),                                   # only tensors are indexed
    ("score_mod", "score + bias", "end of the expression", 13, BIAS),                  # a tensor is indexed
    ("score_mod", "*(&score + 1)", "*", 1, None),                                      # dereference, address-of
    ("score_mod", "score + *bias", "*", 9, BIAS),
    ("mask_mod", "sizeof(q_idx) > 0", "sizeof", 1, None),
    ("mask_mod", "new int > 0", "new", 1, None),
    ("mask_mod", "this != 0", "this", 1, None),
    ("mask_mod", "operator==(q_idx, kv_idx)", "operator", 1, None),
    ("mask_mod", "(my_len < 1)", "my_len", 2, None),                                   # not a documented name
    ("mask_mod", "threadIdx.x == 0", "threadIdx", 1, None),
    ("score_mod", "score + $x", "$", 9, None),
    ("score_mod", "score @ 2", "@", 7, None),
    ("score_mod", "score + `x`", "`", 9, None),
    ("score_mod", "score + \\u0041", "\\", 9, None),
    ("score_mod", "score + \u00e9", "\u00e9", 9, None),
    ("score_mod", "score * 2f", "2f", 9, None),                                        # numbers outside the list
    ("score_mod", "score * 1'000", "1'000", 9, None),
    ("score_mod", "score * 1_km", "1_km", 9, None),
    ("score_mod", "score * 0x1p3", "0x1p3", 9, None),
    ("mask_mod", "score > 0", "score", 1, None),                                       # no score in a mask_mod
    ("mask_mod", "expf(q_idx, kv_idx) > 0", "expf", 1, None),                          # arity
    ("mask_mod", "(float) > 0", ">", 9, None),                                         # a cast of nothing
]


@pytest.mark.parametrize("field,expr,token,column,tensors", EXPLOITS, ids=[e[1] for e in EXPLOITS])
def test_exploits_are_refused_naming_field_token_and_column(field, expr, token, column, tensors):
    err = refusal(field, expr, tensors)
    if token == "end of the expression":
        assert f"found the end of the expression at column {column}:" in str(err)
    else:
        assert_points_at(err, expr, token, column)


# The exploits holding a refused character or punctuator (a digraph, a quote, '=', '.', ...).
LEXICAL = [e for e in EXPLOITS if any(t.kind == "bad" for t in _tokens(e[1]))]


@pytest.mark.parametrize("field,expr,token,column,tensors", LEXICAL, ids=[e[1] for e in LEXICAL])
def test_refused_characters_never_reach_the_compiler(monkeypatch, field, expr, token, column, tensors):
    def compiler(*args, **kwargs):
        raise AssertionError("NVRTC was given an expression with a refused token")
    monkeypatch.setattr(attngen.codegen.compile, "nvrtc_errors", compiler)
    err = refusal(field, expr, tensors)
    assert "NVRTC" not in str(err)


@pytest.mark.parametrize("template", ["%:include <{}>", "%:include \"{}\"", "??=include <{}>", "#include <{}>",
                                      "q_idx > 0 %:include <{}>", "(score, 0) <%%:include <{}>\n%>"])
def test_included_file_is_never_compiled_or_echoed(monkeypatch, secret_file, template):
    seen = []
    real = attngen.codegen.compile.nvrtc_errors
    monkeypatch.setattr(attngen.codegen.compile, "nvrtc_errors", lambda source, name: seen.append(source) or real(source, name))
    expr = template.format(secret_file)
    field = "score_mod" if "score" in expr else "mask_mod"
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, **{field: expr})
    msg = str(info.value)
    assert SECRET not in msg and "intruder" not in msg and "trap" not in msg
    assert not any(str(secret_file) in source for source in seen)     # never handed to NVRTC


# ---- what stays accepted -------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_still_builds_its_spec(path):
    Spec.from_yaml(path)


GOOD = [
    # the expressions of the examples, tests, README and bench
    ("score_mod", "score * temperature[h] - 0.05f * (float)(q_idx - kv_idx)",
     {"temperature": {"dtype": "float32", "shape": ["heads"]}}),
    ("score_mod_grad", "temperature[h]", {"temperature": {"dtype": "float32", "shape": ["heads"]}}),
    ("mask_mod", "doc_q[q_idx] == doc_kv[kv_idx]", {"doc_q": {"dtype": "int32", "shape": ["seqlen_q"]},
                                                    "doc_kv": {"dtype": "int32", "shape": ["seqlen_k"]}}),
    ("score_mod", "score + bias[h]", BIAS),
    ("score_mod", "score * 2.0f", None),
    ("score_mod", "score * gain[h] + 0.01f * (q_idx - kv_idx)", {"gain": {"dtype": "float32", "shape": ["heads"]}}),
    ("score_mod", "score * gain[h] + bias[b * num_heads + h] * (kv_idx % 7 == 0 ? 1.0f : 0.0f)",
     {"gain": {"dtype": "float32", "shape": ["heads"]}, "bias": {"dtype": "float32", "shape": ["batch", "heads"]}}),
    ("score_mod", "score - fabsf(bias[b * num_heads + h]) * (q_idx - kv_idx)",
     {"bias": {"dtype": "float32", "shape": ["batch", "heads"]}}),
    ("mask_mod", "doc[q_idx] == doc[kv_idx]", DOC),
    ("mask_mod", "doc[q_idx] >= 0 && doc[q_idx] == doc[kv_idx]", DOC),
    ("mask_mod", "(q_idx / 7) % 2 == (kv_idx / 7) % 2", None),
    ("mask_mod", "kv_idx % 3 != 0", None),
    ("mask_mod", "kv_idx <= q_idx && q_idx - kv_idx <= 1024", None),
    ("mask_mod", "kv_idx >= q_idx + seqlen_k - seqlen_q - 128 && kv_idx <= q_idx + seqlen_k - seqlen_q", None),
    ("mask_mod", "(kv_idx <= q_idx + seqlen_k - seqlen_q) && (q_idx + seqlen_k - seqlen_q - kv_idx <= 128)", None),
    # the rest of the grammar
    ("score_mod", "h < num_heads / 2 ? -score : +score * .5f + 1e-3f - 2.5e+2 * 0x10 + 7u", None),
    ("score_mod", "float(h) * (int)score + (bool)(kv_idx & 1) - (~q_idx ^ (kv_idx | 3) << 2 >> 1)", None),
    ("mask_mod", "!(q_idx < kv_idx) || true && !false", None),
    ("mask_mod", "floor_div(q_idx - 5 * seqlen_q, 64) <= kv_idx / 64 && abs(q_idx - kv_idx) < 9", None),
    ("score_mod", "min(score, 30.0f) + max(fminf(score, 1.0f), fmaxf(score, -1.0f)) + tanhf(score / 30.0f)", None),
    ("score_mod", "q_idx >= kv_idx ? (kv_idx > 3 ? score : 0.0f) : -score", None),
    ("mask_mod", "doc[doc[q_idx] + 1] != doc[min(kv_idx, seqlen_k - 1)]", DOC),
]


@pytest.mark.parametrize("field,expr,tensors", GOOD, ids=[g[1] for g in GOOD])
def test_good_expressions_are_accepted(field, expr, tensors):
    if field == "score_mod_grad":
        spec = Spec(head_dim=64, score_mod="score * temperature[h]", score_mod_grad=expr, tensors=tensors)
    else:
        spec = Spec(head_dim=64, **{field: expr}, tensors=tensors)
    assert getattr(spec, field) == expr


@pytest.mark.parametrize("name,arity", sorted(EXPRESSION_FUNCTIONS.items()))
def test_every_documented_function_compiles(name, arity):
    if name == "floor_div":
        Spec(head_dim=64, mask_mod="floor_div(q_idx - 100, 7) <= kv_idx")
    else:
        args = ", ".join(["score"] + ["0.5f"] * (arity - 1))
        Spec(head_dim=64, score_mod=f"score + (float)({name}({args}))")


def test_documented_functions_are_in_the_readme():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("calls of these functions only"):]
    words = " " + " ".join(section.replace("`", " ").replace("(", " ").replace(",", " ").split()) + " "
    for name in EXPRESSION_FUNCTIONS:
        assert f" {name} " in words, name


PATTERNS = [masks.Causal(), masks.SlidingWindow(128, 0), masks.SlidingWindow(64, 16), masks.Longformer(64, (0, 5, 6, 7)),
            masks.Strided(16), masks.Fixed(16, 2), masks.Dilated(32, 2), masks.Document((100, 50, 30)),
            masks.BigBird(64, (0, 1), 0, 64), masks.And((masks.Causal(), masks.Strided(8))),
            masks.Or((masks.SlidingWindow(10), masks.Document((5, 6))))]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
def test_closed_form_pattern_predicates_are_valid_mask_mods(pattern):
    """A pattern's predicate is a valid mask_mod, except where it calls a helper the kernel defines beside
    it (the documents' table searches, masks.cuda_helpers): those name exactly their helpers."""
    expr = pattern.cuda_expr()
    helpers = {p.helper_name for p in masks.helper_parts(pattern)}
    if helpers:
        assert set(re.findall(r"document_of_[0-9a-f]{8}", expr)) == helpers
        with pytest.raises(SpecError, match="not a name this expression may use"):
            Spec(head_dim=64, mask_mod=expr)
    else:
        assert Spec(head_dim=64, mask_mod=expr).mask_mod == expr


def test_type_errors_still_come_from_nvrtc():
    err = refusal("score_mod", "score % 2", None)               # in the grammar; C++ has no float %
    assert "NVRTC says" in str(err) and "score_mod(1): error" in str(err)


@pytest.mark.parametrize("name", ["expf", "min", "float", "true", "while", "const_cast", "__x", "_X", "ModContext"])
def test_tensor_names_cannot_shadow_functions_keywords_or_reserved_names(name):
    with pytest.raises(SpecError) as info:
        Spec(head_dim=64, score_mod="score", tensors={name: {"dtype": "float32", "shape": ["heads"]}})
    assert info.value.field == "tensors"


def test_deep_nesting_is_refused_not_a_crash():
    err = refusal("score_mod", "(" * 200 + "score" + ")" * 200, None)
    assert "nested" in str(err)
    err = refusal("score_mod", "- " * 500 + "score", None)
    assert "prefix operators" in str(err)
