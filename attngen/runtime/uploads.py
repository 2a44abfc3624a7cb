"""Per-call device data: host arrays a launch reads (block layouts, pattern block tables, ALiBi slopes),
uploaded where and when the launch can rely on them.

Rules (ARCHITECTURE.md, per-call data):
- A copy is made with the inputs' own framework on the launch's stream: torch's current stream for torch
  tensors (through a pinned staging buffer, asynchronously), CuPy's current stream for CuPy arrays. The
  kernel, launched next on that stream, is ordered after the copy.
- A copy is cached per (what it holds, device, stream) and only ever used on the stream it was written
  on. When the cache evicts a copy, its memory goes back to the framework's allocator as memory of that
  stream, which reuses it only for work queued on that same stream after the kernels already there: no
  queued kernel ever reads freed or rewritten memory. (Both torch's caching allocator and CuPy's memory
  pool are stream-ordered in this way.)

All the arrays of one upload travel in one buffer (one copy); each is 4-byte words (int32, uint32, float32).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

MAX_CACHED_UPLOADS = 64   # uploads kept per cache (each a few KB: layouts, tables, slopes)


def stream_handle(kind: str, device: int) -> int:
    """The raw handle of the caller's current stream: torch's for torch tensors, CuPy's for CuPy arrays."""
    if kind == "torch":
        import torch

        try:
            return torch._C._cuda_getCurrentRawStream(device)      # what torch's own launchers use (~0.2 us)
        except AttributeError:
            return torch.cuda.current_stream(device).cuda_stream
    import cupy

    return cupy.cuda.get_current_stream(device).ptr


def upload(host_arrays, kind: str, device, torch_device=None):
    """One device buffer holding the arrays back to back, written on the current stream of `kind`'s
    framework; returns (buffer, device address of each array). The buffer must be kept alive by the
    caller until it stops launching with it (the stream then orders its reuse)."""
    words = [np.ascontiguousarray(a).reshape(-1) for a in host_arrays]
    for w in words:
        if w.dtype.itemsize != 4:
            raise TypeError(f"upload: arrays must hold 4-byte words, got {w.dtype}")
    offsets = np.cumsum([0] + [w.size for w in words])
    flat = np.concatenate([w.view(np.int32) for w in words] + [np.zeros(1, np.int32)])  # never empty
    if kind == "torch":
        import torch

        staging = torch.from_numpy(flat).pin_memory()       # torch's host allocator keeps it until the copy ends
        buffer = staging.to(torch_device, non_blocking=True)
        base = buffer.data_ptr()
    else:
        import cupy

        with cupy.cuda.Device(device):
            buffer = cupy.asarray(flat)                      # on CuPy's current stream (the launch's)
        base = buffer.data.ptr
    return buffer, tuple(base + 4 * int(o) for o in offsets[:-1])


class UploadCache:
    """Device copies of host arrays, one per (key, device, stream) while `owner` stays the same object
    (or an equal value); least recently used first out."""

    def __init__(self, capacity: int = MAX_CACHED_UPLOADS):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def pointers(self, key, owner, make, view, keep: list) -> tuple[int, ...]:
        """Device addresses of make()'s arrays for a launch on `view`'s device and current stream.
        `view` is the launch's reference input (a launch.TensorView). The buffer is appended to `keep`,
        which the caller holds until its launch is queued: another thread may evict the entry meanwhile,
        and memory freed before the launch could be handed out again and overwritten ahead of it."""
        full_key = (key, view.kind, view.device, stream_handle(view.kind, view.device))
        with self._lock:
            entry = self._entries.get(full_key)
            if entry is not None and (entry[0] is owner or entry[0] == owner):
                self._entries.move_to_end(full_key)
                keep.append(entry[1])
                return entry[2]
        torch_device = view.obj.device if view.kind == "torch" else None
        buffer, pointers = upload(make(), view.kind, view.device, torch_device)
        keep.append(buffer)
        with self._lock:
            self._entries[full_key] = (owner, buffer, pointers)
            self._entries.move_to_end(full_key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return pointers

    def __len__(self):
        return len(self._entries)


UPLOADS = UploadCache()   # device copies of layouts, block tables and default slopes, shared by every kernel
