"""Packed variable-length batches (spec layout: varlen), FlashAttention's varlen convention: q [total_q,
heads_q, head_dim], k and v [total_k, heads_kv, dim], sequence b at rows cu_seqlens_q[b]..cu_seqlens_q[b+1]
(int32 [batch + 1] on the inputs' device), LSE [heads_q, total_q].

The kernels see a packed tensor as one batch entry, [1, total, heads, dim] with a batch stride of 0, and find
a CTA's sequence from cu_seqlens. Nothing here reads cu_seqlens on the host (that would wait for the GPU):
grids are sized from the totals (every sequence adds at most one partial tile), and before each varlen
kernel a one-CTA schedule kernel, on the same stream, places the sequences' tiles heaviest first and
checks the offsets (see the varlen_schedule piece).
"""

from __future__ import annotations

import math

from .interop import TensorView, _empty_like, _view

SCHEDULE_THREADS = 1024          # the schedule kernel's launch bounds; it sorts batches up to this size


def packed(view: TensorView) -> TensorView:
    """A [total, heads, dim] view as the kernels' [1, total, heads, dim], batch stride 0."""
    return view._replace(shape=(1, *view.shape), strides=(0, *view.strides))


def grid_tiles(total: int, batch: int, block: int) -> int:
    """Tiles of `block` rows over sequences of `total` rows in all: at most one partial tile per sequence."""
    return math.ceil(total / block) + batch


def padded_rows(total: int, batch: int, block: int) -> int:
    """Rows per head of a buffer padded to whole tiles per sequence (row stats, the dQ accumulator)."""
    return grid_tiles(total, batch, block) * block


def schedule_buffer(ref: TensorView, batch: int, capacity: int, keep: list) -> tuple[int, int, int]:
    """Device addresses of a fresh (tile_order [batch], tile_start [batch + 1], tile_info [2 * capacity] int4)
    for one launch's schedule (capacity 0: no tile_info, address 0), allocated on the current stream; the
    buffer goes into `keep`."""
    buffer = _empty_like(ref, (8 * capacity + 2 * batch + 1,), "int32")
    keep.append(buffer)
    info = _view("schedule", buffer).ptr                 # first: int4-aligned
    order = info + 32 * capacity
    return order, order + 4 * batch, info if capacity else 0


def schedule_args(cu_q: TensorView, cu_k: TensorView, batch: int, totals: tuple[int, int], over_keys: bool,
                  block: int, sort: bool, reverse: bool, capacity: int, buffers: tuple[int, int, int]) -> dict:
    """The schedule kernel's arguments (VARLEN_SCHEDULE): the tiles of `block` query rows (key rows when
    over_keys) of every sequence, heaviest first when `sort`, numbered last first when `reverse`, and
    `capacity` descriptors, into buffers = (tile_order, tile_start, tile_info)."""
    order, start, info = buffers
    return {"cu_seqlens_q": cu_q.ptr, "cu_seqlens_k": cu_k.ptr, "batch_size": batch, "total_q": totals[0],
            "total_k": totals[1], "tiles_over_keys": int(over_keys), "block_rows": block, "sort": int(sort),
            "reverse": int(reverse), "tile_capacity": capacity, "tile_order": order, "tile_start": start,
            "tile_info": info}


def schedule(function, signature, ref: TensorView, cu_q: TensorView, cu_k: TensorView, batch: int,
             totals: tuple[int, int], over_keys: bool, block: int, sort: bool, reverse: bool, capacity: int,
             keep: list) -> tuple[int, int, int]:
    """Launch the schedule kernel (a CuPy function) on the current stream (enter the inputs' device and
    stream first). Returns the device addresses of (tile_order, tile_start, tile_info)."""
    buffers = schedule_buffer(ref, batch, capacity, keep)
    function((1,), (SCHEDULE_THREADS,), signature.pack(schedule_args(cu_q, cu_k, batch, totals, over_keys, block,
                                                                     sort, reverse, capacity, buffers)))
    return buffers


def varlen_sizes(tile_info: int, total_q: int, total_k: int) -> dict:
    """The VARLEN_SIZES arguments but the shared heads_q, group_size and scale_log2."""
    return {"tile_info": tile_info, "total_q": total_q, "total_k": total_k}
