"""The Jinja environment over templates/ (StrictUndefined) and its bytecode cache: what renders any
template, below the spec (the expression probe renders a piece while a Spec is validated)."""

from __future__ import annotations

import functools
import hashlib
import types
from pathlib import Path

import jinja2

ENTRY_CHECK = "forward.cu.j2"     # a template every templates/ folder has


def templates_dir() -> Path:
    """templates/ beside the package in a source tree; attngen/templates inside an installed wheel."""
    package = Path(__file__).resolve().parent.parent         # attngen/ (this file is attngen/codegen/)
    for candidate in (package.parent / "templates", package / "templates"):
        if (candidate / ENTRY_CHECK).is_file():
            return candidate
    raise FileNotFoundError(f"attngen templates not found next to {package}")


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


def render_piece(name: str, **context) -> str:
    """One piece of templates/ on its own (the expression probe)."""
    return environment().get_template(name).render(**context)
