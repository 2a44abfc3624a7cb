"""Ring attention's logic on the CPU (issue 18): world sizes 2, 3 and 4 spawned as processes over the gloo
backend, the float64 ReferenceKernels standing in for attngen's kernels. Every rank's output, LSE and gradients,
gathered, must equal the whole sequence's float64 attention and its autograd gradients: this checks the
sharding (zigzag and contiguous), the global positions handed to each pair, the block skipping, the LSE merging
and the backward's accumulation and last hop home."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from attngen import distributed as ring_mod  # noqa: E402


def whole_attention(q, k, v, causal, window, scale):
    """float64 attention of the whole sequence (autograd), its lse beside."""
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    n = q.shape[1]
    positions = torch.arange(n)
    hidden = ring_mod._hidden(positions[:, None], positions[None, :], causal, window)
    s = s.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, port, case, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                             # every rank draws the same whole sequence
        layout, causal, window, heads = case["layout"], case["causal"], case["window"], case["heads"]
        n = case["chunk"] * (2 * world if layout == "zigzag" else world)
        q = torch.randn(2, n, heads[0], 16, dtype=torch.float64)
        k, v = (torch.randn(2, n, heads[1], 16, dtype=torch.float64) for _ in range(2))
        dout = torch.randn(2, n, heads[0], 16, dtype=torch.float64)
        mine = [ring_mod.shard(x, layout=layout).clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = ring_mod.ring_attention(*mine, causal=causal, window=window, layout=layout, return_lse=True,
                                           kernels=ring_mod.ReferenceKernels())
        out.backward(ring_mod.shard(dout, layout=layout))
        gathered = {name: ring_mod.unshard(x.detach(), layout=layout, dim=dim) for name, x, dim in (
            ("out", out, 1), ("lse", lse, 2), ("dq", mine[0].grad, 1), ("dk", mine[1].grad, 1), ("dv", mine[2].grad, 1))}
        if rank == 0:
            whole = [x.clone().requires_grad_(True) for x in (q, k, v)]
            ref, ref_lse = whole_attention(*whole, causal, window, 1 / math.sqrt(16))
            ref.backward(dout)
            expected = {"out": ref, "lse": ref_lse, "dq": whole[0].grad, "dk": whole[1].grad, "dv": whole[2].grad}
            errors = {}
            for name, want in expected.items():
                got, want = gathered[name], want.detach()
                same_inf = torch.equal(torch.isinf(got), torch.isinf(want))
                finite = torch.isfinite(want)
                errors[name] = (same_inf, (got[finite] - want[finite]).abs().max().item() if finite.any() else 0.0)
            torch.save(errors, results)
    finally:
        dist.destroy_process_group()


CASES = [
    dict(layout="zigzag", causal=True, window=None, heads=(4, 2), chunk=5),
    dict(layout="zigzag", causal=False, window=None, heads=(2, 2), chunk=4),
    dict(layout="contiguous", causal=True, window=None, heads=(4, 1), chunk=7),
    dict(layout="zigzag", causal=True, window=(6, 0), heads=(2, 1), chunk=4),      # most pairs skipped
    dict(layout="contiguous", causal=False, window=(3, 2), heads=(2, 2), chunk=6),
]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['layout']}-{'causal' if c['causal'] else 'full'}"
                                                      f"-w{c['window']}-h{c['heads'][0]}x{c['heads'][1]}")
def test_ring_attention_equals_the_whole_sequence(world, case):
    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "errors.pt")
        mp.spawn(_run, args=(world, _free_port(), case, results), nprocs=world, join=True)
        errors = torch.load(results)
    for name, (same_inf, err) in errors.items():
        assert same_inf, f"{name}: -inf where the whole sequence has none (or the reverse)"
        assert err < 1e-10, f"{name}: max error {err:.3g} against the whole sequence"


def test_pair_skipping_and_chunk_positions():
    # zigzag over 3 ranks, 4-row chunks: rank 1 holds chunks 1 and 4 -> global rows 4..7 and 16..19
    assert ring_mod.chunk_starts("zigzag", 1, 3, 8) == [(4, 0), (16, 4)]
    assert ring_mod.chunk_starts("contiguous", 2, 3, 8) == [(16, 0)]
    assert ring_mod.pair_visible(4, 4, 16, 4, True, None) is False          # keys after every query
    assert ring_mod.pair_visible(16, 4, 4, 4, True, None) is True
    assert ring_mod.pair_visible(16, 4, 4, 4, True, (6, 0)) is False        # too far back for the window
    assert ring_mod.pair_visible(16, 4, 12, 4, True, (6, 0)) is True


def test_refusals_name_the_argument():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="layout"):
        ring_mod.ring_attention(q, q, q, layout="striped")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_mod.ring_attention(q, q, q)
