"""Ring attention on several GPUs (issue 18): 2 (and 4 where present) ranks over NCCL, attngen's kernels on
every pair, bf16. The gathered output and gradients against the whole sequence's float64 reference (the DESIGN
criterion, with one bf16 rounding per ring step allowed for the partial outputs and gradient shares). Skipped
on a machine with fewer than two GPUs; the ring's logic runs on the CPU in tests/test_ring_cpu.py."""

from __future__ import annotations

import math
import os
import socket
import tempfile

import numpy as np
import pytest

from conftest import gpu_count

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(gpu_count() < 2, reason="needs two or more GPUs")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, world, port, causal, window, results):
    import torch.distributed as dist

    from attngen import distributed as ring_mod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
        gen = torch.Generator().manual_seed(0)                 # the same whole sequence on every rank
        n = 2 * world * 384
        q, k, v, dout = (torch.randn(1, n, h, 128, generator=gen).to("cuda", torch.bfloat16) for h in (8, 2, 2, 8))
        mine = [ring_mod.shard(x).clone().requires_grad_(True) for x in (q, k, v)]
        out = ring_mod.ring_attention(*mine, causal=causal, window=window)
        out.backward(ring_mod.shard(dout))
        gathered = [ring_mod.unshard(x.detach()).cpu() for x in (out, *(m.grad for m in mine))]
        if rank == 0:
            torch.save({"whole": [x.cpu() for x in (q, k, v, dout)], "ring": gathered}, results)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [w for w in (2, 4) if w <= max(gpu_count(), 2)])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, (700, 0))])
def test_ring_over_gpus_equals_the_whole_sequence(world, causal, window):
    import torch.multiprocessing as mp

    from attngen.tools.checking import framework_attention
    from attngen.tools.reference import attention_reference, attention_reference_backward

    with tempfile.TemporaryDirectory() as folder:
        results = os.path.join(folder, "ring.pt")
        mp.spawn(_run, args=(world, _free_port(), causal, window, results), nprocs=world, join=True)
        saved = torch.load(results)
    q, k, v, dout = saved["whole"]
    n = q.shape[1]
    positions = np.arange(n)
    visible = np.ones((n, n), dtype=bool)
    if causal:
        visible &= positions[None, :] <= positions[:, None]
    if window is not None:
        visible &= positions[None, :] >= positions[:, None] - window[0]
    mask = visible[None]
    as64 = [x.double().numpy() for x in (q, k, v, dout)]
    ref, _ = attention_reference(*as64[:3], mask=mask)
    ref_grads = attention_reference_backward(*as64, mask=mask)
    same = [x.cuda().requires_grad_(True) for x in (q, k, v)]
    framework_out = framework_attention(*same, False, 1 / math.sqrt(128), mask=mask)
    framework_out.backward(dout.cuda())
    rounding = 2 * world * 2.0 ** -9          # a bf16 rounding of each step's partial result
    for name, got, theirs, want in zip(("out", "dq", "dk", "dv"), saved["ring"],
                                       (framework_out, *(x.grad for x in same)), (ref, *ref_grads)):
        err = np.max(np.abs(got.double().numpy() - want))
        bound = 2 * np.max(np.abs(theirs.detach().double().cpu().numpy() - want)) + 1e-5 + rounding * np.max(np.abs(want))
        assert err <= bound, f"{name}: max|ring - ref64| = {err:.3g} > {bound:.3g}"
