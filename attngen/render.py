"""Source: CUDA C rendered from the Jinja templates in templates/ (StrictUndefined)."""

from __future__ import annotations

import functools
import hashlib
import types
from pathlib import Path

import jinja2

from . import __version__
from .spec import Spec
from .variant import variant_of

ENTRY_TEMPLATES = {"forward": "forward.cu.j2", "backward_dq": "backward_dq.cu.j2", "backward_dkdv": "backward_dkdv.cu.j2",
                   "forward_wgmma": "forward_wgmma.cu.j2", "backward_dkdv_wgmma": "backward_dkdv_wgmma.cu.j2"}
KERNEL_SUFFIXES = {"forward": "fwd", "backward_dq": "bwd_dq", "backward_dkdv": "bwd_dkdv", "backward_delta": "bwd_delta",
                   "backward_dq_convert": "bwd_dq_convert"}
MMA_TYPES = {"bf16": "bf16", "fp16": "f16"}


def templates_dir() -> Path:
    """templates/ beside the package in a source tree; attngen/templates inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "templates", here / "templates"):
        if (candidate / ENTRY_TEMPLATES["forward"]).is_file():
            return candidate
    raise FileNotFoundError(f"attngen templates not found next to {here}")


class CheckedBytecodeCache(jinja2.BytecodeCache):
    """Jinja's compiled templates on disk, each file headed by the sha256 of the rest. A damaged file
    (truncated, garbage, another template's) is a miss: Jinja parses the template again and the entry
    is rewritten. A folder that cannot be written turns the cache off for this process, with one warning."""

    def __init__(self, folder: Path, root: Path):
        self.folder, self.root, self.writable = folder, root, True

    def _path(self, bucket) -> Path:
        return self.folder / f"{bucket.key}.jinja"

    def load_bytecode(self, bucket) -> None:
        try:
            data = self._path(bucket).read_bytes()
        except OSError:
            return
        digest, payload = data[:32], data[32:]
        if len(data) <= 32 or hashlib.sha256(payload).digest() != digest:
            return
        try:
            bucket.bytecode_from_string(payload)     # checks Jinja's magic and the template's checksum
        except Exception:                            # pickle/marshal errors of any kind: a miss
            bucket.reset()
        if not isinstance(bucket.code, types.CodeType):
            bucket.reset()

    def dump_bytecode(self, bucket) -> None:
        from .compile import atomic_write, warn_unwritable

        if not self.writable:
            return
        payload = bucket.bytecode_to_string()
        try:
            atomic_write(self._path(bucket), hashlib.sha256(payload).digest() + payload)
        except OSError as exc:
            self.writable = False
            warn_unwritable(self.root, exc, "templates are parsed without a bytecode cache")


def _bytecode_cache() -> CheckedBytecodeCache | None:
    from .compile import cache_dir, warn_unwritable

    root = cache_dir()
    try:
        return CheckedBytecodeCache(_ensure(root / "templates"), root)
    except OSError as exc:
        warn_unwritable(root, exc, "templates are parsed without a bytecode cache")
        return None


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        # compiled templates persist beside the kernels: a warm start skips Jinja's parser (~tens of ms)
        bytecode_cache=_bytecode_cache(),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
                           mma_type=MMA_TYPES[spec.dtype], spec_items=spec_items, plan_items=plan_items,
                           variant=variant, tensors=variant.tensors, score_mod=variant.score_mod,
                           mask_mod=variant.mask_mod, score_mod_grad=variant.score_mod_grad if kind != "forward" else None,
                           probe=False, bwd=plan,
                           delta_kernel_name=kernel_name(spec, "backward_delta"),
                           dq_convert_kernel_name=kernel_name(spec, "backward_dq_convert"))


def render_piece(name: str, **context) -> str:
    """One piece of templates/ on its own (the expression probe)."""
    return environment().get_template(name).render(**context)
