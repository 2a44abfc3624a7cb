"""The kernel signatures (attngen.codegen.signature) against what the templates render and what the launchers'
argument builders give: every kernel of every variant declares exactly the declared parameters, in order,
and the per-call builders produce exactly the names the declarations ask for. No GPU."""

from __future__ import annotations

import re

import numpy as np
import pytest

from attngen.runtime import arguments
from attngen.planner.device import preset
from attngen.runtime.interop import TensorView
from attngen.masks import BlockMask, Causal
from attngen.codegen.modifiers import ActiveModifiers
from attngen.planner.forward import candidates
from attngen.planner.backward import pass_candidates
from attngen.codegen.render import kernel_name, render
from attngen.codegen.signature import (BLOCK_TABLE, KV_MAJOR_LAYOUT, QUERY_MAJOR_LAYOUT, Signature, kernel_signatures,
                               modifier_params)
from attngen.spec import Spec
from attngen.variant import variant_of

SPECS = {
    "dense": dict(head_dim=64),
    "causal_gqa_d128": dict(head_dim=128, causal=True, num_heads=8, num_kv_heads=2),
    "odd_head_dim": dict(head_dim=40, head_dim_v=24),
    "runtime_causal": dict(head_dim=64, mask={"kind": "runtime", "block_size": 64, "element": {"kind": "causal"}}),
    "bigbird_table": dict(head_dim=64, mask={"kind": "bigbird", "window": 3, "global_tokens": [0], "random_blocks": 2,
                                             "block_size": 64, "seed": 0}),
    "window": dict(head_dim=128, mask={"kind": "sliding_window", "left": 256, "right": 0}),
    "softcap_alibi": dict(head_dim=64, softcap=30.0, alibi=True),
    "score_mod_tensors": dict(head_dim=64, score_mod="score * temperature[h]", score_mod_grad="temperature[h]",
                              tensors={"temperature": {"dtype": "float32", "shape": ["heads"]}}),
    "mask_mod": dict(head_dim=64, mask_mod="doc[q_idx] == doc[kv_idx]",
                     tensors={"doc": {"dtype": "int32", "shape": ["seqlen_k"]}}),
    "deterministic": dict(head_dim=64, causal=True, deterministic=True),
    "varlen_causal_gqa": dict(head_dim=128, causal=True, num_heads=8, num_kv_heads=2, layout="varlen"),
    "varlen_window_alibi": dict(head_dim=64, mask={"kind": "sliding_window", "left": 128, "right": 0}, alibi=True,
                                layout="varlen"),
    "varlen_deterministic_odd": dict(head_dim=40, head_dim_v=24, deterministic=True, layout="varlen"),
}


def rendered_params(source: str, name: str) -> list[tuple[str, str]]:
    """(type, name) of each parameter of the __global__ function `name` in source, whitespace normalised."""
    match = re.search(r"__global__ void[^\n]*\n" + re.escape(name) + r"\((.*?)\)\n\{", source, re.S)
    assert match, f"no kernel {name} in the source"
    params = []
    for text in match.group(1).split(","):
        words = " ".join(text.split())
        ctype, _, pname = words.rpartition(" ")
        params.append((ctype.replace(" __restrict__", ""), pname))
    return params


def declared(signature: Signature) -> list[tuple[str, str]]:
    return [(p.ctype, p.name) for p in signature.params]


def forward_plans(spec, arch):
    """The best plan of each forward path the planner has for spec on arch."""
    found = {}
    for c in candidates(spec, preset(arch)):
        if c.plan is not None and c.plan.path not in found:
            found[c.plan.path] = c.plan
    return found.values()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_kernels_declare_their_signatures(name, arch):
    spec = Spec(**SPECS[name])
    variant = variant_of(spec)
    checked = 0
    for plan in forward_plans(spec.forward_spec, arch):
        source = render(spec.forward_spec, plan)
        for kind, signature in kernel_signatures("forward", variant, plan).items():
            assert rendered_params(source, kernel_name(spec.forward_spec, kind)) == declared(signature)
            checked += 1
    for kind in ("dq", "dkdv"):
        paths = {}
        for _, p, _ in pass_candidates(kind, spec, preset(arch)):
            if p is not None:
                paths.setdefault(p.path, p)
        for bwd in paths.values():
            source = render(spec, bwd, f"backward_{kind}")
            for entry, signature in kernel_signatures(f"backward_{kind}", variant, bwd).items():
                assert rendered_params(source, kernel_name(spec, entry)) == declared(signature)
                checked += 1
    assert checked >= 3


QV = TensorView("cupy", 0, (2, 300, 4, 64), (1, 1, 1, 1), "bf16", 0, None)


@pytest.fixture
def fake_uploads(monkeypatch):
    monkeypatch.setattr(arguments.UPLOADS, "pointers",
                        lambda key, owner, make, view, keep: tuple(4096 + 256 * i for i in range(len(make()))))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_argument_builders_give_exactly_the_declared_names(name, fake_uploads, monkeypatch):
    """What the launchers add to their own arguments (modifiers, block table, named tensors, layouts) is
    exactly the tail the signatures declare."""
    spec = Spec(**SPECS[name])
    variant = variant_of(spec)
    tensors = {}
    for t in variant.tensors:
        shape = t.sizes(2, 4, 300, 300)
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        tensors[t.name] = TensorView("cupy", 8192, shape, strides, t.dtype, 0, None)
    monkeypatch.setattr(arguments, "_view", lambda label, x: x)
    values = arguments.modifier_args(spec, variant, 0.125, None, tensors or None, (2, 4, 300, 300), QV, [])
    assert list(values) == [p.name for p in modifier_params(variant)]
    if variant.schedule == "runtime":
        mask = BlockMask.from_pattern(Causal(), 300, 300, block_size=64)
        layout = arguments.layout_args(spec, variant, mask, 300, 300, 4, QV, [])
        assert list(layout) == [p.name for p in QUERY_MAJOR_LAYOUT]
        assert list(arguments.kv_major_layout_args(mask, QV, [])) == [p.name for p in KV_MAJOR_LAYOUT]
    stride_names = list(arguments.stride_args("q", QV))
    assert stride_names == ["q_stride_b", "q_stride_s", "q_stride_h"]


def test_modifier_params_cover_the_chain():
    spec = Spec(head_dim=64, softcap=30.0, alibi=True, mask={"kind": "bigbird", "window": 3, "global_tokens": [0],
                                                                  "random_blocks": 2, "block_size": 64, "seed": 0})
    variant = variant_of(spec)
    names = [p.name for p in modifier_params(variant)]
    assert names == ["softmax_scale", "alibi_slopes", "alibi_batch_stride", *(p.name for p in BLOCK_TABLE)]
    assert [m.name for m in ActiveModifiers(variant)] == ["scale", "softcap", "alibi"]


def test_pack_types_and_refusals():
    signature = Signature(QUERY_MAJOR_LAYOUT[:2] + modifier_params(variant_of(Spec(head_dim=64, alibi=True))))
    packed = signature.pack({"full_row_ptr": 16, "full_cols": 32, "softmax_scale": 0.5, "alibi_slopes": 64,
                             "alibi_batch_stride": 0})
    assert [type(a) for a in packed] == [np.uint64, np.uint64, np.float32, np.uint64, np.int32]
    with pytest.raises(TypeError, match=r"missing \['alibi_batch_stride'\], unexpected \['extra'\]"):
        signature.pack({"full_row_ptr": 16, "full_cols": 32, "softmax_scale": 0.5, "alibi_slopes": 64, "extra": 1})
