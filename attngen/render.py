"""Source: CUDA C rendered from the Jinja templates in templates/ (StrictUndefined)."""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2

from . import __version__
from .plan import Plan
from .spec import Spec

ENTRY_TEMPLATES = {"forward": "forward.cu.j2"}
MMA_TYPES = {"bf16": "bf16", "fp16": "f16"}


def templates_dir() -> Path:
    """templates/ beside the package in a source tree; attngen/templates inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "templates"):
        if (candidate / ENTRY_TEMPLATES["forward"]).is_file():
            return candidate
    raise FileNotFoundError(f"attngen templates not found next to {here}")


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def kernel_name(spec: Spec, kind: str = "forward") -> str:
    return f"{spec.name}_{'fwd' if kind == 'forward' else kind}"


def render(spec: Spec, plan: Plan, kind: str = "forward") -> str:
    """The CUDA C source of one kernel; a pure function of (spec, plan)."""
    template = environment().get_template(ENTRY_TEMPLATES[kind])
    spec_items = [(k, v) for k, v in spec.to_dict().items() if v is not None]
    plan_items = list(plan.to_dict().items())
    plan_items = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in plan_items]
    sparse = getattr(spec, "mask", None) is not None
    mask_expr = "true"
    mask_block = (0, 0)
    if sparse:
        from .masks import kernel_expr

        pattern = spec.mask_pattern
        # A runtime layout has no element predicate: kept blocks are visible inside, apart from the
        # sequence tails, which the kernel masks anyway.
        mask_expr = "true" if pattern is None else kernel_expr(pattern, spec.mask_block_size)
        mask_block = spec.mask_block_size
    return template.render(spec=spec, plan=plan, version=__version__, kernel_name=kernel_name(spec, kind),
                           mma_type=MMA_TYPES[spec.dtype], spec_items=spec_items, plan_items=plan_items,
                           sparse=sparse, mask_expr=mask_expr, mask_block=mask_block)
