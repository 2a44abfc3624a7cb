"""The FP8 forward's per-call inputs: V^T in P's key order (written by the module's transpose kernel on the
call's stream) and the descale factors (FlashAttention-3's q_descale, k_descale, v_descale)."""

from __future__ import annotations

import math

from ..codegen.signature import FP8_V_TRANSPOSE
from ..spec import Spec
from .interop import TensorView, _empty_like, _view
from .tma import TensorMapArgument

TRANSPOSE_KEYS, TRANSPOSE_THREADS = 64, 256     # as pieces/fp8_v_transpose.cu.j2
KEYS_ALIGN = 128                                # V^T rows: whole 128-byte boxes (the forward's key tile)
DESCALES = ("q_descale", "k_descale", "v_descale")


def descale_args(qv: TensorView, descales: dict, batch: int, heads_kv: int, keep: list) -> dict:
    """The kernel's descale pointers and strides. Each factor is None (1), a one-element float32 tensor (the
    whole tensor's), or float32 [batch, heads_kv] (per sequence and KV head, as FlashAttention-3); the given
    ones share one shape, and a missing one becomes ones of it."""
    views = {}
    for name in DESCALES:
        x = descales.get(name)
        if x is None:
            continue
        vw = _view(name, x)
        if vw.kind != qv.kind or vw.device != qv.device or vw.dtype not in ("torch.float32", "float32"):
            raise TypeError(f"{name}: expected a float32 {qv.kind} array on q's device {qv.device}, got {vw.dtype} "
                            f"on device {vw.device}")
        if math.prod(vw.shape) == 1:
            vw = vw._replace(shape=(1,), strides=(1,))
        elif vw.shape != (batch, heads_kv) or vw.strides != (heads_kv, 1):
            raise ValueError(f"{name}: expected one factor or a contiguous [batch, heads_kv] = [{batch}, {heads_kv}] "
                             f"array, got shape {vw.shape}")
        views[name] = vw
    shapes = {vw.shape for vw in views.values()}
    if len(shapes) > 1:
        raise ValueError(f"q_descale, k_descale, v_descale: expected one shape for the given factors, got "
                         f"{ {name: vw.shape for name, vw in views.items()} }")
    shape = shapes.pop() if shapes else (1,)
    args = {"descale_stride_b": heads_kv if shape != (1,) else 0, "descale_stride_h": 1 if shape != (1,) else 0}
    for name in DESCALES:
        if name not in views:
            ones = _empty_like(qv, shape, "fp32")
            (ones.fill_ if qv.kind == "torch" else ones.fill)(1.0)    # on the current stream, as the kernel
            keep.append(ones)
            views[name] = _view(name, ones)
        args[name] = views[name].ptr
    return args


def vt_shape(spec: Spec, batch: int, heads_kv: int, seqlen_k: int) -> tuple:
    """V^T's shape: [batch, heads_kv, head_dim_v, keys padded to 128] (whole boxes of the forward's key tile)."""
    return batch, heads_kv, spec.head_dim_v, -(-seqlen_k // KEYS_ALIGN) * KEYS_ALIGN


def descale_shape(given) -> tuple:
    """The shape of the ones that stand in for missing factors: the given ones' ([batch, heads_kv]), or (1,)."""
    shapes = [tuple(x.shape) for x in given if math.prod(x.shape) != 1]
    return shapes[0] if shapes else (1,)


def transposed_v(spec: Spec, vv: TensorView, batch: int, heads_kv: int, seqlen_k: int, keep: list):
    """(grid, packed arguments, v map): the transpose of V into a new V^T (vt_shape) for the caller to launch on
    the forward's stream, and the forward's tensor map over it (boxes of 128 keys, one swizzle row, x
    head_dim_v rows)."""
    shape = vt_shape(spec, batch, heads_kv, seqlen_k)
    keys = shape[3]
    vt = _empty_like(vv, shape, "uint8")
    keep.append(vt)
    vtv = _view("vt", vt)
    args = FP8_V_TRANSPOSE.pack({"v": vv.ptr, "vt": vtv.ptr, "v_stride_b": vv.strides[0], "v_stride_s": vv.strides[1],
                                 "v_stride_h": vv.strides[2], "seqlen_k": seqlen_k, "keys_padded": keys})
    d = spec.head_dim_v      # V^T as [batch, "seqlen" = head-dim rows, heads, "dim" = keys]: the map's 4 dims
    v_map = TensorMapArgument("v", spec.dtype, vtv.ptr, (batch, d, heads_kv, keys),
                              (heads_kv * d * keys, keys, d * keys, 1), d)
    return (keys // TRANSPOSE_KEYS, heads_kv, batch), args, v_map
