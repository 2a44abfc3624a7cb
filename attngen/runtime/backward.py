"""Backward: the compiled backward kernels of a spec as one callable, (q, k, v, out, lse, dout) -> (dq, dk, dv).

Launches on the caller's stream: delta = rowsum(dO * O), then dK/dV (a CTA per key tile and column chunk,
summing its GQA group's query heads in registers), which by default also adds dQ into a zeroed fp32 buffer
with atomics, then a conversion of that buffer to dQ. With `deterministic: true` a dQ pass (a CTA per
query tile and column chunk) runs before dK/dV instead: no atomics anywhere, so the gradients are
bit-identical run to run. On the wgmma path (Hopper) the dK/dV pass reads Q, K, V and dO through tensor
maps, and the delta kernel writes each query row's (LSE in base 2, delta) pair, padded to whole steps, for
the producer to copy in one piece.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict


from .launch import (ELEMENT_ALIGN, MAX_SIGNATURES, ArgumentBlock, _current_stream, _empty_like, _stream_handle, _view,
                     check_inputs, check_position_shift, check_varlen_inputs, ensure_dynamic_smem, packed)
from ..planner.forward import tile_list_bytes
from ..planner.backward import BackwardPlan
from ..spec import Spec
from .tma import TensorMapArgument
from .arguments import kv_major_layout_args, layout_args, modifier_args, stride_args
from ..codegen.signature import (VARLEN_SCHEDULE, backward_delta_signature, backward_dkdv_signature,
                                 backward_dq_signature, dq_convert_signature)
from .varlen import grid_tiles, padded_rows, schedule, varlen_sizes
from ..variant import variant_of

DELTA_ROWS_PER_CTA = 8     # one warp per query row, 256 threads (the delta kernel's launch bounds)
CONVERT_THREADS = 256      # the dQ conversion's launch bounds


def check_backward_support(spec: Spec) -> None:
    """The backward covers dense and causal attention, pattern masks (as code), runtime block layouts (the
    kv-major CSR derived from the BlockMask), mask_mod, softcap, ALiBi and a score_mod with its
    score_mod_grad, with GQA at every head dim. A score_mod without score_mod_grad is refused here."""
    variant = variant_of(spec)
    if variant.score_mod is not None and variant.score_mod_grad is None:
        raise ValueError(f"backward: spec {spec.name} has a score_mod but no score_mod_grad (its derivative with "
                         "respect to score), which training needs; add it to the spec, or call under torch.no_grad()")



class BackwardKernels:
    """The backward kernels of one spec on one device."""

    def __init__(self, spec: Spec, plan: BackwardPlan, sources: dict, cubin_paths: dict, binaries: dict,
                 fallback=None):
        """fallback: () -> the mma.sync BackwardKernels of the same spec, for inputs the wgmma dK/dV pass
        cannot take (the build layer supplies it)."""
        import cupy

        self.spec, self.plan, self.sources, self.binaries = spec, plan, sources, binaries
        self._fallback = fallback
        self.variant = variant_of(spec)
        from ..codegen.render import KernelKind, kernel_name

        dkdv_module = cupy.RawModule(path=str(cubin_paths["backward_dkdv"]))
        self._dkdv = dkdv_module.get_function(kernel_name(spec, KernelKind.BACKWARD_DKDV))
        if plan.dq is not None:
            dq_module = cupy.RawModule(path=str(cubin_paths["backward_dq"]))
            self._dq = dq_module.get_function(kernel_name(spec, KernelKind.BACKWARD_DQ))
        else:                                                            # dQ from the dK/dV pass
            dq_module, self._dq = dkdv_module, None
            self._dq_convert = dkdv_module.get_function(kernel_name(spec, KernelKind.BACKWARD_DQ_CONVERT))
        self._delta = dq_module.get_function(kernel_name(spec, KernelKind.BACKWARD_DELTA))
        wgmma = plan.dkdv.path == "wgmma"
        varlen = self.variant.varlen
        self._signatures = {"backward_dkdv": backward_dkdv_signature(self.variant, wgmma, plan.dq is None),
                            "backward_delta": backward_delta_signature(wgmma and plan.dq is None, varlen),
                            "backward_dq_convert": dq_convert_signature(varlen)}
        if varlen:      # the varlen schedule is compiled beside the dK/dV pass
            self._schedule = dkdv_module.get_function(kernel_name(spec, KernelKind.VARLEN_SCHEDULE))
        if plan.dq is not None:
            self._signatures["backward_dq"] = backward_dq_signature(self.variant)
        self._untileable = set()             # input layouts TMA refused (wgmma dK/dV: use mma.sync)
        self._encodings = {}                 # (argument, layout, box) -> its tensor maps' bytes per address

    def _tensor_map(self, name, view, box_rows):
        """A tensor map for this call; a layout and address seen before reuse their encoding (~7 us each)."""
        key = (name, view.shape, view.strides, box_rows)
        if key not in self._encodings and len(self._encodings) >= 4 * MAX_SIGNATURES:
            self._encodings.clear()
        encodings = self._encodings.setdefault(key, OrderedDict())
        return TensorMapArgument(name, self.spec.dtype, view.ptr, view.shape, view.strides, box_rows, encodings)

    def __repr__(self):
        passes = ", ".join(f"{kind} {p.block_m}x{p.block_n} chunk {p.chunk}" for kind, p in self.plan.passes.items())
        return f"<attngen.BackwardKernels {self.spec.name}: {passes}{'' if self.plan.dq else ' (dQ with atomics)'}>"

    def __call__(self, q, k, v, out, lse, dout, *, scale: float | None = None, dq=None, dk=None, dv=None,
                 alibi_slopes=None, tensors=None, block_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                 position_shift: int = 0):
        """(dq, dk, dv) in the inputs' dtype and library; dq [b, sq, hq, d], dk [b, sk, hkv, d], dv [b, sk, hkv, dv]
        (layout: varlen: packed as q, k, v, with lse [hq, total_q] and cu_seqlens_q/k as the forward's)."""
        spec = self.spec
        varlen = self.variant.varlen
        if varlen:
            if cu_seqlens_q is None or cu_seqlens_k is None:
                raise ValueError("cu_seqlens_q, cu_seqlens_k: this kernel's layout is varlen; give both")
            qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv), cu_q, cu_k = check_varlen_inputs(
                spec, q, k, v, cu_seqlens_q, cu_seqlens_k)
        else:
            if cu_seqlens_q is not None or cu_seqlens_k is not None:
                raise ValueError("cu_seqlens_q: this kernel was built for the batch layout; build a spec with "
                                 "layout: varlen (attngen.attention_varlen does)")
            qv, kv, vv, (batch, seqlen_q, seqlen_k, heads_q, heads_kv) = check_inputs(spec, q, k, v)
        scale = spec.softmax_scale if scale is None else scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: expected a positive finite number, got {scale!r}")
        check_position_shift(position_shift, seqlen_q, seqlen_k)
        # (varlen: seqlen_q and seqlen_k are the total rows; the arrays have no batch dim, their views a batch of 1)
        o_shape = (batch, seqlen_q, heads_q, spec.head_dim_v)[varlen:]
        vector = self.variant.global_vector
        ov = _row_major_view("out", out, o_shape, spec.dtype, qv, vector, varlen)
        dov = _row_major_view("dout", dout, o_shape, spec.dtype, qv, vector, varlen)
        lv = _view("lse", lse)
        lse_shape = (batch, heads_q, seqlen_q)[varlen:]
        if lv.kind != qv.kind or lv.shape != lse_shape or lv.dtype not in ("float32", "torch.float32") \
                or lv.strides != (heads_q * seqlen_q, seqlen_q, 1)[varlen:] or lv.device != qv.device:
            raise ValueError(f"lse: expected the forward's contiguous float32 {list(lse_shape)} array")
        grads = {}
        for name, given, shape in (("dq", dq, qv.shape), ("dk", dk, kv.shape[:3] + (spec.head_dim,)),
                                   ("dv", dv, vv.shape)):
            shape = shape[varlen:]
            given = _empty_like(qv, shape, spec.dtype) if given is None else given
            grads[name] = (given, _row_major_view(name, given, shape, spec.dtype, qv, vector, varlen))
        variant = self.variant
        sizes = {"heads_q": heads_q, "group_size": heads_q // heads_kv,
                 # modified scores are recomputed in natural units, as the forward's
                 "scale_log2": (1.0 if variant.score_mods else scale) * math.log2(math.e), "scale": scale,
                 "position_shift": int(position_shift)}
        batch_sizes = {"seqlen_q": seqlen_q, "seqlen_k": seqlen_k}
        keep = []      # per-call device buffers: held until the launches are queued on their stream
        layout_dq = layout_args(spec, variant, block_mask, seqlen_q, seqlen_k, heads_q, qv, keep)
        layout_dkdv = kv_major_layout_args(block_mask, qv, keep) if layout_dq else {}
        mods = modifier_args(spec, variant, scale, alibi_slopes, tensors, (batch, heads_q, seqlen_q, seqlen_k), qv, keep)
        # sparse kernels list their steps in shared memory: key tiles per query tile (dQ), pairs of (query
        # head of the group, query tile) per key tile (dK/dV)
        sparse = variant.schedule != "dense"
        pq, pkv = self.plan.dq, self.plan.dkdv
        # query rows padded to whole query tiles, or to whole mask blocks (a layout's steps cover them)
        pad = spec.mask_block_size[0] if variant.schedule == "runtime" else pkv.block_m
        list_rows = math.ceil(seqlen_q / pad) * pad       # (varlen: bounds every sequence's)
        dkdv_smem = pkv.smem_bytes + (4 * (pkv.warps + (heads_q // heads_kv) * list_rows // pkv.block_m)
                                      if sparse else 0)
        # per head (and batch entry): a varlen sequence's rows are padded to whole tiles each
        rows_padded = padded_rows(seqlen_q, batch, pad) if varlen else list_rows
        rows = (1 if varlen else batch) * heads_q * seqlen_q     # query rows of all heads
        wgmma = pkv.path == "wgmma"
        dqv, dkv, dvv = (grads[n][1] for n in ("dq", "dk", "dv"))
        if wgmma:
            layouts = (qv.shape, qv.strides, kv.shape, kv.strides, vv.shape, vv.strides, dov.strides)
            try:      # Q, K, V and dO as tensor maps (their strides inside)
                if layouts in self._untileable:
                    raise ValueError("known untileable")
                if sparse and dkdv_smem > _smem_optin(qv.device):
                    raise ValueError("the step list does not fit beside the wgmma pass's tiles")
                inputs = {"q_map": self._tensor_map("q", qv, pkv.block_m), "k_map": self._tensor_map("k", kv, pkv.block_n),
                          "v_map": self._tensor_map("v", vv, pkv.block_n),
                          "do_map": self._tensor_map("dout", dov, pkv.block_m)}
            except ValueError as exc:    # a layout the copy engine cannot address (e.g. a stride-0 expanded K/V),
                # or a step list longer than the wgmma pass's shared memory leaves room for (mma.sync's tiles are smaller)
                if self._fallback is None:
                    raise ValueError(f"backward: the Hopper dK/dV pass cannot take these inputs ({exc}); build the "
                                     "backward with path='mma_sync'") from None
                self._untileable.add(layouts)    # later calls skip the encoding attempt
                return self._fallback()(
                    q, k, v, out, lse, dout, scale=scale, dq=grads["dq"][0], dk=grads["dk"][0], dv=grads["dv"][0],
                    alibi_slopes=alibi_slopes, tensors=tensors, block_mask=block_mask, cu_seqlens_q=cu_seqlens_q,
                    cu_seqlens_k=cu_seqlens_k, position_shift=position_shift)
            # per padded query row: (LSE in base 2, delta)
            delta = _empty_like(qv, (batch, heads_q, rows_padded, 2)[varlen:], "fp32")
            stats = {"lse": lv.ptr, "row_stats": _view("row_stats", delta).ptr, "rows_padded": rows_padded}
            inputs["row_stats"] = stats["row_stats"]
            delta_rows = batch * heads_q * rows_padded if not varlen else heads_q * rows_padded
        else:
            delta = _empty_like(qv, lse_shape, "fp32")
            stats = {"delta": _view("delta", delta).ptr}
            inputs = {"q": qv.ptr, "k": kv.ptr, "v": vv.ptr, "dout": dov.ptr, "lse": lv.ptr, "delta": stats["delta"],
                      **stride_args("q", qv), **stride_args("k", kv), **stride_args("v", vv), **stride_args("do", dov)}
            delta_rows = rows
        import cupy

        varlen_rows = {}       # a varlen helper's way from a row to its sequence (delta, dQ conversion)
        with cupy.cuda.Device(qv.device), _current_stream(qv):
            if varlen:      # the schedules, on this stream: key tiles (dK/dV), query tiles (dQ), padded rows
                totals = (seqlen_q, seqlen_k)
                capacity = grid_tiles(seqlen_k, batch, pkv.block_n)
                *_, info = schedule(self._schedule, VARLEN_SCHEDULE, qv, cu_q, cu_k, batch, totals, True, pkv.block_n,
                                    True, False, capacity, keep)
                dkdv_sizes = varlen_sizes(info, seqlen_q, seqlen_k)
                if pq is not None:
                    capacity = grid_tiles(seqlen_q, batch, pq.block_m)
                    *_, info = schedule(self._schedule, VARLEN_SCHEDULE, qv, cu_q, cu_k, batch, totals, False,
                                        pq.block_m, True, variant.reverse_query_tiles, capacity, keep)
                    dq_sizes = varlen_sizes(info, seqlen_q, seqlen_k)
                else:       # each sequence's rows padded to whole query steps (its tiles, in sequence order)
                    _, padded_tiles, _ = schedule(self._schedule, VARLEN_SCHEDULE, qv, cu_q, cu_k, batch, totals,
                                                  False, pkv.block_m, False, False, 0, keep)
                    varlen_rows = {"cu_seqlens_q": cu_q.ptr, "padded_tiles": padded_tiles, "batch_size": batch}
                    if wgmma:
                        stats.update(varlen_rows)
            else:
                dkdv_sizes = dq_sizes = batch_sizes
            self._delta((math.ceil(delta_rows / DELTA_ROWS_PER_CTA),), (32 * DELTA_ROWS_PER_CTA,), self._signatures[
                "backward_delta"].pack({"o": ov.ptr, "dout": dov.ptr, **stats, **stride_args("o", ov),
                                        **stride_args("do", dov), "seqlen_q": seqlen_q, "heads_q": heads_q,
                                        "rows": delta_rows}))
            if pq is not None:
                dq_smem = pq.smem_bytes + tile_list_bytes(spec, pq.warps, pq.block_n, seqlen_k)
                dq_grid = ((heads_q * pq.n_chunks * grid_tiles(seqlen_q, batch, pq.block_m),) if varlen else
                           (math.ceil(seqlen_q / pq.block_m), heads_q * pq.n_chunks, batch))
                self._dq(dq_grid, (pq.threads,),
                         self._signatures["backward_dq"].pack({
                             "q": qv.ptr, "k": kv.ptr, "v": vv.ptr, "dout": dov.ptr, "lse": lv.ptr, "delta": stats["delta"],
                             "dq": dqv.ptr, **stride_args("q", qv), **stride_args("k", kv), **stride_args("v", vv),
                             **stride_args("do", dov), **stride_args("dq", dqv), **dq_sizes, **sizes, **layout_dq,
                             **mods}),
                         shared_mem=ensure_dynamic_smem(self._dq, dq_smem, "backward dQ:"))
                fused = {}
            else:           # the dK/dV pass adds dQ into a zeroed fp32 buffer, rows_padded rows per head
                dq_accum = _zeros_like(qv, (batch, heads_q, rows_padded, pkv.head_dim_padded)[varlen:])
                fused = {"dq_accum": _view("dq_accum", dq_accum).ptr, "dq_rows_padded": rows_padded}
                if varlen:
                    fused["padded_tiles"] = varlen_rows["padded_tiles"]
            if varlen:      # CTAs over (kv head and chunk, scheduled key tile), heads fastest
                grid = (heads_kv * pkv.n_chunks * grid_tiles(seqlen_k, batch, pkv.block_n), 1, 1)
            else:
                grid = (math.ceil(seqlen_k / pkv.block_n), heads_kv * pkv.n_chunks, batch)
            dkdv_smem = ensure_dynamic_smem(self._dkdv, dkdv_smem, "backward dK/dV: seqlen_q and the GQA group need")
            dkdv_args = self._signatures["backward_dkdv"].pack({
                **inputs, "dk": dkv.ptr, "dv": dvv.ptr, **fused, **stride_args("dk", dkv), **stride_args("dv", dvv),
                **dkdv_sizes, **sizes, **layout_dkdv, **mods})
            if wgmma:
                ArgumentBlock(self._dkdv.kernel.ptr, grid, (pkv.threads, 1, 1), dkdv_smem,
                              dkdv_args).launch(_stream_handle(qv))
            else:
                self._dkdv(grid, (pkv.threads,), dkdv_args, shared_mem=dkdv_smem)
            if pq is None:
                pairs = rows * ((spec.head_dim + 1) // 2)       # an odd head dim's last pair has one column
                self._dq_convert((math.ceil(pairs / CONVERT_THREADS),), (CONVERT_THREADS,), self._signatures[
                    "backward_dq_convert"].pack({
                        "dq_accum": fused["dq_accum"], "dq": dqv.ptr, **stride_args("dq", dqv), "seqlen_q": seqlen_q,
                        "heads_q": heads_q, "rows_padded": rows_padded, "scale": scale, "pairs": pairs,
                        **varlen_rows}))
        return grads["dq"][0], grads["dk"][0], grads["dv"][0]


@functools.lru_cache(maxsize=None)
def _smem_optin(device: int) -> int:
    """The most dynamic shared memory a block of this GPU may opt in to."""
    import cupy

    return cupy.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"]


def _zeros_like(ref, shape):
    """A zeroed fp32 array in ref's library, on ref's device and (torch) the current stream."""
    buffer = _empty_like(ref, shape, "fp32")
    if ref.kind == "torch":
        return buffer.zero_()
    buffer.fill(0)                     # CuPy's current stream: the caller enters the input's stream
    return buffer


def _row_major_view(name, x, shape, dtype, ref, vector=None, varlen=False):
    """A view of an [b, s, h, d] argument: same library and device as q, the spec's dtype, last dim
    contiguous, rows aligned for the kernels' global accesses of `vector` elements (the variant's
    global_vector), any other strides. By default ELEMENT_ALIGN (16-byte rows) where d is a multiple of it,
    else 1: kernels whose head dims are not multiples of 8 move single elements. varlen: x is a packed
    [total, h, d] array, viewed as a batch of one."""
    view = _view(name, x)
    if vector is None:
        vector = ELEMENT_ALIGN if shape[-1] % ELEMENT_ALIGN == 0 else 1
    if view.kind != ref.kind or view.shape != tuple(shape) or view.dtype != dtype or view.strides[-1] != 1 \
            or any(s % vector for s in view.strides[:-1]) or view.ptr % (2 * vector) or view.device != ref.device:
        raise ValueError(f"{name}: expected a {ref.kind} {dtype} array of shape {list(shape)} on device {ref.device}, "
                         f"last dim contiguous, rows {2 * vector}-byte aligned; got {view.dtype} {list(view.shape)} "
                         f"with strides {view.strides}")
    return packed(view) if varlen else view
