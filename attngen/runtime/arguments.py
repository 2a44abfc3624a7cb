"""Per-call kernel arguments shared by the forward and backward launchers: the block layout of a runtime
mask, and the modifiers' arguments (modifiers.py: softmax scale, ALiBi slopes), a pattern's block table and
the named tensors.

Each builder checks what the caller gave against the spec and returns {parameter name: value} for the
names signature.py declares (the launcher packs them through the kernel's Signature), and puts the device
buffers it uploaded into `keep`, which the caller holds until its launches are queued (uploads.UploadCache).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .interop import TensorView, _view
from ..codegen.modifiers import active_modifiers
from .uploads import UPLOADS


def stride_args(name: str, view: TensorView) -> dict:
    """{name_stride_b, name_stride_s, name_stride_h}: an [batch, seq, head, dim] argument's strides."""
    return {f"{name}_stride_{axis}": stride for axis, stride in zip("bsh", view.strides[:3])}


def layout_args(spec, variant, block_mask, seqlen_q, seqlen_k, heads_q, qv, keep) -> dict:
    """The block-CSR arguments (query-major: the forward and the dQ pass) of a runtime-layout kernel, or {}
    for any other schedule. The mask must be one the kernel computes exactly."""
    schedule = variant.schedule
    if schedule != "runtime":
        if block_mask is not None:
            why = ("was built without a mask" if schedule == "dense" else
                   f"evaluates its mask ({spec.mask_pattern.name}) as code; build a spec with "
                   "mask: {kind: runtime} to pass a layout")
            raise ValueError(f"block_mask: this kernel {why}")
        return {}
    from ..masks import BlockMask

    if block_mask is None:
        raise ValueError("block_mask: this kernel's mask is a runtime block layout; pass an attngen.BlockMask")
    if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected an attngen.BlockMask, got {type(block_mask).__name__}")
    if tuple(block_mask.block_size) != tuple(spec.mask_block_size):
        raise ValueError(f"block_mask: block size {tuple(block_mask.block_size)} differs from the built "
                         f"kernel's {tuple(spec.mask_block_size)}")
    if (block_mask.seqlen_q, block_mask.seqlen_k) != (seqlen_q, seqlen_k):
        raise ValueError(f"block_mask: built for seqlens ({block_mask.seqlen_q}, {block_mask.seqlen_k}), "
                         f"the inputs have ({seqlen_q}, {seqlen_k})")
    if spec.mask_mod is None:      # the kernel must compute exactly block_mask.element_mask()
        needed, built = block_mask.kernel_predicate(), spec.mask_element
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
    return {**dict(zip(("full_row_ptr", "full_cols", "partial_row_ptr", "partial_cols"), pointers)),
            "mask_heads": block_mask.num_heads, "mask_q_blocks": n_q_blocks}


def kv_major_layout_args(block_mask, qv, keep) -> dict:
    """The BlockMask's kv-major block-CSR (query blocks per key block, per head): the transposed layout the
    dK/dV pass walks. Call after layout_args, which checks the mask."""
    def arrays():
        t = block_mask.transposed()
        return [t.full_col_ptr, t.full_rows, t.partial_col_ptr, t.partial_rows]

    pointers = UPLOADS.pointers(("kv_major", id(block_mask)), block_mask, arrays, qv, keep)
    return {**dict(zip(("full_col_ptr", "full_rows", "partial_col_ptr", "partial_rows"), pointers)),
            "mask_heads": block_mask.num_heads, "mask_kv_blocks": block_mask.n_kv_blocks}


@dataclass
class ModifierCall:
    """What a modifier's launch_values reads of one call (modifiers.py imports nothing from here)."""

    scale: float
    alibi_slopes: object
    batch: int
    heads_q: int
    qv: TensorView
    keep: list

    @property
    def kind(self) -> str:
        return self.qv.kind

    @property
    def device(self) -> int:
        return self.qv.device

    def view(self, name, x) -> TensorView:
        return _view(name, x)

    def upload(self, key, owner, make) -> int:
        """The device address of make()'s one array, uploaded on the launch's stream (cached)."""
        (pointer,) = UPLOADS.pointers(key, owner, make, self.qv, self.keep)
        return pointer


def modifier_args(spec, variant, scale, alibi_slopes, tensors, sizes, qv, keep) -> dict:
    """The modifiers' arguments (modifiers.py), the pattern's block table and the named tensors.
    sizes: (batch, heads_q, seqlen_q, seqlen_k)."""
    batch, heads_q, seqlen_q, seqlen_k = sizes
    if alibi_slopes is not None and not variant.alibi:
        raise ValueError("alibi_slopes: this kernel was built without alibi (spec.alibi is false)")
    call = ModifierCall(scale, alibi_slopes, batch, heads_q, qv, keep)
    return {**active_modifiers(variant).launch_values(call),
            **_block_table_args(spec, variant, seqlen_q, seqlen_k, qv, keep),
            **_tensor_args(variant, tensors, sizes, qv)}


def _block_table_args(spec, variant, seqlen_q, seqlen_k, qv, keep) -> dict:
    """The pattern's block table as bits [heads or 1][q blocks][words] on the device (cached per seqlens)."""
    if not variant.block_table:
        return {}
    pattern = spec.mask_pattern
    bits = block_table_bits(pattern, seqlen_q, seqlen_k)
    (pointer,) = UPLOADS.pointers(("table", seqlen_q, seqlen_k), pattern, lambda: [bits], qv, keep)
    return {"block_bits": pointer, **dict(zip(("block_bits_heads", "block_bits_rows", "block_bits_words"), bits.shape))}


@functools.lru_cache(maxsize=64)
def block_table_bits(pattern, seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """A pattern's block table as uint32 bits [heads or 1][q blocks][words]: bit j of word w is kv block 32w + j."""
    table = pattern.block_table(seqlen_q, seqlen_k)
    words = -(-table.shape[2] // 32)
    padded = np.zeros(table.shape[:2] + (words * 32,), dtype=bool)
    padded[..., :table.shape[2]] = table
    bits = np.packbits(padded, axis=-1, bitorder="little").view("<u4")
    bits.setflags(write=False)
    return bits


def _tensor_args(variant, tensors, sizes, qv) -> dict:
    """Pointers of the named tensors the expressions read, checked against their declarations."""
    declared = {t.name: t for t in variant.tensors}
    given = dict(tensors or {})
    if set(given) != set(declared):
        raise ValueError(f"tensors: expected {sorted(declared) or 'none'} (the spec's), got {sorted(given)}")
    args = {}
    for name, decl in declared.items():
        tv = _view(f"tensors[{name!r}]", given[name])
        shape = decl.sizes(*sizes)
        contiguous = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        if tv.kind != qv.kind or tv.dtype not in (decl.dtype, f"torch.{decl.dtype}") or tv.shape != shape \
                or tv.strides != contiguous or tv.device != qv.device:
            raise ValueError(f"tensors[{name!r}]: expected a contiguous {qv.kind} {decl.dtype} array of shape "
                             f"{list(shape)} on device {qv.device}, got {tv.dtype} {list(tv.shape)}")
        args[name] = tv.ptr
    return args
