"""Source: CUDA C rendered from the Jinja templates in templates/ (StrictUndefined)."""

from __future__ import annotations

from enum import Enum

from ..version import __version__
from .jinja_env import environment, render_piece, templates_dir  # noqa: F401  (the public names of rendering)
from .modifiers import ActiveModifiers
from .signature import kernel_signatures
from ..spec import Spec
from ..planner.decode import prefill_loads
from .fp8 import P_SCALE_LOG2
from ..variant import variant_of

MMA_TYPES = {"bf16": "bf16", "fp16": "f16", "fp8_e4m3": "e4m3"}


class KernelKind(str, Enum):
    """Which kernel: its entry template (the wgmma form where the plan's path is wgmma) and its name's suffix.
    The helpers (delta, dQ conversion, the varlen schedule) have no template of their own: they are rendered beside an entry."""

    FORWARD = "forward"
    BACKWARD_DQ = "backward_dq"
    BACKWARD_DKDV = "backward_dkdv"
    BACKWARD_DELTA = "backward_delta"
    BACKWARD_DQ_CONVERT = "backward_dq_convert"
    VARLEN_SCHEDULE = "varlen_schedule"
    DECODE = "decode"
    KVCACHE_APPEND = "kvcache_append"
    DECODE_COMBINE = "decode_combine"
    PREFILL = "prefill"          # the wgmma forward over a KV cache's pages (chunked prefill)
    FP8_V_TRANSPOSE = "fp8_v_transpose"    # V -> V^T in P's key order, beside the FP8 forward

    @property
    def suffix(self) -> str:
        return {"forward": "fwd", "backward_dq": "bwd_dq", "backward_dkdv": "bwd_dkdv", "backward_delta": "bwd_delta",
                "backward_dq_convert": "bwd_dq_convert", "varlen_schedule": "varlen_schedule", "decode": "decode",
                "kvcache_append": "kvcache_append", "decode_combine": "decode_combine", "prefill": "prefill",
                "fp8_v_transpose": "v_transpose"}[self.value]

    def template(self, path: str) -> str:
        """The entry template of this kind on a kernel path ("mma_sync" | "wgmma")."""
        if self in (KernelKind.BACKWARD_DELTA, KernelKind.BACKWARD_DQ_CONVERT, KernelKind.VARLEN_SCHEDULE,
                    KernelKind.KVCACHE_APPEND, KernelKind.DECODE_COMBINE, KernelKind.FP8_V_TRANSPOSE) or (
                path == "wgmma" and self in (KernelKind.BACKWARD_DQ, KernelKind.DECODE)):
            raise ValueError(f"{self.value}: no entry template on the {path} path")
        if self is KernelKind.PREFILL:
            if path != "wgmma":
                raise ValueError(f"{self.value}: no entry template on the {path} path")
            return "forward_wgmma.cu.j2"
        return f"{self.value}_wgmma.cu.j2" if path == "wgmma" else f"{self.value}.cu.j2"


def kernel_name(spec: Spec, kind: str = "forward") -> str:
    return f"{spec.name}_{KernelKind(kind).suffix}"


def render(spec: Spec, plan, kind: str = "forward") -> str:
    """The CUDA C source of one kernel (forward: a Plan; backward_dq / backward_dkdv: that BackwardPass of
    a BackwardPlan; decode: a DecodePlan); a pure function of (spec, plan)."""
    template = environment().get_template(KernelKind(kind).template(plan.path))
    spec_items = [(k, v) for k, v in spec.to_dict().items()
                  if v is not None and v is not False and (k, v) != ("layout", "batch")]
    plan_items = list(plan.to_dict().items())
    plan_items = [(k, f"{v:.4g}" if isinstance(v, float) else v) for k, v in plan_items]
    variant = variant_of(spec)
    return template.render(spec=spec, plan=plan, version=__version__, kernel_name=kernel_name(spec, kind),
                           signatures=kernel_signatures(kind, variant, plan), mods=ActiveModifiers(variant),
                           score_grad=kind not in ("forward", "decode", "prefill"),
                           mma_type=MMA_TYPES[spec.dtype], out_type=MMA_TYPES[spec.out_dtype],
                           p_scale_log2=P_SCALE_LOG2 if spec.fp8 else 0, spec_items=spec_items, plan_items=plan_items,
                           variant=variant, tensors=variant.tensors, score_mod=variant.score_mod,
                           mask_mod=variant.mask_mod, score_mod_grad=variant.score_mod_grad if kind not in ("forward", "decode", "prefill") else None,
                           probe=False, bwd=plan,
                           delta_kernel_name=kernel_name(spec, "backward_delta"),
                           dq_convert_kernel_name=kernel_name(spec, "backward_dq_convert"),
                           varlen_schedule_kernel_name=kernel_name(spec, "varlen_schedule"),
                           append_kernel_name=kernel_name(spec, "kvcache_append"),
                           combine_kernel_name=kernel_name(spec, "decode_combine"),
                           v_transpose_kernel_name=kernel_name(spec, "fp8_v_transpose"),
                           prefill=prefill_loads(spec.page_size, plan.block_n) if kind == "prefill" else None)
