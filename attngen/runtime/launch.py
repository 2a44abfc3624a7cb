"""Kernel: a compiled forward kernel as a callable on torch CUDA tensors or CuPy arrays.

Arguments are checked before anything is launched; pointers and strides are read from the inputs
themselves (zero copy), and the launch goes to the caller's current stream (torch's for torch tensors).
"""

from __future__ import annotations

import ctypes
import math
import threading
from typing import NamedTuple

import numpy as np

from ..codegen import render
from ..codegen.compile import Binary
from ..planner.forward import Plan
from ..planner.forward import tile_list_bytes
from ..spec import Spec
from .tma import TensorMapArgument
from .arguments import layout_args, modifier_args, stride_args
from ..codegen.signature import FP8_V_TRANSPOSE, VARLEN_SCHEDULE, forward_signature
from .interop import TensorView, _empty_like, _view  # noqa: F401  (TensorView: the launchers' view of an input)
from .uploads import stream_handle
from .fp8 import DESCALES, TRANSPOSE_THREADS, descale_args, descale_shape, transposed_v, vt_shape
from .varlen import SCHEDULE_THREADS, grid_tiles, packed, schedule_args, schedule_buffer, varlen_sizes
from ..variant import variant_of

ELEMENT_ALIGN = 8   # a vector kernel's cp.async moves 16 bytes = 8 elements: its row starts must be 16-byte
                    # aligned (kernels whose head dims are not multiples of 8 move elements: any row start)


def check_inputs(spec: Spec, q, k, v):
    """Validate q, k, v against the spec and each other; return their views and the problem sizes."""
    return check_views(spec, {name: _view(name, x) for name, x in (("q", q), ("k", k), ("v", v))})


def check_views(spec: Spec, views: dict):
    """check_inputs on the views {"q": ..., "k": ..., "v": ...} of [batch, seqlen, heads, dim] inputs."""
    vector = variant_of(spec).global_vector            # elements per global access: ELEMENT_ALIGN or 1
    kinds = {vw.kind for vw in views.values()}
    if len(kinds) > 1:
        raise TypeError(f"q, k, v: expected one array library, got {sorted(kinds)}")
    for name, vw in views.items():
        check_layout(spec, name, vw, vector)
    devices = {vw.device for vw in views.values()}
    if len(devices) > 1:
        raise ValueError(f"q, k, v: expected one device, got devices {sorted(devices)}")
    qv, kv, vv = views["q"], views["k"], views["v"]
    batch, seqlen_q, heads_q, d = qv.shape
    if d != spec.head_dim:
        raise ValueError(f"q: head_dim {d} differs from the built kernel's head_dim={spec.head_dim}")
    if kv.shape[0] != batch or kv.shape[3] != spec.head_dim:
        raise ValueError(f"k: expected shape [{batch}, seqlen_k, heads_kv, {spec.head_dim}], got {kv.shape}")
    seqlen_k, heads_kv = kv.shape[1], kv.shape[2]
    if vv.shape[:3] != (batch, seqlen_k, heads_kv) or vv.shape[3] != spec.head_dim_v:
        raise ValueError(f"v: expected shape [{batch}, {seqlen_k}, {heads_kv}, {spec.head_dim_v}], got {vv.shape}")
    for name, n in (("q", heads_q), ("k", heads_kv)):
        if n < 1:
            raise ValueError(f"{name}: expected at least 1 head (dim 2), got shape {views[name].shape}")
    if heads_q % heads_kv:
        raise ValueError(f"q/k: heads_q={heads_q} must be a multiple of heads_kv={heads_kv} (GQA/MQA)")
    if spec.num_heads is not None and heads_q != spec.num_heads:
        raise ValueError(f"q: expected num_heads={spec.num_heads} heads (the spec's), got {heads_q}")
    if spec.num_kv_heads is not None and heads_kv != spec.num_kv_heads:
        raise ValueError(f"k: expected num_kv_heads={spec.num_kv_heads} heads (the spec's), got {heads_kv}")
    for name, n in (("q", seqlen_q), ("k", seqlen_k), ("batch", batch)):
        if n < 1 or n >= 2**31 // 2:
            raise ValueError(f"{name}: size {n} out of range 1..2^30")
    return qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv)


def check_layout(spec: Spec, name: str, vw: TensorView, vector: int) -> TensorView:
    """One 4-dim input's dtype, contiguous last dim and row alignment (vector: elements per global access)."""
    if len(vw.shape) != 4:
        raise ValueError(f"{name}: expected 4 dims [batch, seqlen, heads, head_dim], got shape {vw.shape}")
    if vw.dtype != spec.dtype:
        raise TypeError(f"{name}: expected dtype {spec.dtype} (the built kernel's), got {vw.dtype}")
    if vw.strides[-1] != 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {vw.strides}")
    step = 2 * vector // spec.elem_bytes                # elements per aligned access (16 bytes, or 2 at vector 1)
    if any(s % step for s in vw.strides[:-1]) or vw.ptr % (2 * vector):
        raise ValueError(f"{name}: row starts must be {2 * vector}-byte aligned (strides multiples of {step} "
                         f"elements: this kernel's head dims are multiples of {vector}), got strides {vw.strides} "
                         f"at address 0x{vw.ptr:x}")
    return vw


def output_views(spec: Spec, qv: TensorView, out, lse, out_shape: tuple, lse_shape: tuple):
    """(out, lse, their views): the caller's out and lse checked against the shapes (out: the spec's dtype, last
    dim contiguous, rows aligned for the kernel's global accesses; lse: contiguous float32), or new ones made in
    q's library and device. Nothing is launched before this."""
    vector = variant_of(spec).global_vector
    out = _empty_like(qv, out_shape, spec.out_dtype) if out is None else out
    lse = _empty_like(qv, lse_shape, "fp32") if lse is None else lse
    ov, lv = _view("out", out), _view("lse", lse)
    if ov.kind != qv.kind or ov.shape != out_shape or ov.dtype != spec.out_dtype or ov.strides[-1] != 1 \
            or any(s % vector for s in ov.strides[:-1]) or ov.ptr % (2 * vector) or ov.device != qv.device:
        raise ValueError(f"out: expected a {qv.kind} {spec.out_dtype} array of shape {out_shape} on device "
                         f"{qv.device}, last dim contiguous, rows {2 * vector}-byte aligned")
    contiguous = tuple(math.prod(lse_shape[i + 1:]) for i in range(len(lse_shape)))
    if lv.kind != qv.kind or lv.shape != lse_shape or lv.dtype not in ("float32", "torch.float32") \
            or lv.strides != contiguous or lv.device != qv.device:
        raise ValueError(f"lse: expected a contiguous {qv.kind} float32 array of shape {lse_shape} on device {qv.device}")
    return out, lse, ov, lv


def check_varlen_inputs(spec, q, k, v, cu_seqlens_q, cu_seqlens_k):
    """Validate packed q, k, v and their cu_seqlens; return the packed views of q, k, v, the sizes (batch,
    total_q, total_k, heads_q, heads_kv) and the views of cu_seqlens_q, cu_seqlens_k. The offsets' values
    stay on the GPU: the schedule kernel checks them (bad offsets: no tile runs)."""
    views = {name: _view(name, x) for name, x in (("q", q), ("k", k), ("v", v))}
    for name, vw in views.items():
        if len(vw.shape) != 3:
            raise ValueError(f"{name}: expected 3 dims [total_tokens, heads, head_dim] (layout: varlen), "
                             f"got shape {vw.shape}")
    qv, kv, vv = views["q"], views["k"], views["v"]
    if qv.shape[2] != spec.head_dim:
        raise ValueError(f"q: head_dim {qv.shape[2]} differs from the built kernel's head_dim={spec.head_dim}")
    if kv.shape[2] != spec.head_dim:
        raise ValueError(f"k: expected shape [total_k, heads_kv, {spec.head_dim}], got {kv.shape}")
    if vv.shape[:2] != kv.shape[:2] or vv.shape[2] != spec.head_dim_v:
        raise ValueError(f"v: expected shape [{kv.shape[0]}, {kv.shape[1]}, {spec.head_dim_v}], got {vv.shape}")
    cu = {name: _view(name, x) for name, x in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k))}
    for name, cv in cu.items():
        if cv.kind != qv.kind or cv.device != qv.device:
            raise ValueError(f"{name}: expected a {qv.kind} array on device {qv.device} (q's), got a {cv.kind} "
                             f"array on device {cv.device}")
        if cv.dtype not in ("int32", "torch.int32") or len(cv.shape) != 1 or cv.strides != (1,) or cv.shape[0] < 2:
            raise ValueError(f"{name}: expected a contiguous int32 array [batch + 1] (batch >= 1), got "
                             f"{cv.dtype} of shape {list(cv.shape)}")
    if cu["cu_seqlens_q"].shape != cu["cu_seqlens_k"].shape:
        raise ValueError(f"cu_seqlens_q, cu_seqlens_k: expected one length (batch + 1), got "
                         f"{cu['cu_seqlens_q'].shape[0]} and {cu['cu_seqlens_k'].shape[0]}")
    views4 = {name: packed(vw) for name, vw in views.items()}
    qv4, kv4, vv4, (_, total_q, total_k, heads_q, heads_kv) = check_views(spec, views4)
    batch = cu["cu_seqlens_q"].shape[0] - 1
    return qv4, kv4, vv4, (batch, total_q, total_k, heads_q, heads_kv), cu["cu_seqlens_q"], cu["cu_seqlens_k"]


MAX_CAUSAL_OFFSET = 1 << 29   # |seqlen_k - seqlen_q + position_shift|: tile and window arithmetic stays in int32


def check_position_shift(position_shift, seqlen_q: int, seqlen_k: int) -> None:
    """A call's position_shift: an int that keeps the shifted diagonal within MAX_CAUSAL_OFFSET."""
    if isinstance(position_shift, bool) or not isinstance(position_shift, (int, np.integer)):
        raise TypeError(f"position_shift: expected an int, got {type(position_shift).__name__}")
    if abs(seqlen_k - seqlen_q + int(position_shift)) > MAX_CAUSAL_OFFSET:
        raise ValueError(f"position_shift: seqlen_k - seqlen_q + position_shift must lie within +-2^29, got "
                         f"{seqlen_k} - {seqlen_q} + {int(position_shift)}")


def _current_stream(ref: TensorView):
    """The CuPy stream object for the caller's current stream (torch's for torch tensors)."""
    import cupy

    if ref.kind == "torch":
        stream = _torch_stream(ref.device)
        try:                                                             # CuPy >= 14, torch with __cuda_stream__
            return cupy.cuda.Stream.from_external(stream)
        except (AttributeError, TypeError):
            return cupy.cuda.ExternalStream(stream.cuda_stream, ref.device)
    return cupy.cuda.get_current_stream(ref.device)


def _torch_stream(device: int):
    import torch

    return torch.cuda.current_stream(device)


def _on_device(index: int, launch) -> None:
    """launch() with device `index` current in CuPy; the switch (two driver calls) only when another one is."""
    import cupy

    if cupy.cuda.runtime.getDevice() != index:
        with cupy.cuda.Device(index):
            launch()
    else:
        launch()


def _raw_torch_stream(device: int) -> int:
    return stream_handle("torch", device)


def _torch_signature(q, k, v, scale, offsets=()):
    """What fixes a launch for torch inputs (shapes, strides, dtypes, devices, scale; and those of the
    varlen `offsets`), or None for anything else; the pointers are left out."""
    if type(q).__module__ != "torch" or type(k) is not type(q) or type(v) is not type(q) or any(
            type(x) is not type(q) for x in offsets):
        return None
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.get_device(), k.get_device(), v.get_device(), q.is_cuda and k.is_cuda and v.is_cuda, scale, type(scale),
            *((x.shape, x.stride(), x.dtype, x.get_device(), x.is_cuda) for x in offsets))


def _stream_handle(ref: TensorView) -> int:
    """The raw handle of the caller's current stream: torch's for torch tensors, CuPy's for CuPy arrays."""
    return stream_handle(ref.kind, ref.device)


class ArgumentBlock:
    """One launch's arguments in a ctypes block, launched with cuLaunchKernel.

    CuPy's generic launch wraps every argument in a new object on each call (~1 us apiece, ~25 of them).
    A block is built once per input signature (shapes, strides, dtypes, scale) and kept: a later call
    with the same signature only stores its five pointers (q, k, v, out, lse) and launches. A lock keeps
    concurrent callers of one block apart."""

    CTYPES = {np.uint64: ctypes.c_uint64, np.int64: ctypes.c_int64, np.int32: ctypes.c_int32,
              np.float32: ctypes.c_float}

    def __init__(self, handle: int, grid, block, shared_mem: int, args):
        self.handle, self.grid, self.block, self.shared_mem = handle, tuple(grid), tuple(block), shared_mem
        # numpy scalars become ctypes slots; tensor maps (the Hopper path's q, k, v) are their own slots
        self.slots = [a if isinstance(a, TensorMapArgument) else self.CTYPES[type(a)](a.item()) for a in args]
        self.pointers = (ctypes.c_void_p * len(args))(*(
            slot.address if isinstance(slot, TensorMapArgument) else ctypes.addressof(slot) for slot in self.slots))
        self.lock = threading.Lock()

    def launch(self, stream: int, pointers=(), updates=()) -> None:
        """Launch on `stream`, first replacing the leading pointer arguments with `pointers` (a tensor
        map re-encodes itself for its new address) and argument i with v for each (i, v) of `updates`."""
        from cupy.cuda import driver

        with self.lock:
            for slot, value in zip(self.slots, pointers):
                slot.value = value
            for index, value in updates:
                self.slots[index].value = value
            driver.launchKernel(self.handle, *self.grid, *self.block, self.shared_mem, stream,
                                ctypes.addressof(self.pointers), 0)


class Fp8Launch(NamedTuple):
    """A remembered FP8 call: the V transpose and the forward (q, k, V^T maps, o, lse lead; the descale factors
    by index), and the shapes of the per-call V^T and of the ones that stand in for missing factors."""
    transposing: "ArgumentBlock"
    forward: "ArgumentBlock"
    vt_shape: tuple
    descale_shape: tuple


MAX_SIGNATURES = 256        # remembered input signatures (argument blocks) per kernel


def ensure_dynamic_smem(function, smem: int, who: str) -> int:
    """Raise a CuPy function's dynamic shared-memory limit to smem (tile lists grow with the sequence);
    ValueError naming `who` past the GPU's opt-in limit, before anything is launched."""
    import cupy

    if smem > function.max_dynamic_shared_size_bytes:
        limit = cupy.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"]
        if smem > limit:
            raise ValueError(f"{who} {smem} B of shared memory (tile lists), more than this GPU's {limit} B per block")
        function.max_dynamic_shared_size_bytes = smem
    return smem


class Kernel:
    """A compiled forward kernel. Call it as kernel(q, k, v) -> (out, lse)."""

    def __init__(self, spec: Spec, plan: Plan, source: str, binary: Binary, cubin_path, kernel_name: str,
                 fallback=None):
        """fallback: () -> the mma.sync Kernel of the same spec, for inputs a wgmma kernel's tensor maps
        cannot describe (the build layer supplies it; None: such inputs are refused)."""
        import cupy

        self.spec, self.plan, self.source, self.binary, self.kernel_name = spec, plan, source, binary, kernel_name
        self._module = cupy.RawModule(path=str(cubin_path))
        self._function = self._module.get_function(kernel_name)
        self._function.max_dynamic_shared_size_bytes = plan.smem_bytes
        self._handle = self._function.kernel.ptr         # the CUfunction behind CuPy's RawKernel
        self._signatures = {}                             # torch input signature -> ArgumentBlock
        self._untileable = set()                          # input layouts TMA refused (wgmma path: use mma.sync)
        self.variant = variant_of(spec)
        self.signature = forward_signature(self.variant, plan.path == "wgmma")
        # a remembered launch (ArgumentBlock) swaps the first five arguments: the inputs and the outputs
        assert self.signature.names[:5] in (("q", "k", "v", "o", "lse"), ("q_map", "k_map", "v_map", "o", "lse"))
        self._fallback = fallback
        if self.variant.varlen:
            schedule = self._module.get_function(render.kernel_name(spec, render.KernelKind.VARLEN_SCHEDULE))
            self._schedule_handle = schedule.kernel.ptr
            # the arguments a remembered varlen launch swaps besides the leading pointers
            self._info_slot = self.signature.names.index("tile_info")
            self._schedule_slots = [VARLEN_SCHEDULE.names.index(n) for n in ("tile_order", "tile_start", "tile_info")]
            assert VARLEN_SCHEDULE.names[:2] == ("cu_seqlens_q", "cu_seqlens_k")
        if self.variant.fp8:
            transpose = self._module.get_function(render.kernel_name(spec, render.KernelKind.FP8_V_TRANSPOSE))
            self._transpose_handle = transpose.kernel.ptr
            # the arguments a remembered FP8 launch swaps besides the leading pointers
            self._descale_slots = [self.signature.names.index(n) for n in DESCALES]
            assert FP8_V_TRANSPOSE.names[:2] == ("v", "vt")

    @property
    def resources(self):
        return self.binary.resources

    def __repr__(self):
        p = self.plan
        return (f"<attngen.Kernel {self.kernel_name}: {p.block_m}x{p.block_n} tiles, {p.warps} warps, "
                f"{p.stages} stages, {p.smem_bytes} B smem, {self.resources.registers} regs>")

    def __call__(self, q, k, v, *, scale: float | None = None, out=None, lse=None, block_mask=None,
                 alibi_slopes=None, tensors=None, cu_seqlens_q=None, cu_seqlens_k=None, position_shift: int = 0,
                 q_descale=None, k_descale=None, v_descale=None):
        """Return (out, lse). `out` [b, sq, hq, head_dim_v] and `lse` [b, hq, sq] fp32 may be given to write into.
        A `mask: {kind: runtime}` spec takes a BlockMask; an alibi spec may take its slopes ([heads_q] or
        [batch, heads_q] fp32; default: ALiBi's standard slopes); a spec with named tensors takes them
        as tensors={name: array}. A `layout: varlen` spec takes packed q [total_q, hq, d], k, v [total_k, hkv, d]
        with cu_seqlens_q/k (int32 [batch + 1]): out is [total_q, hq, head_dim_v], lse [hq, total_q].
        position_shift: added to the bottom-right alignment of causal, windows and ALiBi (check_position_shift).
        An fp8_e4m3 spec takes q, k, v as float8_e4m3fn and the factors that undo their quantisation
        (runtime/fp8.py, descale_args); its out is bf16. Each call transposes V first into a fresh V^T."""
        varlen, fp8 = self.variant.varlen, self.variant.fp8
        descales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
        if not fp8 and any(x is not None for x in descales.values()):
            raise ValueError(f"{', '.join(DESCALES)}: only for an fp8_e4m3 kernel; this one is {self.spec.dtype}")
        fast = out is None and lse is None and block_mask is None and alibi_slopes is None and tensors is None
        # FP8: which factors are given, and their shapes and strides, fix the launch too (their pointers do not)
        given = tuple(x for x in descales.values() if x is not None)
        # (their types too: True == 1, but the general path refuses a bool scale or shift)
        fixed = (scale, type(scale), position_shift, type(position_shift)) + (
            (tuple(x is None for x in descales.values()),) if fp8 else ())
        signature = _torch_signature(q, k, v, fixed, given) if fast and self._signature_ok else None
        if signature is not None:
            remembered = self._signatures.get(signature)
            if remembered is not None and fp8:
                return self._launch_fp8_again(remembered, q, k, v, descales, scale, position_shift)
            if remembered is not None:
                return self._launch_again(remembered, q, k, v, scale, position_shift)
        if varlen and fast and self._varlen_signature_ok:
            signature = _torch_signature(q, k, v, (scale, position_shift), (cu_seqlens_q, cu_seqlens_k))
            blocks = self._signatures.get(signature) if signature is not None else None
            if blocks is not None:
                return self._launch_varlen_again(blocks, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, position_shift)
        if varlen:
            if cu_seqlens_q is None or cu_seqlens_k is None:
                raise ValueError("cu_seqlens_q, cu_seqlens_k: this kernel's layout is varlen; give both")
            qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv), cu_q, cu_k = check_varlen_inputs(
                self.spec, q, k, v, cu_seqlens_q, cu_seqlens_k)
        else:
            if cu_seqlens_q is not None or cu_seqlens_k is not None:
                raise ValueError("cu_seqlens_q: this kernel was built for the batch layout; build a spec with "
                                 "layout: varlen (attngen.attention_varlen does)")
            qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv) = check_inputs(self.spec, q, k, v)
        scale = self.spec.softmax_scale if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
        check_position_shift(position_shift, seqlen_q, seqlen_k)
        position_shift = int(position_shift)
        keep = []      # per-call device buffers: held until the launch is queued on their stream
        extra_args = {
            **layout_args(self.spec, self.variant, block_mask, seqlen_q, seqlen_k, heads_q, qv, keep),
            **modifier_args(self.spec, self.variant, scale, alibi_slopes, tensors, (batch, heads_q, seqlen_q, seqlen_k),
                            qv, keep),
        }
        # (varlen: seqlen_q and seqlen_k are the total rows; out and lse have no batch dim)
        out_shape = (batch, seqlen_q, heads_q, self.spec.head_dim_v)[varlen:]
        lse_shape = (batch, heads_q, seqlen_q)[varlen:]
        out, lse, ov, lv = output_views(self.spec, qv, out, lse, out_shape, lse_shape)
        if varlen:
            ov = packed(ov)
        p = self.plan
        if varlen:      # CTAs over (head, scheduled tile), heads fastest
            grid = (heads_q * grid_tiles(seqlen_q, batch, p.block_m), 1, 1)
        else:
            grid = (math.ceil(seqlen_q / p.block_m), heads_q, batch)
        if p.path == "wgmma":     # q, k, v reach the kernel as tensor maps (their strides inside)
            descaling = descale_args(qv, descales, batch, heads_kv, keep) if fp8 else {}
            layouts = (qv.shape, qv.strides, kv.shape, kv.strides, vv.shape, vv.strides)
            try:
                if layouts in self._untileable:
                    raise ValueError("known untileable")
                inputs = {
                    "q_map": TensorMapArgument("q", self.spec.dtype, qv.ptr, qv.shape, qv.strides, p.block_m),
                    "k_map": TensorMapArgument("k", self.spec.dtype, kv.ptr, kv.shape, kv.strides, p.block_n)}
                if fp8:          # V^T, transposed below on the kernel's stream
                    transpose_grid, transpose_args, inputs["v_map"] = transposed_v(self.spec, vv, batch, heads_kv,
                                                                                   seqlen_k, keep)
                    inputs.update(descaling)
                else:
                    inputs["v_map"] = TensorMapArgument("v", self.spec.dtype, vv.ptr, vv.shape, vv.strides, p.block_n)
            except ValueError as exc:    # a layout the copy engine cannot address (e.g. a stride-0 expanded K/V)
                if self._fallback is None:
                    raise ValueError(f"q, k, v: the Hopper kernel's copy engine cannot address these layouts ({exc}); "
                                     + ("FP8 runs on it only: give q, k, v whose strides it can address (no "
                                        "stride-0 expansions)" if fp8 else "build the kernel with path='mma_sync'")) from None
                self._untileable.add(layouts)    # later calls skip the encoding attempt
                return self._fallback()(q, k, v, scale=scale, out=out, lse=lse, block_mask=block_mask,
                                        alibi_slopes=alibi_slopes, tensors=tensors, cu_seqlens_q=cu_seqlens_q,
                                        cu_seqlens_k=cu_seqlens_k, position_shift=position_shift)
        else:
            inputs = {"q": qv.ptr, "k": kv.ptr, "v": vv.ptr, **stride_args("q", qv), **stride_args("k", kv),
                      **stride_args("v", vv)}
        sizes = {"seqlen_q": seqlen_q, "seqlen_k": seqlen_k}
        smem = p.smem_bytes + tile_list_bytes(self.spec, p.warps, p.block_n, seqlen_k)
        import cupy

        with cupy.cuda.Device(qv.device):
            if smem > p.smem_bytes:                  # the tile list grows with seqlen_k (varlen: the total)
                ensure_dynamic_smem(self._function, smem, f"k: seqlen_k={seqlen_k} needs")
            if varlen:                               # the schedule, on the stream the kernel reads it on
                capacity = grid[0] // heads_q
                buffers = schedule_buffer(qv, batch, capacity, keep)
                scheduling = ArgumentBlock(self._schedule_handle, (1, 1, 1), (SCHEDULE_THREADS, 1, 1), 0,
                                           VARLEN_SCHEDULE.pack(schedule_args(
                                               cu_q, cu_k, batch, (seqlen_q, seqlen_k), False, p.block_m, True,
                                               self.variant.reverse_query_tiles, capacity, buffers)))
                scheduling.launch(_stream_handle(qv))
                sizes = varlen_sizes(buffers[2], seqlen_q, seqlen_k)
            if fp8:
                transposing = ArgumentBlock(self._transpose_handle, transpose_grid, (TRANSPOSE_THREADS, 1, 1), 0,
                                            transpose_args)
                transposing.launch(_stream_handle(qv))
            args = self.signature.pack({
                **inputs, "o": ov.ptr, "lse": lv.ptr, **stride_args("o", ov), **sizes,
                "heads_q": heads_q, "group_size": heads_q // heads_kv,
                # Modified scores are already in natural units; otherwise the kernel scales raw q.k.
                "scale_log2": (1.0 if self.variant.score_mods else scale) * math.log2(math.e),
                "position_shift": position_shift, **extra_args,
            })
            block = ArgumentBlock(self._handle, grid, (p.threads, 1, 1), smem, args)
            block.launch(_stream_handle(qv))
        if signature is not None:
            if len(self._signatures) >= MAX_SIGNATURES:
                self._signatures.clear()
            block.out_shape, block.lse_shape = out_shape, lse_shape
            if fp8:
                remembered = Fp8Launch(transposing, block, vt_shape(self.spec, batch, heads_kv, seqlen_k),
                                       descale_shape(given))
            else:
                remembered = (scheduling, block, batch, capacity) if varlen else block
            self._signatures[signature] = remembered
        return out, lse

    @property
    def _signature_ok(self) -> bool:
        """Whether a launch is fixed by the input signature alone: no block layout, ALiBi slopes, block
        table, named tensors or varlen schedule, whose device arrays a remembered block would point at."""
        v = self.variant
        return not v.varlen and v.schedule != "runtime" and not v.alibi and not v.block_table and not v.tensors

    @property
    def _varlen_signature_ok(self) -> bool:
        """Whether a varlen launch is fixed by its input signature (with cu_seqlens'): no ALiBi slopes or
        block table (device arrays); cu_seqlens and the schedule buffer are swapped in at each call."""
        v = self.variant
        return not v.alibi and not v.block_table

    def _launch_varlen_again(self, blocks, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, position_shift):
        """A varlen call whose signature was launched before: a fresh schedule buffer and outputs, the new
        pointers swapped into the remembered schedule and kernel launches."""
        import torch

        scheduling, block, batch, capacity = blocks
        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if (pointers[0] | pointers[1] | pointers[2]) % (2 * self.variant.global_vector):
            self._signatures.clear()                      # the general path explains the misalignment
            return self(q, k, v, scale=scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                        position_shift=position_shift)
        device = q.device
        out = torch.empty(block.out_shape, dtype=q.dtype, device=device)
        lse = torch.empty(block.lse_shape, dtype=torch.float32, device=device)
        schedule = torch.empty(8 * capacity + 2 * batch + 1, dtype=torch.int32, device=device)   # held to the launch
        info = schedule.data_ptr()
        order = info + 32 * capacity                      # as schedule_buffer lays them out
        start = order + 4 * batch
        cu = (cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr())
        index = q.get_device()
        import cupy

        with cupy.cuda.Device(index):
            stream = _raw_torch_stream(index)
            scheduling.launch(stream, cu, tuple(zip(self._schedule_slots, (order, start, info))))
            block.launch(stream, (*pointers, out.data_ptr(), lse.data_ptr()), ((self._info_slot, info),))
        return out, lse

    def _launch_fp8_again(self, r: "Fp8Launch", q, k, v, descales: dict, scale, position_shift):
        """An FP8 call whose signature was launched before: fresh outputs, a fresh V^T and ones for the factors
        not given, all allocated on the caller's stream (where both launches run); the new pointers swapped into
        the remembered transpose and forward."""
        import torch

        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if (pointers[0] | pointers[1] | pointers[2]) % 16:   # the copy engine's and the transpose's 16-byte rows
            self._signatures.clear()                      # the general path explains the misalignment
            return self(q, k, v, scale=scale, position_shift=position_shift, **descales)
        device = q.device
        out = torch.empty(r.forward.out_shape, dtype=torch.bfloat16, device=device)
        lse = torch.empty(r.forward.lse_shape, dtype=torch.float32, device=device)
        vt = torch.empty(r.vt_shape, dtype=torch.uint8, device=device)
        factors = [x if x is not None else torch.ones(r.descale_shape, dtype=torch.float32, device=device)
                   for x in descales.values()]
        index = q.get_device()

        def launch():
            stream = _raw_torch_stream(index)
            r.transposing.launch(stream, (pointers[2], vt.data_ptr()))
            r.forward.launch(stream, (pointers[0], pointers[1], vt.data_ptr(), out.data_ptr(), lse.data_ptr()),
                             tuple(zip(self._descale_slots, (f.data_ptr() for f in factors))))
        _on_device(index, launch)
        return out, lse

    def _launch_again(self, block, q, k, v, scale, position_shift):
        """A call whose signature was launched before: all it checks is the pointers' alignment."""
        import torch

        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if (pointers[0] | pointers[1] | pointers[2]) % (2 * self.variant.global_vector):
            self._signatures.clear()                      # the general path explains the misalignment
            return self(q, k, v, scale=scale, position_shift=position_shift)
        device = q.device
        out = torch.empty(block.out_shape, dtype=q.dtype, device=device)
        lse = torch.empty(block.lse_shape, dtype=torch.float32, device=device)
        index = q.get_device()
        _on_device(index, lambda: block.launch(_raw_torch_stream(index), (*pointers, out.data_ptr(), lse.data_ptr())))
        return out, lse
