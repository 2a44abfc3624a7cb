"""Ring attention over torch.distributed: one sequence sharded over the ranks of a process group (context
parallelism), each rank holding a shard of Q, K and V.

    out = attngen.distributed.ring_attention(q, k, v, causal=True)     # q, k, v: this rank's shard

The K/V blocks travel around the ring (rank r sends to r + 1, receives from r - 1). At each of the world-size
steps a rank attends its query chunks to the block it holds, with the global positions of both
(attention's position_offsets), and merges the result into its running (out, LSE) with merge_attention;
the next block's transfer runs meanwhile (NCCL's own stream: `work.wait()` only orders the next use). Pairs
no query can see (causal, a window) are skipped. The backward runs the ring again: every pair's gradients
from the merged out and LSE (attention_backward), dK and dV travelling with their block, one last hop home.

Sharding (`layout`): "zigzag" (default) splits the sequence into 2 x world chunks and gives rank r chunks r
and 2 x world - 1 - r, head and tail, so causal work is even across ranks; "contiguous" gives rank r chunk r.
`shard(x, group)` / `unshard(x, group)` convert a whole sequence and back.

`kernels` computes one (query chunk, key block) pair: attngen's kernels by default; `ReferenceKernels` is a
float64 torch implementation of the same contract (CPU or GPU), what the CPU tests run with the gloo backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .merge import merge_attention

LAYOUTS = ("zigzag", "contiguous")


class AttngenKernels:
    """One pair through attngen: forward (out, lse) and backward (dq, dk, dv) with global position offsets."""

    def forward(self, q, k, v, *, causal, scale, window, position_offsets, deterministic):
        from .api import attention

        return attention(q, k, v, causal=causal, scale=scale, window=window, position_offsets=position_offsets,
                         return_lse=True)

    def backward(self, q, k, v, out, lse, dout, *, causal, scale, window, position_offsets, deterministic):
        from .api import attention_backward

        return attention_backward(q, k, v, out, lse.contiguous(), dout.contiguous(), causal=causal, scale=scale,
                                  window=window, position_offsets=position_offsets, deterministic=deterministic)


class ReferenceKernels:
    """The same contract in float64 torch (naive attention over global positions): the stand-in for the kernels
    in tests without a GPU. Gradients from the given (merged) out and lse, as the kernels compute them."""

    def _masked_scores(self, q, k, causal, scale, window, position_offsets):
        """scale q.k over global positions, hidden pairs -inf ([b, h, q, k] float64), and the GQA group size."""
        group = q.shape[2] // k.shape[2]
        kk = k.double().repeat_interleave(group, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
        q_pos = position_offsets[0] + torch.arange(q.shape[1], device=q.device)[:, None]
        k_pos = position_offsets[1] + torch.arange(k.shape[1], device=q.device)[None, :]
        hidden = _hidden(q_pos, k_pos, causal, window)
        return s.masked_fill(hidden, -math.inf), group

    def forward(self, q, k, v, *, causal, scale, window, position_offsets, deterministic):
        s, group = self._masked_scores(q, k, causal, scale, window, position_offsets)
        lse = torch.logsumexp(s, dim=-1)                                     # [b, h, q]; -inf: no key
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        out = torch.einsum("bhqk,bkhd->bqhd", p, v.double().repeat_interleave(group, dim=2))
        return out.to(q.dtype), lse if q.dtype == torch.float64 else lse.float()

    def backward(self, q, k, v, out, lse, dout, *, causal, scale, window, position_offsets, deterministic):
        s, group = self._masked_scores(q, k, causal, scale, window, position_offsets)
        lse = lse.double()
        p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])    # this block's share of P
        vv = v.double().repeat_interleave(group, dim=2)
        do = dout.double()
        dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
        dp = torch.einsum("bqhd,bkhd->bhqk", do, vv)
        delta = (do * out.double()).sum(-1).transpose(1, 2)                      # [b, h, q]
        ds = p * (dp - delta[..., None]) * scale
        dq = torch.einsum("bhqk,bkhd->bqhd", ds, k.double().repeat_interleave(group, dim=2))
        dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.double())

        def fold(x):                                     # query heads of a GQA group add into their KV head
            return x.unflatten(2, (k.shape[2], group)).sum(3)
        return dq.to(q.dtype), fold(dk).to(k.dtype), fold(dv).to(v.dtype)


def _hidden(q_pos, k_pos, causal, window):
    hidden = torch.zeros(q_pos.shape[0], k_pos.shape[1], dtype=torch.bool, device=q_pos.device)
    if causal:
        hidden |= k_pos > q_pos
    if window is not None:
        left, right = window
        if left >= 0:
            hidden |= k_pos < q_pos - left
        if right >= 0:
            hidden |= k_pos > q_pos + right
    return hidden


def chunk_starts(layout: str, rank: int, world: int, local: int) -> list[tuple[int, int]]:
    """(global start, local row) of each chunk a rank holds: zigzag chunks r and 2 x world - 1 - r of local / 2
    rows each; contiguous chunk r of local rows."""
    if layout == "zigzag":
        half = local // 2
        return [(rank * half, 0), ((2 * world - 1 - rank) * half, half)]
    return [(rank * local, 0)]


def pair_visible(q_start: int, q_rows: int, k_start: int, k_rows: int, causal: bool, window) -> bool:
    """Whether any key of [k_start, k_start + k_rows) is visible to a query of [q_start, q_start + q_rows): the
    ring's block skipping (positions are global)."""
    q_last, k_last = q_start + q_rows - 1, k_start + k_rows - 1
    if causal and k_start > q_last:
        return False
    if window is not None:
        left, right = window
        if left >= 0 and k_last < q_start - left:
            return False
        if right >= 0 and k_start > q_last + right:
            return False
    return True


@dataclass(frozen=True)
class _Ring:
    """Who this rank talks to, and what every rank holds."""

    group: object
    rank: int
    world: int
    send_to: int        # global ranks
    receive_from: int
    layout: str

    @classmethod
    def of(cls, group, layout: str) -> "_Ring":
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        peer = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
        return cls(group, rank, world, peer((rank + 1) % world), peer((rank - 1) % world), layout)

    def exchange(self, tensors: list) -> tuple[list, list]:
        """Start sending `tensors` to the next rank and receiving the previous rank's into new buffers; returns
        (buffers, works). Wait on the works before reading the buffers or writing the tensors."""
        buffers = [torch.empty_like(t) for t in tensors]
        if dist.get_backend(self.group) == "nccl":
            ops = [dist.P2POp(dist.isend, t, self.send_to, self.group) for t in tensors]
            ops += [dist.P2POp(dist.irecv, b, self.receive_from, self.group) for b in buffers]
            return buffers, dist.batch_isend_irecv(ops)
        works = []
        for t, b in zip(tensors, buffers):     # even ranks send first: no two neighbours both wait to receive
            if self.rank % 2 == 0:
                works += [dist.isend(t, self.send_to, self.group), dist.irecv(b, self.receive_from, self.group)]
            else:
                works += [dist.irecv(b, self.receive_from, self.group), dist.isend(t, self.send_to, self.group)]
        return buffers, works


def _wait(works) -> None:
    for work in works:
        work.wait()


def _ring_forward(ring: _Ring, q, k, v, kernels, options):
    """(out, lse) of this rank's queries over the whole sequence, and the pairs it computed."""
    chunks = chunk_starts(ring.layout, ring.rank, ring.world, q.shape[1])
    rows, k_rows = q.shape[1] // len(chunks), k.shape[1] // len(chunks)
    merged = [None] * len(chunks)
    block = [k, v]
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world          # whose K/V block this rank holds now
        if step + 1 < ring.world:
            incoming, works = ring.exchange(block)
        for i, (q_start, q_row) in enumerate(chunks):
            qc = q[:, q_row:q_row + rows]
            for k_start, k_row in chunk_starts(ring.layout, source, ring.world, k.shape[1]):
                if not pair_visible(q_start, rows, k_start, k_rows, options["causal"], options["window"]):
                    continue
                part = kernels.forward(qc, block[0][:, k_row:k_row + k_rows], block[1][:, k_row:k_row + k_rows],
                                       position_offsets=(q_start, k_start), **options)
                merged[i] = part if merged[i] is None else merge_attention(*merged[i], *part)
        if step + 1 < ring.world:
            _wait(works)
            block = incoming
    outs, lses = [], []
    for i, m in enumerate(merged):
        if m is None:                                     # no key anywhere (a window that sees nothing)
            m = (q.new_zeros(*q.shape[:1], rows, q.shape[2], v.shape[3]),
                 torch.full((q.shape[0], q.shape[2], rows), -math.inf, device=q.device,
                            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32))
        outs.append(m[0])
        lses.append(m[1])
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _ring_backward(ring: _Ring, q, k, v, out, lse, dout, kernels, options):
    """(dq, dk, dv) of this rank's shard. Each pair's share comes from the merged out and lse; a block's dK and dV
    accumulate (fp32) as it travels: at each step a rank adds its share, then passes the sums on with the block,
    and after the last step one more hop brings every block's sums home."""
    chunks = chunk_starts(ring.layout, ring.rank, ring.world, q.shape[1])
    rows, k_rows = q.shape[1] // len(chunks), k.shape[1] // len(chunks)
    accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=accumulate, device=q.device)
    block, sums, sum_works = [k, v], None, []
    for step in range(ring.world):
        source = (ring.rank - step) % ring.world
        if step + 1 < ring.world:
            incoming, works = ring.exchange(block)
        dk = torch.zeros(k.shape, dtype=accumulate, device=k.device)
        dv = torch.zeros(v.shape, dtype=accumulate, device=v.device)
        for q_start, q_row in chunks:
            qs = slice(q_row, q_row + rows)
            for k_start, k_row in chunk_starts(ring.layout, source, ring.world, k.shape[1]):
                if not pair_visible(q_start, rows, k_start, k_rows, options["causal"], options["window"]):
                    continue
                ks = slice(k_row, k_row + k_rows)
                g = kernels.backward(q[:, qs], block[0][:, ks], block[1][:, ks], out[:, qs], lse[:, :, qs],
                                     dout[:, qs], position_offsets=(q_start, k_start), **options)
                dq[:, qs] += g[0].to(accumulate)
                dk[:, ks] += g[1].to(accumulate)
                dv[:, ks] += g[2].to(accumulate)
        _wait(sum_works)                                  # the sums earlier ranks made for this block
        if sums is not None:
            dk, dv = dk + sums[0], dv + sums[1]
        if ring.world > 1:                                # on with the block (the last hop: home)
            sums, sum_works = ring.exchange([dk, dv])
        else:
            sums = [dk, dv]
        if step + 1 < ring.world:
            _wait(works)
            block = incoming
    _wait(sum_works)
    return dq.to(q.dtype), sums[0].to(k.dtype), sums[1].to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring, kernels, options):
        out, lse = _ring_forward(ring, q, k, v, kernels, options)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.kernels, ctx.options = ring, kernels, options
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(ctx.ring, q, k, v, out, lse, dout, ctx.kernels, ctx.options)
        return dq, dk, dv, None, None, None


def ring_attention(q, k, v, group=None, causal: bool = False, scale: float | None = None, window=None,
                   layout: str = "zigzag", deterministic: bool = False, return_lse: bool = False, kernels=None):
    """Attention of this rank's query shard over the whole sequence, sharded over `group` (module doc).

    q [batch, local, heads_q, head_dim], k and v [batch, local, heads_kv, ...]: this rank's shard in `layout`
    ("zigzag": chunks r and 2 x world - 1 - r of local / 2 rows each, local even; "contiguous": chunk r), torch
    tensors on this rank's device; every rank holds the same local length. causal and window=(left, right)
    compare global positions (-1: no limit on that side); GQA as attention(). deterministic: the pairs' dQ in
    attngen's own pass (the ring's sums run in a fixed order). Returns out [batch, local, heads_q, head_dim_v]
    in q's dtype (and lse [batch, heads_q, local] fp32 if asked); differentiable."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a torch tensor [batch, local, heads, head_dim], got "
                             f"{type(x).__name__}{list(getattr(x, 'shape', []))}")
    if k.shape[:3] != v.shape[:3] or k.shape[1] != q.shape[1] or k.shape[0] != q.shape[0]:
        raise ValueError(f"q, k, v: expected one batch and local length, k and v the same heads, got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"q: a zigzag shard holds two chunks of equal length, got an odd local length {q.shape[1]}")
    if window is not None:
        window = tuple(int(w) for w in window)
        if causal:
            window = (window[0], 0)
    ring = _Ring.of(group, layout)
    options = dict(causal=bool(causal), scale=1 / math.sqrt(q.shape[-1]) if scale is None else float(scale),
                   window=window, deterministic=bool(deterministic))
    out, lse = _RingAttention.apply(q, k, v, ring, kernels or AttngenKernels(), options)
    return (out, lse) if return_lse else out


def shard(x, group=None, layout: str = "zigzag", dim: int = 1):
    """This rank's shard of a whole sequence x (along dim) in `layout`."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if layout == "zigzag":
        chunks = x.chunk(2 * world, dim=dim)
        return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=dim)
    return x.chunk(world, dim=dim)[rank]


def unshard(x, group=None, layout: str = "zigzag", dim: int = 1):
    """The whole sequence from every rank's shard x (an all_gather; no autograd)."""
    world = dist.get_world_size(group)
    pieces = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    if layout == "zigzag":
        halves = [p.chunk(2, dim=dim) for p in pieces]
        return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim=dim)
    return torch.cat(pieces, dim=dim)
