"""attngen: an attention-kernel compiler (spec -> plan -> CUDA C -> NVRTC -> launch)."""

from .version import __version__  # noqa: F401
from .planner.device import Device  # noqa: E402
from .errors import CompileError, PlanError, SpecError  # noqa: E402
from .spec import Spec  # noqa: E402
from .masks import BlockMask  # noqa: E402
from .codegen.render import render  # noqa: E402
from .api import (attention, attention_backward, attention_varlen, attention_with_kvcache, build,  # noqa: E402
                  build_backward, build_decode, plan)
from .merge import merge_attention  # noqa: E402

__all__ = ["Spec", "BlockMask", "Device", "plan", "render", "build", "build_backward", "build_decode", "attention", "attention_varlen", "attention_with_kvcache", "attention_backward",
           "merge_attention",
           "SpecError", "PlanError", "CompileError",
           "__version__"]
