"""GPU stress test (issue 12, finding 1): three threads, each on its own stream with its own spec, masks and
per-call tensors rebuilt for every call, the legacy default stream held busy, and every result checked
against the float64 reference (ARCHITECTURE.md criterion) once everything has finished.

What makes a launcher bug show here:

- Before every call a long sleep kernel is queued on the legacy default stream (torch.cuda.default_stream(),
  handle 0, which is also CuPy's null stream). The threads' streams are non-blocking, so their kernels do not
  wait for it; but a per-call buffer the launcher writes on another library's default stream (a block layout,
  a block table, the standard ALiBi slopes, a zeroed dQ buffer) is written only after that sleep, i.e. after
  the kernel that reads it has run. ARCHITECTURE.md ("Per-call data"): every buffer a launch reads is written on the
  launch's stream.
- A short sleep on the thread's own stream before every call keeps that call's kernels queued while the host
  goes on: the call's BlockMask and slopes tensor are dropped and garbage-collected, and the next masks are
  uploaded. A buffer freed or reused under a queued kernel (a full cache of device arrays cleared, an array
  whose owner is gone) then gives a wrong result. The BlockMask thread uploads more layouts than the launcher
  caches (64 arrays per kernel on issue 12's main), so a cache that evicts or clears when full does so mid-run.
- Results are read only after all threads have joined and the device is synchronized, so the check itself
  never orders anything.

On the main of issue 12 (0ab74b2) the torch test fails on an H200 (an illegal memory access; wrong outputs
where the process survives); it passes once every per-call buffer is written on the launch's stream and kept
alive until the kernels that read it have finished. The CuPy variant guards the same contract for CuPy
callers (uploads on CuPy's current stream, a non-blocking one here); it already passes on that main, whose
uploads for CuPy inputs go to CuPy's current stream. Run this file on its own: a failure can leave the CUDA
context unusable for every later test of the process.
"""

from __future__ import annotations

import gc
import math
import threading
import traceback

import numpy as np
import pytest

import attngen
from attngen.masks import BlockMask, SlidingWindow
from attngen.tools.reference import (acceptance_check, alibi_slopes, attention_reference, attention_reference_backward,
                               attention_same_dtype_reference)

pytestmark = pytest.mark.gpu

LEGACY_SLEEP_CYCLES = 40_000_000     # ~20 ms at ~2 GHz, queued on the legacy default stream before every call
SIDE_SLEEP_CYCLES = 4_000_000        # ~2 ms on the thread's own stream: the call's kernels stay queued a while
ITERATIONS = 24
from attngen.runtime.uploads import MAX_CACHED_UPLOADS as CACHED_UPLOADS   # noqa: E402  (the uploads cache's size)
# the BlockMask threads upload three layouts per iteration (two forward CSRs, one kv-major CSR for the backward),
# more than the cache holds: it evicts (or clears) while kernels that read its arrays may still be queued
MASK_ITERATIONS = max(ITERATIONS, math.ceil((CACHED_UPLOADS + 8) / 3))
JOIN_TIMEOUT_S = 600
LSE_TOL = 5e-3

DENSE_SHAPES = ((77, 203), (256, 256), (203, 77))       # (seqlen_q, seqlen_k); 203x77 has rows that see no key
MASK_SHAPES = ((300, 517), (203, 333), (129, 129))
MOD_SHAPES = ((211, 300), (77, 203), (300, 211))
WINDOWS = (48, 96)
SOFTCAP = 15.0


# ---------------------------------------------------------------------------------------------- helpers


def to64(x) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    import cupy

    return cupy.asnumpy(x).astype(np.float64)


def cdiv(a, b):
    return -(-a // b)


def window_mask(window, sq, sk):
    """attention(causal=True, window=(w, 0))'s mask: the causal sliding window, bool [1, sq, sk]."""
    return SlidingWindow(window, 0).element(0, np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk)[None]


def random_grid(rng, heads, sq, sk, block):
    return rng.random((heads, cdiv(sq, block), cdiv(sk, block))) < 0.5


def busy_legacy_stream():
    """A sleep kernel on the legacy default stream: whatever is enqueued there after it runs ~20 ms later."""
    import torch

    with torch.cuda.stream(torch.cuda.default_stream()):
        torch.cuda._sleep(LEGACY_SLEEP_CYCLES)


def forward_problems(rec) -> list[str]:
    """ARCHITECTURE.md's criterion on out; LSE -inf exactly where the reference's is, the rest within LSE_TOL."""
    q, k, v = (to64(x) for x in rec["qkv"])
    mask = rec["mask"]() if callable(rec["mask"]) else rec["mask"]
    mods = rec.get("mods", {})
    ref, ref_lse = attention_reference(q, k, v, causal=rec["causal"], mask=mask, **mods)
    same, _ = attention_same_dtype_reference(q, k, v, causal=rec["causal"], mask=mask, dtype=rec["dtype"], **mods)
    ok, err, bound = acceptance_check(to64(rec["out"]), same, ref)
    problems = [] if ok else [f"out: max|out - ref64| = {err:.3g} > bound {bound:.3g}"]
    lse = to64(rec["lse"])
    if not np.array_equal(np.isneginf(lse), np.isneginf(ref_lse)):
        problems.append("lse: the -inf pattern differs from the reference's")
    finite = np.isfinite(ref_lse)
    if finite.any():
        with np.errstate(invalid="ignore"):
            lse_err = float(np.max(np.abs(lse[finite] - ref_lse[finite])))
        if not lse_err < LSE_TOL:                                          # NaN fails too
            problems.append(f"lse: max error {lse_err:.3g} >= {LSE_TOL}")
    return problems


def backward_problems(rec) -> list[str]:
    """ARCHITECTURE.md's criterion on dq, dk, dv: float64 reference, bounded by the same-dtype framework's error."""
    import torch

    from attngen.tools.checking import framework_attention

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[rec["dtype"]]
    q, k, v, dout = (to64(x) for x in (*rec["qkv"], rec["dout"]))
    mask = rec["mask"]() if callable(rec["mask"]) else rec["mask"]
    scale = 1 / math.sqrt(q.shape[-1])
    ref = attention_reference_backward(q, k, v, dout, causal=rec["causal"], scale=scale, mask=mask)
    same = [torch.tensor(x, device="cuda", dtype=dtype, requires_grad=True) for x in (q, k, v)]   # exact copies
    framework_attention(*same, rec["causal"], scale, mask=mask).backward(torch.tensor(dout, device="cuda", dtype=dtype))
    problems = []
    for name, mine, theirs, r in zip(("dq", "dk", "dv"), rec["grads"], same, ref):
        ok, err, bound = acceptance_check(to64(mine), to64(theirs.grad), r)
        if not ok:
            problems.append(f"{name}: max|grad - ref64| = {err:.3g} > bound {bound:.3g}")
    return problems


def run_threads(workers) -> list[dict]:
    """Start (name, target) workers, each target(records) appending its results; join; synchronize."""
    import torch

    records, errors = {name: [] for name, _ in workers}, []

    def guarded(name, target):
        try:
            target(records[name])
        except BaseException:                  # noqa: BLE001 - reported below with its traceback
            errors.append(f"thread {name}:\n{traceback.format_exc()}")

    threads = [threading.Thread(target=guarded, args=(name, target), name=name, daemon=True)
               for name, target in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT_S)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"threads still running after {JOIN_TIMEOUT_S} s: {alive}"
    torch.cuda.synchronize()                   # every stream, the legacy one and its sleeps included
    assert not errors, "\n".join(errors)
    return [dict(r, thread=name) for name, recs in records.items() for r in recs]


def check_all(records, expected_counts) -> None:
    counts = {}
    for r in records:
        counts[r["thread"]] = counts.get(r["thread"], 0) + 1
    assert counts == expected_counts, f"results per thread {counts}, expected {expected_counts}"
    failures = []
    for r in records:
        problems = forward_problems(r) if r["kind"] == "fwd" else backward_problems(r)
        if problems:
            failures.append(f"{r['thread']} iteration {r['iteration']} {r['label']}: " + "; ".join(problems))
    assert not failures, (f"{len(failures)} of {len(records)} results differ from the float64 reference:\n"
                          + "\n".join(failures[:15]) + ("\n..." if len(failures) > 15 else ""))


# ------------------------------------------------------------------------------------------------ torch


def torch_loop(iterations, seed, call):
    """A worker on its own torch stream: busy legacy stream, a short sleep on its stream, the call (inputs made
    on its stream), then its masks and tensors dropped and collected before the next iteration."""
    import torch

    def target(records):
        stream = torch.cuda.Stream()                   # torch's pool streams are non-blocking
        gen = torch.Generator(device="cuda").manual_seed(seed)
        rng = np.random.default_rng(seed)
        for it in range(iterations):
            busy_legacy_stream()
            with torch.cuda.stream(stream):
                torch.cuda._sleep(SIDE_SLEEP_CYCLES)
                call(it, gen, rng, records)
            gc.collect()
    return target


def torch_qkv(gen, batch, sq, sk, hq, hkv, d, dtype):
    import torch

    return [torch.randn(batch, s, h, d, generator=gen, device="cuda", dtype=dtype)
            for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]


def dense_call(it, gen, rng, records):
    """Dense causal d64 bf16, GQA 4:2: forward and backward through autograd, and the plain no-grad call."""
    import torch

    sq, sk = DENSE_SHAPES[it % len(DENSE_SHAPES)]
    leaves = [x.requires_grad_(True) for x in torch_qkv(gen, 2, sq, sk, 4, 2, 64, torch.bfloat16)]
    out, lse = attngen.attention(*leaves, causal=True, return_lse=True)
    dout = torch.randn(out.shape, generator=gen, device="cuda", dtype=out.dtype)
    out.backward(dout)
    qkv = [x.detach() for x in leaves]
    with torch.no_grad():
        fast_out, fast_lse = attngen.attention(*qkv, causal=True, return_lse=True)
    common = dict(iteration=it, qkv=qkv, dtype="bf16", causal=True, mask=None)
    records.append(dict(common, kind="fwd", label=f"autograd fwd {sq}x{sk}", out=out.detach(), lse=lse))
    records.append(dict(common, kind="fwd", label=f"no-grad fwd {sq}x{sk}", out=fast_out, lse=fast_lse))
    records.append(dict(common, kind="bwd", label=f"autograd bwd {sq}x{sk}", dout=dout,
                        grads=[x.grad for x in leaves]))


def mask_call(it, gen, rng, records):
    """attention(..., block_mask=) with new BlockMasks every call (blocks of 128, per-head or shared, some
    with full blocks), d128 bf16, GQA 4:2: a forward, and a forward + backward through autograd."""
    import torch

    sq, sk = MASK_SHAPES[it % len(MASK_SHAPES)]
    heads = 4 if it % 2 == 0 else 1
    for backward in (False, True):
        grid = random_grid(rng, heads, sq, sk, 128)
        full = grid & (rng.random(grid.shape) < 0.3) if it % 3 == 1 else None
        block_mask = BlockMask.from_dense(grid, sq, sk, block_size=128, full=full)     # a new object every call
        qkv = torch_qkv(gen, 2, sq, sk, 4, 2, 128, torch.bfloat16)
        inputs = [x.requires_grad_(True) for x in qkv] if backward else qkv
        out, lse = attngen.attention(*inputs, block_mask=block_mask, return_lse=True)
        element = (lambda g=grid, f=full, sq=sq, sk=sk:
                   BlockMask.from_dense(g, sq, sk, block_size=128, full=f).element_mask())
        common = dict(iteration=it, qkv=[x.detach() for x in inputs], dtype="bf16", causal=False, mask=element)
        label = f"{'autograd' if backward else 'no-grad'} block_mask {heads}h {sq}x{sk}"
        records.append(dict(common, kind="fwd", label=label + " fwd", out=out.detach(), lse=lse))
        if backward:
            dout = torch.randn(out.shape, generator=gen, device="cuda", dtype=out.dtype)
            out.backward(dout)
            records.append(dict(common, kind="bwd", label=label + " bwd", dout=dout,
                                grads=[x.grad for x in inputs]))
        del block_mask, out                    # nothing of the call's but the recorded tensors outlives it


def modifier_spec(window, head_dim, dtype):
    """The spec attention(causal=True, window=(window, 0), softcap=SOFTCAP, alibi_slopes=...) runs, built
    directly: called without slopes, its kernel uploads ALiBi's standard slopes itself (attention() without
    alibi_slopes= would build a kernel with no ALiBi at all)."""
    return attngen.Spec(head_dim=head_dim, dtype=dtype, softcap=SOFTCAP, alibi=True,
                        mask={"kind": "sliding_window", "left": window, "right": 0})


def modifier_call(it, gen, rng, records):
    """A causal sliding window (48 or 96 keys), softcap 15 and ALiBi with per-call slopes ([batch, heads] or
    [heads], made on this stream, through attention()) or the kernel's standard ones (uploaded by the
    launcher on first use for a head count); d128 fp16, 4 or 6 query heads over 2."""
    import torch

    sq, sk = MOD_SHAPES[it % len(MOD_SHAPES)]
    hq, window = (4, 6)[it % 2], WINDOWS[(it // 2) % 2]
    qkv = torch_qkv(gen, 2, sq, sk, hq, 2, 128, torch.float16)
    kind = it % 3
    if kind == 2:                                                  # the kernel's standard slopes
        host, slopes = alibi_slopes(hq), None
        out, lse = attngen.build(modifier_spec(window, 128, "fp16"))(*qkv)
    else:
        host = rng.uniform(0.02, 0.3, (2, hq) if kind == 0 else (hq,)).astype(np.float32)
        slopes = torch.from_numpy(host).to("cuda")                 # copied on this thread's stream
        out, lse = attngen.attention(*qkv, causal=True, window=(window, 0), softcap=SOFTCAP, alibi_slopes=slopes,
                                     return_lse=True)
    records.append(dict(iteration=it, kind="fwd", label=f"window {window} softcap alibi{list(host.shape)} {hq}h "
                        f"{sq}x{sk}", qkv=qkv, dtype="fp16", causal=False, mask=window_mask(window, sq, sk),
                        mods=dict(softcap=SOFTCAP, alibi_slopes=host), out=out, lse=lse))
    del slopes


def warm_up_torch():
    """Compile every kernel the threads use (main thread, default stream), with head counts and lengths the
    threads do not use, so that their first calls still upload their own layouts and slopes."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    leaves = [x.requires_grad_(True) for x in torch_qkv(gen, 1, 64, 64, 2, 1, 64, torch.bfloat16)]
    attngen.attention(*leaves, causal=True).sum().backward()
    with torch.no_grad():
        attngen.attention(*[x.detach() for x in leaves], causal=True)
    grid = np.ones((1, 1, 1), dtype=bool)
    leaves = [x.requires_grad_(True) for x in torch_qkv(gen, 1, 100, 100, 2, 1, 128, torch.bfloat16)]
    attngen.attention(*leaves, block_mask=BlockMask.from_dense(grid, 100, 100, block_size=128)).sum().backward()
    for window in WINDOWS:
        qkv = torch_qkv(gen, 1, 64, 64, 2, 1, 128, torch.float16)
        attngen.attention(*qkv, causal=True, window=(window, 0), softcap=SOFTCAP,
                          alibi_slopes=torch.full((2,), 0.1, device="cuda"))
        attngen.build(modifier_spec(window, 128, "fp16"))(*qkv)
    torch.cuda.synchronize()


def test_three_threads_on_torch_streams_with_a_busy_default_stream():
    torch = pytest.importorskip("torch")
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is needed to hold the default stream busy")
    warm_up_torch()
    records = run_threads([("dense", torch_loop(ITERATIONS, 1, dense_call)),
                           ("block_mask", torch_loop(MASK_ITERATIONS, 2, mask_call)),
                           ("modifiers", torch_loop(ITERATIONS, 3, modifier_call))])
    check_all(records, {"dense": 3 * ITERATIONS, "block_mask": 3 * MASK_ITERATIONS, "modifiers": ITERATIONS})


# ------------------------------------------------------------------------------------------------- CuPy


CUPY_MASK_SPEC = dict(head_dim=64, dtype="fp16", mask={"kind": "runtime", "block_size": 64})


def cupy_loop(iterations, seed, call):
    """A worker on its own non-blocking CuPy stream (CuPy's current stream inside the loop): busy legacy
    stream, a short sleep on its stream, the call, then its masks and arrays dropped and collected."""
    import cupy
    import torch

    def target(records):
        stream = cupy.cuda.Stream(non_blocking=True)
        side = torch.cuda.ExternalStream(stream.ptr)
        host_rng = np.random.default_rng(seed)
        with stream:
            rng = cupy.random.default_rng(seed)
        for it in range(iterations):
            busy_legacy_stream()
            with torch.cuda.stream(side):
                torch.cuda._sleep(SIDE_SLEEP_CYCLES)
            with stream:
                call(it, rng, host_rng, records)
            gc.collect()
    return target


def cupy_qkv(rng, batch, sq, sk, hq, hkv, d):
    import cupy

    return [rng.standard_normal((batch, s, h, d), dtype=cupy.float32).astype(cupy.float16)
            for s, h in ((sq, hq), (sk, hkv), (sk, hkv))]


def cupy_dense_call(it, rng, host_rng, records):
    """Dense causal d64 fp16, GQA 4:2: attention and attention_backward on CuPy arrays."""
    import cupy

    sq, sk = DENSE_SHAPES[it % len(DENSE_SHAPES)]
    qkv = cupy_qkv(rng, 2, sq, sk, 4, 2, 64)
    out, lse = attngen.attention(*qkv, causal=True, return_lse=True)
    dout = rng.standard_normal(out.shape, dtype=cupy.float32).astype(cupy.float16)
    grads = attngen.attention_backward(*qkv, out, lse, dout, causal=True)
    common = dict(iteration=it, qkv=qkv, dtype="fp16", causal=True, mask=None)
    records.append(dict(common, kind="fwd", label=f"fwd {sq}x{sk}", out=out, lse=lse))
    records.append(dict(common, kind="bwd", label=f"bwd {sq}x{sk}", dout=dout, grads=list(grads)))


def cupy_mask_call(it, rng, host_rng, records):
    """A runtime-layout kernel (blocks of 64) with new BlockMasks every call: a forward, and a forward and
    the backward kernels (the kv-major CSR) on another new mask."""
    import cupy

    kernel = attngen.build(attngen.Spec(**CUPY_MASK_SPEC))
    backward_kernels = attngen.build_backward(attngen.Spec(**CUPY_MASK_SPEC))
    sq, sk = MASK_SHAPES[it % len(MASK_SHAPES)]
    heads = 4 if it % 2 == 0 else 1
    for backward in (False, True):
        grid = random_grid(host_rng, heads, sq, sk, 64)
        block_mask = BlockMask.from_dense(grid, sq, sk, block_size=64)            # a new object every call
        qkv = cupy_qkv(rng, 2, sq, sk, 4, 2, 64)
        out, lse = kernel(*qkv, block_mask=block_mask)
        element = (lambda g=grid, sq=sq, sk=sk:
                   BlockMask.from_dense(g, sq, sk, block_size=64).element_mask())
        common = dict(iteration=it, qkv=qkv, dtype="fp16", causal=False, mask=element)
        label = f"block_mask {heads}h {sq}x{sk}"
        records.append(dict(common, kind="fwd", label=label + " fwd", out=out, lse=lse))
        if backward:
            dout = rng.standard_normal(out.shape, dtype=cupy.float32).astype(cupy.float16)
            grads = backward_kernels(*qkv, out, lse, dout, block_mask=block_mask)
            records.append(dict(common, kind="bwd", label=label + " bwd", dout=dout, grads=list(grads)))
        del block_mask


def cupy_modifier_call(it, rng, host_rng, records):
    """A causal sliding window, softcap and ALiBi with slopes made on this stream (CuPy float32, through
    attention()) or the kernel's standard ones; d64 fp16, 4 or 6 query heads over 2."""
    import cupy

    sq, sk = MOD_SHAPES[it % len(MOD_SHAPES)]
    hq, window = (4, 6)[it % 2], WINDOWS[(it // 2) % 2]
    qkv = cupy_qkv(rng, 2, sq, sk, hq, 2, 64)
    kind = it % 3
    if kind == 2:                                                  # the kernel's standard slopes
        host, slopes = alibi_slopes(hq), None
        out, lse = attngen.build(modifier_spec(window, 64, "fp16"))(*qkv)
    else:
        host = host_rng.uniform(0.02, 0.3, (2, hq) if kind == 0 else (hq,)).astype(np.float32)
        slopes = cupy.asarray(host)                                # copied on CuPy's current stream: this one
        out, lse = attngen.attention(*qkv, causal=True, window=(window, 0), softcap=SOFTCAP, alibi_slopes=slopes,
                                     return_lse=True)
    records.append(dict(iteration=it, kind="fwd", label=f"window {window} softcap alibi{list(host.shape)} {hq}h "
                        f"{sq}x{sk}", qkv=qkv, dtype="fp16", causal=False, mask=window_mask(window, sq, sk),
                        mods=dict(softcap=SOFTCAP, alibi_slopes=host), out=out, lse=lse))
    del slopes


def warm_up_cupy():
    import cupy

    rng = cupy.random.default_rng(0)
    qkv = cupy_qkv(rng, 1, 64, 64, 2, 1, 64)
    out, lse = attngen.attention(*qkv, causal=True, return_lse=True)
    attngen.attention_backward(*qkv, out, lse, out.copy(), causal=True)
    attngen.build(attngen.Spec(**CUPY_MASK_SPEC))
    attngen.build_backward(attngen.Spec(**CUPY_MASK_SPEC))
    for window in WINDOWS:
        attngen.attention(*qkv, causal=True, window=(window, 0), softcap=SOFTCAP,
                          alibi_slopes=cupy.full((2,), 0.1, dtype=cupy.float32))
        attngen.build(modifier_spec(window, 64, "fp16"))(*qkv)
    cupy.cuda.Device().synchronize()


def test_three_threads_on_cupy_streams_with_a_busy_default_stream():
    pytest.importorskip("cupy")
    torch = pytest.importorskip("torch")       # torch.cuda._sleep holds the streams busy
    if not hasattr(torch.cuda, "_sleep"):
        pytest.skip("torch.cuda._sleep is needed to hold the default stream busy")
    warm_up_cupy()
    records = run_threads([("cupy_dense", cupy_loop(ITERATIONS, 11, cupy_dense_call)),
                           ("cupy_block_mask", cupy_loop(MASK_ITERATIONS, 12, cupy_mask_call)),
                           ("cupy_modifiers", cupy_loop(ITERATIONS, 13, cupy_modifier_call))])
    check_all(records, {"cupy_dense": 2 * ITERATIONS, "cupy_block_mask": 3 * MASK_ITERATIONS,
                        "cupy_modifiers": ITERATIONS})
