"""Kernel: a compiled forward kernel as a callable on torch CUDA tensors or CuPy arrays.

Arguments are checked before anything is launched; pointers and strides are read from the inputs
themselves (zero copy), and the launch goes to the caller's current stream (torch's for torch tensors).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from typing import NamedTuple

import numpy as np

from .compile import Binary
from .plan import Plan
from .plan import tile_list_bytes
from .spec import Spec
from .tma import TensorMapArgument
from .uploads import UPLOADS, stream_handle
from .variant import variant_of
ELEMENT_ALIGN = 8   # a vector kernel's cp.async moves 16 bytes = 8 elements: its row starts must be 16-byte
                    # aligned (kernels whose head dims are not multiples of 8 move elements: any row start)


class TensorView(NamedTuple):
    """What the launcher needs of one tensor, whatever library it came from (a tuple: cheap to make)."""

    kind: str             # "torch" | "cupy"
    ptr: int
    shape: tuple
    strides: tuple        # in elements
    dtype: str            # "fp16" | "bf16" | other names for error messages
    device: int
    obj: object


_TORCH_DTYPE_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16"}


def _view(name: str, x) -> TensorView:
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        if not x.is_cuda:
            raise ValueError(f"{name}: expected a CUDA tensor, got one on {x.device}")
        dtype = str(x.dtype)
        return TensorView("torch", x.data_ptr(), tuple(x.shape), x.stride(), _TORCH_DTYPE_NAMES.get(dtype, dtype),
                          x.get_device(), x)
    if module == "cupy":
        itemsize = x.dtype.itemsize
        dtype = {"float16": "fp16"}.get(x.dtype.name, x.dtype.name)
        strides = tuple(s // itemsize for s in x.strides)
        return TensorView("cupy", x.data.ptr, tuple(x.shape), strides, dtype, x.device.id, x)
    raise TypeError(f"{name}: expected a torch CUDA tensor or a CuPy array, got {type(x).__name__}")


def check_inputs(spec: Spec, q, k, v):
    """Validate q, k, v against the spec and each other; return their views and the problem sizes."""
    views = {name: _view(name, x) for name, x in (("q", q), ("k", k), ("v", v))}
    vector = variant_of(spec).global_vector            # elements per global access: ELEMENT_ALIGN or 1
    kinds = {vw.kind for vw in views.values()}
    if len(kinds) > 1:
        raise TypeError(f"q, k, v: expected one array library, got {sorted(kinds)}")
    for name, vw in views.items():
        if len(vw.shape) != 4:
            raise ValueError(f"{name}: expected 4 dims [batch, seqlen, heads, head_dim], got shape {vw.shape}")
        if vw.dtype != spec.dtype:
            raise TypeError(f"{name}: expected dtype {spec.dtype} (the built kernel's), got {vw.dtype}")
        if vw.strides[-1] != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {vw.strides}")
        if any(s % vector for s in vw.strides[:-1]) or vw.ptr % (2 * vector):
            raise ValueError(f"{name}: row starts must be {2 * vector}-byte aligned (strides multiples of {vector} "
                             f"elements: this kernel's head dims are multiples of {vector}), got strides {vw.strides} "
                             f"at address 0x{vw.ptr:x}")
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
    if vv.shape[:3] != (batch, seqlen_k, heads_kv) or vv.shape[3] != spec.dv:
        raise ValueError(f"v: expected shape [{batch}, {seqlen_k}, {heads_kv}, {spec.dv}], got {vv.shape}")
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


def _empty_like(ref: TensorView, shape, dtype: str):
    if ref.kind == "torch":
        import torch

        tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        return torch.empty(shape, dtype=tdtype, device=ref.obj.device)
    import cupy

    with cupy.cuda.Device(ref.device):
        return cupy.empty(shape, dtype={"fp16": cupy.float16, "fp32": cupy.float32}[dtype])


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


def _raw_torch_stream(device: int) -> int:
    return stream_handle("torch", device)


def _torch_signature(q, k, v, scale):
    """What fixes a launch for torch inputs (shapes, strides, dtypes, devices, scale), or None for anything
    else; the pointers are left out."""
    if type(q).__module__ != "torch" or type(k) is not type(q) or type(v) is not type(q):
        return None
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, k.dtype, v.dtype,
            q.get_device(), k.get_device(), v.get_device(), q.is_cuda and k.is_cuda and v.is_cuda, scale, type(scale))


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

    def launch(self, stream: int, pointers=()) -> None:
        """Launch on `stream`, first replacing the leading pointer arguments with `pointers` (a tensor
        map re-encodes itself for its new address)."""
        from cupy.cuda import driver

        with self.lock:
            for slot, value in zip(self.slots, pointers):
                slot.value = value
            driver.launchKernel(self.handle, *self.grid, *self.block, self.shared_mem, stream,
                                ctypes.addressof(self.pointers), 0)


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


@functools.lru_cache(maxsize=64)
def _block_table_bits(pattern, seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """A pattern's block table as uint32 bits [heads or 1][q blocks][words]: bit j of word w is kv block 32w + j."""
    table = pattern.block_table(seqlen_q, seqlen_k)
    words = -(-table.shape[2] // 32)
    padded = np.zeros(table.shape[:2] + (words * 32,), dtype=bool)
    padded[..., :table.shape[2]] = table
    bits = np.packbits(padded, axis=-1, bitorder="little").view("<u4")
    bits.setflags(write=False)
    return bits


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
        self._fallback = fallback

    def _mask_args(self, block_mask, seqlen_q, seqlen_k, heads_q, qv, keep):
        """The block-CSR arguments of a runtime-layout kernel (device copies cached per mask and stream),
        or (); the copies' buffers go to `keep` (see UploadCache.pointers)."""
        schedule = self.variant.schedule
        if schedule != "runtime":
            if block_mask is not None:
                why = ("was built without a mask" if schedule == "dense" else
                       f"evaluates its mask ({self.spec.mask_pattern.name}) as code; build a spec with "
                       "mask: {kind: runtime} to pass a layout")
                raise ValueError(f"block_mask: this kernel {why}")
            return ()
        from .masks import BlockMask

        if block_mask is None:
            raise ValueError("block_mask: this kernel's mask is a runtime block layout; pass an attngen.BlockMask")
        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask: expected an attngen.BlockMask, got {type(block_mask).__name__}")
        if tuple(block_mask.block_size) != tuple(self.spec.mask_block_size):
            raise ValueError(f"block_mask: block size {tuple(block_mask.block_size)} differs from the built "
                             f"kernel's {tuple(self.spec.mask_block_size)}")
        if (block_mask.seqlen_q, block_mask.seqlen_k) != (seqlen_q, seqlen_k):
            raise ValueError(f"block_mask: built for seqlens ({block_mask.seqlen_q}, {block_mask.seqlen_k}), "
                             f"the inputs have ({seqlen_q}, {seqlen_k})")
        if self.spec.mask_mod is None:      # the kernel must compute exactly block_mask.element_mask()
            needed, built = block_mask.kernel_predicate(), self.spec.mask_element
            if needed != built:
                inside = "visible everywhere" if needed is None else f"masked by {needed.name}"
                evaluates = "nothing" if built is None else built.name
                wanted = {"kind": "runtime"} | ({} if needed is None else {"element": needed.to_dict()})
                raise ValueError(f"block_mask: its partial blocks are {inside}, but this kernel evaluates "
                                 f"{evaluates} there; build it with mask: {wanted} (attngen.attention does)")
        if block_mask.num_heads not in (1, heads_q):
            raise ValueError(f"block_mask: {block_mask.num_heads} heads; expected 1 or heads_q={heads_q}")
        pointers = UPLOADS.pointers(("csr", id(block_mask)), block_mask, lambda: [
            block_mask.full_row_ptr, block_mask.full_cols, block_mask.partial_row_ptr, block_mask.partial_cols], qv, keep)
        n_q_blocks = -(-seqlen_q // block_mask.block_size[0])
        return (*(np.uint64(p) for p in pointers), np.int32(block_mask.num_heads), np.int32(n_q_blocks))

    def _block_table_args(self, seqlen_q, seqlen_k, qv, keep):
        """The pattern's block table as bits [heads or 1][q blocks][words] on the device (cached per seqlens)."""
        if not self.variant.block_table:
            return ()
        pattern = self.spec.mask_pattern
        bits = _block_table_bits(pattern, seqlen_q, seqlen_k)
        (pointer,) = UPLOADS.pointers(("table", seqlen_q, seqlen_k), pattern, lambda: [bits], qv, keep)
        return (np.uint64(pointer), *(np.int32(n) for n in bits.shape))

    def _alibi_args(self, slopes, batch, heads_q, qv, keep):
        """(pointer, batch stride) of the ALiBi slopes: [heads_q] or [batch, heads_q] float32, or the
        standard slopes for heads_q when none are given."""
        if not self.variant.alibi:
            if slopes is not None:
                raise ValueError("alibi_slopes: this kernel was built without alibi (spec.alibi is false)")
            return ()
        if slopes is None:
            from .reference import alibi_slopes

            (pointer,) = UPLOADS.pointers(("alibi", heads_q), heads_q, lambda: [alibi_slopes(heads_q)], qv, keep)
            return (np.uint64(pointer), np.int32(0))
        sv = _view("alibi_slopes", slopes)
        if sv.kind != qv.kind or sv.dtype not in ("float32", "torch.float32") or sv.device != qv.device \
                or sv.shape not in ((heads_q,), (batch, heads_q)) or sv.strides[-1] != 1 \
                or (len(sv.shape) == 2 and sv.strides[0] != heads_q):
            raise ValueError(f"alibi_slopes: expected a contiguous {qv.kind} float32 array of shape [{heads_q}] or "
                             f"[{batch}, {heads_q}] on device {qv.device}, got {sv.dtype} {sv.shape}")
        return (np.uint64(sv.ptr), np.int32(heads_q if len(sv.shape) == 2 else 0))

    def _tensor_args(self, tensors, sizes, qv):
        """Pointers of the named tensors the expressions read, checked against their declarations."""
        declared = {t.name: t for t in self.variant.tensors}
        given = dict(tensors or {})
        if set(given) != set(declared):
            raise ValueError(f"tensors: expected {sorted(declared) or 'none'} (the spec's), got {sorted(given)}")
        args = []
        for name, decl in declared.items():
            tv = _view(f"tensors[{name!r}]", given[name])
            shape = decl.sizes(*sizes)
            contiguous = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
            if tv.kind != qv.kind or tv.dtype not in (decl.dtype, f"torch.{decl.dtype}") or tv.shape != shape \
                    or tv.strides != contiguous or tv.device != qv.device:
                raise ValueError(f"tensors[{name!r}]: expected a contiguous {qv.kind} {decl.dtype} array of shape "
                                 f"{list(shape)} on device {qv.device}, got {tv.dtype} {list(tv.shape)}")
            args.append(np.uint64(tv.ptr))
        return tuple(args)

    @property
    def resources(self):
        return self.binary.resources

    def __repr__(self):
        p = self.plan
        return (f"<attngen.Kernel {self.kernel_name}: {p.block_m}x{p.block_n} tiles, {p.warps} warps, "
                f"{p.stages} stages, {p.smem_bytes} B smem, {self.resources.registers} regs>")

    def __call__(self, q, k, v, *, scale: float | None = None, out=None, lse=None, block_mask=None,
                 alibi_slopes=None, tensors=None):
        """Return (out, lse). `out` [b, sq, hq, dv] and `lse` [b, hq, sq] fp32 may be given to write into.
        A `mask: {kind: runtime}` spec takes a BlockMask; an alibi spec may take its slopes ([heads_q] or
        [batch, heads_q] fp32; default: ALiBi's standard slopes); a spec with named tensors takes them
        as tensors={name: array}."""
        fast = out is None and lse is None and block_mask is None and alibi_slopes is None and tensors is None
        signature = _torch_signature(q, k, v, scale) if fast and self._signature_ok else None
        if signature is not None:
            block = self._signatures.get(signature)
            if block is not None:
                return self._launch_again(block, q, k, v)
        qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv) = check_inputs(self.spec, q, k, v)
        scale = self.spec.softmax_scale if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
        keep = []      # per-call device buffers: held until the launch is queued on their stream
        extra_args = (
            *self._mask_args(block_mask, seqlen_q, seqlen_k, heads_q, qv, keep),
            *((np.float32(scale),) if self.variant.score_mods else ()),
            *self._alibi_args(alibi_slopes, batch, heads_q, qv, keep),
            *self._block_table_args(seqlen_q, seqlen_k, qv, keep),
            *self._tensor_args(tensors, (batch, heads_q, seqlen_q, seqlen_k), qv),
        )
        out_shape, lse_shape = (batch, seqlen_q, heads_q, self.spec.dv), (batch, heads_q, seqlen_q)
        out = _empty_like(qv, out_shape, self.spec.dtype) if out is None else out
        lse = _empty_like(qv, lse_shape, "fp32") if lse is None else lse
        ov, lv = _view("out", out), _view("lse", lse)
        vector = self.variant.global_vector
        if ov.kind != qv.kind or ov.shape != out_shape or ov.dtype != self.spec.dtype or ov.strides[-1] != 1 \
                or any(s % vector for s in ov.strides[:-1]) or ov.ptr % (2 * vector) or ov.device != qv.device:
            raise ValueError(f"out: expected a {qv.kind} {self.spec.dtype} array of shape {out_shape} on device "
                             f"{qv.device}, last dim contiguous, rows {2 * vector}-byte aligned")
        lse_strides = (heads_q * seqlen_q, seqlen_q, 1)
        if lv.kind != qv.kind or lv.shape != lse_shape or lv.dtype not in ("float32", "torch.float32") \
                or lv.strides != lse_strides or lv.device != qv.device:
            raise ValueError(f"lse: expected a contiguous {qv.kind} float32 array of shape {lse_shape} on device {qv.device}")
        p = self.plan
        grid = (math.ceil(seqlen_q / p.block_m), heads_q, batch)
        if p.path == "wgmma":     # q, k, v reach the kernel as tensor maps (their strides inside)
            layouts = (qv.shape, qv.strides, kv.shape, kv.strides, vv.shape, vv.strides)
            try:
                if layouts in self._untileable:
                    raise ValueError("known untileable")
                inputs = (
                    TensorMapArgument("q", self.spec.dtype, qv.ptr, qv.shape, qv.strides, p.block_m),
                    TensorMapArgument("k", self.spec.dtype, kv.ptr, kv.shape, kv.strides, p.block_n),
                    TensorMapArgument("v", self.spec.dtype, vv.ptr, vv.shape, vv.strides, p.block_n),
                    np.uint64(ov.ptr), np.uint64(lv.ptr))
            except ValueError as exc:    # a layout the copy engine cannot address (e.g. a stride-0 expanded K/V)
                if self._fallback is None:
                    raise ValueError(f"q, k, v: the Hopper kernel's copy engine cannot address these layouts ({exc}); "
                                     "build the kernel with path='mma_sync'") from None
                self._untileable.add(layouts)    # later calls skip the encoding attempt
                return self._fallback()(q, k, v, scale=scale, out=out, lse=lse, block_mask=block_mask,
                                        alibi_slopes=alibi_slopes, tensors=tensors)
        else:
            inputs = (
                np.uint64(qv.ptr), np.uint64(kv.ptr), np.uint64(vv.ptr), np.uint64(ov.ptr), np.uint64(lv.ptr),
                *(np.int64(s) for s in qv.strides[:3]), *(np.int64(s) for s in kv.strides[:3]),
                *(np.int64(s) for s in vv.strides[:3]))
        args = (
            *inputs, *(np.int64(s) for s in ov.strides[:3]),
            np.int32(seqlen_q), np.int32(seqlen_k), np.int32(heads_q), np.int32(heads_q // heads_kv),
            # Modified scores are already in natural units; otherwise the kernel scales raw q.k.
            np.float32((1.0 if self.variant.score_mods else scale) * math.log2(math.e)),
            *extra_args,
        )
        smem = p.smem_bytes + tile_list_bytes(self.spec, p.warps, p.block_n, seqlen_k)
        import cupy

        block = ArgumentBlock(self._handle, grid, (p.threads, 1, 1), smem, args)
        with cupy.cuda.Device(qv.device):
            if smem > p.smem_bytes:                  # the tile list grows with seqlen_k
                ensure_dynamic_smem(self._function, smem, f"k: seqlen_k={seqlen_k} needs")
            block.launch(_stream_handle(qv))
        if signature is not None:
            if len(self._signatures) >= MAX_SIGNATURES:
                self._signatures.clear()
            block.out_shape, block.lse_shape = out_shape, lse_shape
            self._signatures[signature] = block
        return out, lse

    @property
    def _signature_ok(self) -> bool:
        """Whether a launch is fixed by the input signature alone: no block layout, ALiBi slopes, block
        table or named tensors, whose device arrays a remembered block would point at."""
        v = self.variant
        return v.schedule != "runtime" and not v.alibi and not v.block_table and not v.tensors

    def _launch_again(self, block, q, k, v):
        """A call whose signature was launched before: all it checks is the pointers' alignment."""
        import torch

        pointers = (q.data_ptr(), k.data_ptr(), v.data_ptr())
        if (pointers[0] | pointers[1] | pointers[2]) % (2 * self.variant.global_vector):
            self._signatures.clear()                      # the general path explains the misalignment
            return self(q, k, v)
        device = q.device
        out = torch.empty(block.out_shape, dtype=q.dtype, device=device)
        lse = torch.empty(block.lse_shape, dtype=torch.float32, device=device)
        index = q.get_device()
        import cupy

        if cupy.cuda.runtime.getDevice() != index:
            with cupy.cuda.Device(index):
                block.launch(_raw_torch_stream(index), (*pointers, out.data_ptr(), lse.data_ptr()))
        else:
            block.launch(_raw_torch_stream(index), (*pointers, out.data_ptr(), lse.data_ptr()))
        return out, lse
