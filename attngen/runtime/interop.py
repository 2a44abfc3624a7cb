"""Tensor interop: what the launchers need of a torch tensor or a CuPy array, read without a copy."""

from __future__ import annotations

from typing import NamedTuple


class TensorView(NamedTuple):
    """What the launcher needs of one tensor, whatever library it came from (a tuple: cheap to make)."""

    kind: str             # "torch" | "cupy"
    ptr: int
    shape: tuple
    strides: tuple        # in elements
    dtype: str            # "fp16" | "bf16" | other names for error messages
    device: int
    obj: object


_TORCH_DTYPE_NAMES = {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float8_e4m3fn": "fp8_e4m3"}


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


def _empty_like(ref: TensorView, shape, dtype: str):
    """An uninitialised array of `shape` in ref's library and on its device (torch: its caching allocator, on
    the current stream)."""
    if ref.kind == "torch":
        import torch

        tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "int32": torch.int32,
                  "uint8": torch.uint8}[dtype]
        return torch.empty(shape, dtype=tdtype, device=ref.obj.device)
    import cupy

    with cupy.cuda.Device(ref.device):
        return cupy.empty(shape, dtype={"fp16": cupy.float16, "fp32": cupy.float32, "int32": cupy.int32,
                                        "uint8": cupy.uint8}[dtype])
