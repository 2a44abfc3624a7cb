"""Source: CUDA C rendered from the Jinja templates in templates/ (StrictUndefined)."""

from __future__ import annotations

from ..version import __version__
from .jinja_env import environment, render_piece, templates_dir  # noqa: F401  (the public names of rendering)
from .modifiers import ActiveModifiers
from .signature import kernel_signatures
from ..spec import Spec
from ..variant import variant_of

ENTRY_TEMPLATES = {"forward": "forward.cu.j2", "backward_dq": "backward_dq.cu.j2", "backward_dkdv": "backward_dkdv.cu.j2",
                   "forward_wgmma": "forward_wgmma.cu.j2", "backward_dkdv_wgmma": "backward_dkdv_wgmma.cu.j2"}
KERNEL_SUFFIXES = {"forward": "fwd", "backward_dq": "bwd_dq", "backward_dkdv": "bwd_dkdv", "backward_delta": "bwd_delta",
                   "backward_dq_convert": "bwd_dq_convert"}
MMA_TYPES = {"bf16": "bf16", "fp16": "f16"}


def kernel_name(spec: Spec, kind: str = "forward") -> str:
    return f"{spec.name}_{KERNEL_SUFFIXES[kind]}"


def render(spec: Spec, plan, kind: str = "forward") -> str:
    """The CUDA C source of one kernel (forward: a Plan; backward_dq / backward_dkdv: that BackwardPass of
    a BackwardPlan); a pure function of (spec, plan)."""
    entry = f"{kind}_wgmma" if plan.path == "wgmma" else kind
    template = environment().get_template(ENTRY_TEMPLATES[entry])
    spec_items = [(k, v) for k, v in spec.to_dict().items() if v is not None and v is not False]
    plan_items = list(plan.to_dict().items())
    plan_items = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in plan_items]
    variant = variant_of(spec)
    return template.render(spec=spec, plan=plan, version=__version__, kernel_name=kernel_name(spec, kind),
                           signatures=kernel_signatures(kind, variant, plan), mods=ActiveModifiers(variant),
                           score_grad=kind != "forward",
                           mma_type=MMA_TYPES[spec.dtype], spec_items=spec_items, plan_items=plan_items,
                           variant=variant, tensors=variant.tensors, score_mod=variant.score_mod,
                           mask_mod=variant.mask_mod, score_mod_grad=variant.score_mod_grad if kind != "forward" else None,
                           probe=False, bwd=plan,
                           delta_kernel_name=kernel_name(spec, "backward_delta"),
                           dq_convert_kernel_name=kernel_name(spec, "backward_dq_convert"))
