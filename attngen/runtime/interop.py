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
