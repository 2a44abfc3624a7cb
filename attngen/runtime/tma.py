"""Tensor maps for the Hopper path's bulk tensor copies (TMA).

A tensor map describes a tensor in device memory to the copy engine: its base address, sizes, strides,
the box one copy brings in, and the shared-memory swizzle. The driver's cuTensorMapEncodeTiled encodes
it into 128 opaque bytes that the kernel takes by value (a __grid_constant__ parameter). CuPy has no
binding for it, so it is called through ctypes on libcuda; nothing else here touches the driver.
"""

from __future__ import annotations

import ctypes
import functools
from collections import OrderedDict

MAP_BYTES = 128                      # sizeof(CUtensorMap); it must be 64-byte aligned
MAP_ALIGN = 64
DATA_TYPES = {"fp16": 6, "bf16": 9, "fp8_e4m3": 0}  # CU_TENSOR_MAP_DATA_TYPE_FLOAT16 / _BFLOAT16 / _UINT8 (raw bytes)
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp8_e4m3": 1}
INTERLEAVE_NONE = 0
SWIZZLE_128B = 3                     # CU_TENSOR_MAP_SWIZZLE_128B: the layout wgmma's descriptors name
L2_PROMOTION_256B = 3                # CU_TENSOR_MAP_L2_PROMOTION_L2_256B
OOB_FILL_ZEROS = 0                   # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: rows past the end read as zeros
SWIZZLE_ROW_BYTES = 128              # a box row is one swizzle row: 64 bf16/fp16 or 128 fp8 columns
CACHED_ADDRESSES = 8                 # encodings kept per argument: an encode costs ~7 us, a copy ~0.3 us


@functools.lru_cache(maxsize=1)
def _encode_tiled():
    lib = ctypes.CDLL("libcuda.so.1")
    fn = lib.cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


class TensorMapArgument:
    """One kernel argument holding the tensor map of a [batch, seqlen, heads, dim] tensor (strides in
    elements, the last one 1), copied in boxes of (128 bytes of dim) x box_rows. Assigning `value` a new base
    address re-encodes the map (so an ArgumentBlock can swap pointers like any other argument)."""

    def __init__(self, name: str, dtype: str, ptr: int, shape, strides, box_rows: int, encodings=None):
        batch, seqlen, heads, dim = shape
        elem = ELEM_BYTES[dtype]
        self.name = name
        self._storage = (ctypes.c_uint8 * (MAP_BYTES + MAP_ALIGN))()
        self.address = -(-ctypes.addressof(self._storage) // MAP_ALIGN) * MAP_ALIGN
        self._dtype = DATA_TYPES[dtype]
        # innermost first: (dim, seqlen, heads, batch); strides of the outer three in bytes
        self._dims = (ctypes.c_uint64 * 4)(dim, seqlen, heads, batch)
        # a batch of one (a packed varlen tensor, batch stride 0) never steps its batch stride: any valid one
        batch_stride = strides[0] if batch > 1 else strides[1] * max(seqlen, 1)
        self._strides = (ctypes.c_uint64 * 3)(strides[1] * elem, strides[2] * elem, batch_stride * elem)
        self._box = (ctypes.c_uint32 * 4)(SWIZZLE_ROW_BYTES // elem, box_rows, 1, 1)
        self._element_strides = (ctypes.c_uint32 * 4)(1, 1, 1, 1)
        # base address -> the map's bytes (callers reuse buffers); `encodings` shares them between arguments
        # of one layout and box
        self._encoded = OrderedDict() if encodings is None else encodings
        self.value = ptr

    @property
    def value(self) -> int:
        return self._ptr

    @value.setter
    def value(self, ptr: int) -> None:
        encoded = self._encoded.get(ptr)
        if encoded is not None:
            ctypes.memmove(self.address, encoded, MAP_BYTES)
            self._ptr = ptr
            return
        status = _encode_tiled()(self.address, self._dtype, 4, ptr, self._dims, self._strides, self._box,
                                 self._element_strides, INTERLEAVE_NONE, SWIZZLE_128B, L2_PROMOTION_256B,
                                 OOB_FILL_ZEROS)
        if status != 0:
            raise ValueError(f"{self.name}: the tensor memory accelerator cannot address this tensor (sizes "
                             f"{list(self._dims)}, byte strides {list(self._strides)}, address 0x{ptr:x}; "
                             f"cuTensorMapEncodeTiled returned {status}); strides must be multiples of 16 bytes")
        self._ptr = ptr
        if len(self._encoded) >= CACHED_ADDRESSES:
            self._encoded.popitem(last=False)
        self._encoded[ptr] = ctypes.string_at(self.address, MAP_BYTES)
