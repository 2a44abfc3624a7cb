"""The tuner's store: the winners `attngen tune` measured, per spec, GPU and attngen version, in
<cache>/tuned/<key>.json (atomic writes). The build layer reads it (a remembered winner is compiled first);
the tool that measures is attngen.tools.tune.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .version import __version__
from .codegen.compile import atomic_write, cache_dir
from .spec import Spec


def tuned_path(spec: Spec, gpu_name: str) -> Path:
    key = json.dumps({"spec": spec.to_dict(), "gpu": gpu_name, "version": __version__}, sort_keys=True)
    return cache_dir() / "tuned" / f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def load_tuned(spec: Spec, gpu_name: str) -> dict:
    """The remembered winners {"forward": [block_m, block_n, warps, stages], "backward_dkdv": [block_m,
    block_n, warps, chunk, stages]} for this spec on this GPU, or {} (none, or an unreadable entry)."""
    path = tuned_path(spec, gpu_name)
    try:
        return json.loads(path.read_text())["winners"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def save_tuned(spec: Spec, gpu_name: str, winners: dict, measurements: list) -> Path:
    """Merge winners (and their measurements, by kind) into the spec's entry for this GPU."""
    path = tuned_path(spec, gpu_name)
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    kept = [m for m in old.get("measurements", []) if m.get("kind") not in winners]
    entry = {"spec": spec.to_dict(), "gpu": gpu_name, "version": __version__,
             "winners": old.get("winners", {}) | winners, "measurements": kept + measurements}
    atomic_write(path, (json.dumps(entry, indent=1, sort_keys=True) + "\n").encode())
    return path


def forward_key(plan) -> list:
    return [plan.block_m, plan.block_n, plan.warps, plan.stages, plan.path]


def backward_key(bwd) -> list:
    return [bwd.block_m, bwd.block_n, bwd.warps, bwd.chunk, bwd.stages, bwd.path, bwd.warp_keys]


def tuned_first(ranked: list, winner, key) -> list:
    """The ranked candidates with the remembered winner (if among them) moved to the front."""
    if not winner:
        return ranked
    first = [c for c in ranked if key(c) == list(winner)]
    return first + [c for c in ranked if key(c) != list(winner)]
