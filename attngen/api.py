"""The public entry points: plan, build, attention. They all drive the same pipeline functions."""

from __future__ import annotations

import threading

from . import device as device_mod
from .compile import compile_cached
from .errors import SpecError
from .launch import Kernel, _view
from .plan import Plan, make_plan
from .render import kernel_name, render
from .spec import Spec

_kernels: dict = {}
_kernels_lock = threading.Lock()


def plan(spec: Spec, arch: str | None = None) -> Plan:
    """Choose tiles for `spec` on `arch` (a preset; no GPU needed) or, with arch=None, the current GPU."""
    return make_plan(spec, device_mod.resolve(arch))


def build(spec: Spec, device: int | None = None) -> Kernel:
    """Plan, render and compile `spec` for a live GPU (the current one by default); cached in memory and
    on disk (ATTNGEN_CACHE_DIR)."""
    import cupy

    index = cupy.cuda.runtime.getDevice() if device is None else device
    key = (spec, index)
    with _kernels_lock:
        if key in _kernels:
            return _kernels[key]
    with cupy.cuda.Device(index):
        dev = device_mod.live_device(index)
        chosen = make_plan(spec, dev)
        source = render(spec, chosen)
        name = kernel_name(spec)
        binary, cubin_path = compile_cached(source, spec.name, dev.arch, name)
        kernel = Kernel(spec, chosen, source, binary, cubin_path, name)
    with _kernels_lock:
        return _kernels.setdefault(key, kernel)


def spec_for_inputs(q, k, v, causal: bool) -> Spec:
    """The spec a call needs: head dims and dtype from the inputs; heads and scale stay run-time values."""
    qv, vv = _view("q", q), _view("v", v)
    if len(qv.shape) != 4 or len(vv.shape) != 4:
        raise ValueError(f"q, v: expected 4 dims [batch, seqlen, heads, head_dim], got {qv.shape} and {vv.shape}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected True or False, got {causal!r}")
    try:
        return Spec(head_dim=qv.shape[3], head_dim_v=vv.shape[3], dtype=qv.dtype, causal=causal)
    except SpecError as exc:
        argument = {"head_dim": "q", "head_dim_v": "v", "dtype": "q"}.get(exc.field, exc.field)
        what = {"head_dim": "head_dim (last dim)", "head_dim_v": "head_dim_v (last dim)"}.get(exc.field, exc.field)
        raise (TypeError if exc.field == "dtype" else ValueError)(
            f"{argument}: {what} {exc.value!r} is not supported; allowed: {exc.allowed}") from None


def attention(q, k, v, causal: bool = False, scale: float | None = None, return_lse: bool = False):
    """softmax(scale * q k^T [causal mask]) v, compiled for these inputs on first use and cached.

    q [batch, seqlen_q, heads_q, head_dim], k [batch, seqlen_k, heads_kv, head_dim],
    v [batch, seqlen_k, heads_kv, head_dim_v]; torch CUDA tensors or CuPy arrays, fp16 or bf16.
    Returns out (same library, dtype and device as q), and lse [batch, heads_q, seqlen_q] fp32 if asked."""
    spec = spec_for_inputs(q, k, v, causal)
    kernel = build(spec, _view("q", q).device)
    out, lse = kernel(q, k, v, scale=scale)
    return (out, lse) if return_lse else out
