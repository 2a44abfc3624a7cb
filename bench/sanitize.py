#!/usr/bin/env python3
"""compute-sanitizer (memcheck, racecheck, synccheck, initcheck) over every attngen kernel family (issue 12).

    PYTHONPATH=. python3 bench/sanitize.py                                   # every tool x every workload
    PYTHONPATH=. python3 bench/sanitize.py --tools racecheck --workloads bwd_wgmma --out /tmp/san
    PYTHONPATH=. python3 bench/sanitize.py --workload fwd_mma_sync            # one workload, no sanitizer
    PYTHONPATH=. python3 bench/sanitize.py --list                            # the workloads and what they cover

Two modes.

- `--workload NAME` runs one small workload in this process: it builds its kernels, runs each on fresh random
  inputs (outputs poisoned with NaN), a forward and, where the family has one, a backward, synchronizes, and
  checks every result against the float64 reference with ARCHITECTURE.md's criterion
  (max|out - ref64| <= 2 * max|same-dtype framework - ref64| + 1e-5; LSE -inf exactly where no key is seen).
  A run under the sanitizer is thereby also a correctness run. Exit 0 when every check passed, 3 when one
  failed, 2 on an exception; a workload that needs a Hopper GPU prints a SKIP line and exits 0 elsewhere.
- Without `--workload` it is the driver: it runs every selected workload once without a sanitizer (this warms
  the shared ATTNGEN_CACHE_DIR, so that no kernel is compiled under the sanitizer, and is a plain correctness
  run), then, for each tool x workload,
      compute-sanitizer --tool T --error-exitcode 99 --print-limit N [tool flags] python3 bench/sanitize.py --workload W
  as a subprocess (up to --jobs at a time; each is its own process on the one GPU), saves each log under --out,
  parses the sanitizer's summary line (`ERROR SUMMARY: N errors`; racecheck's
  `RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)`), prints a table (tool, workload, errors,
  warnings, checks, seconds, status) and writes summary.json. The exit code is 1 when any run reported a
  sanitizer error, failed a check, crashed, timed out or printed no summary; 0 otherwise.

Allocators under memcheck and initcheck. Torch's caching allocator and CuPy's memory pool hand out pieces of
large cudaMalloc segments and reuse freed blocks. Under memcheck an out-of-bounds access that stays inside
the segment (the tail of a tensor, the next tensor of the same segment) is then not reported, and under
initcheck a block reused from an earlier tensor counts as initialized, so a kernel that reads an output or
workspace before writing it goes unseen. For these two tools the children run with
PYTORCH_NO_CUDA_MEMORY_CACHING=1 (torch: one cudaMalloc per tensor) and ATTNGEN_SANITIZE_NO_POOL=1 (read by
this script: CuPy's device and pinned pools are turned off), so every tensor is its own allocation with its own
bounds and its own initialization state; `--keep-caching` turns this off. racecheck (shared memory only) and
synccheck do not depend on the allocator and keep the caching allocators (faster). Without caching every
free is a cudaFree, which synchronizes the device: stream-ordering bugs cannot show here (the stress test,
tests/test_gpu_stress.py, is for those).

A full matrix is every workload (--list) x (1 plain + 4 tools) runs; where one command may run only ~10 minutes, split it
by tool (`--tools memcheck`, then `--tools racecheck --no-warm`, ...): the plain pass is needed once per cache.
`tails_large_scores` is issue 12's finding 3 (dQ NaN at seqlen 1-3 with large scores): its checks fail until
that is fixed, whatever the sanitizers say (its gradients use FlashAttention's tolerance for that test).

Sizes are small and odd (seqlen_q 77, seqlen_k 203 and the reverse, batch 2, GQA 4:2): the sanitizers slow
kernels down 10-100x. The delta kernel (rowsum(dO * O), or the wgmma pass's (LSE, delta) rows) and the dQ
conversion kernel run inside every backward call; the conversion runs wherever dQ is added with atomics
(every backward but the deterministic one).

Options of the sanitizer (`compute-sanitizer --help`): `--error-exitcode` makes an error visible in the exit
code, `--print-limit` bounds the printed records (the summary still counts all; compute-sanitizer's exit code also
counts racecheck's warnings, and so does this script unless `--warnings-ok`), `--racecheck-report` chooses
racecheck's records (analysis: one record per racing pair of sites with its hazard count, as issue 12 quotes
them; all: every hazard too). `--extra-checks` adds `--check-warpgroup-mma yes` (memcheck, synccheck) and
`--check-bulk-copy yes` (memcheck) where this compute-sanitizer offers them; `--sanitizer-args` passes
anything else through.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:            # `python3 bench/sanitize.py` without PYTHONPATH=. still finds attngen
    sys.path.insert(0, str(REPO))

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
UNCACHED_TOOLS = ("memcheck", "initcheck")      # allocators off (module doc)
DEFAULT_JOBS = max(1, min(8, (os.cpu_count() or 2) // 2))
SANITIZER_ERROR_EXIT = 99
CHECK_FAILED_EXIT = 3
CRASH_EXIT = 2
MARK = "attngen-sanitize:"                      # prefix of the lines the driver reads from a workload's output

# Odd sizes: a tail in every tile, seqlen_q != seqlen_k both ways, GQA 4:2.
B, SQ, SK, HQ, HKV = 2, 77, 203, 4, 2


# =============================================================================================== workloads


class Skip(Exception):
    """The whole workload does not apply to this GPU (e.g. wgmma needs sm_90)."""


class Context:
    """What a workload needs: seeded generators, the GPU's facts, and the record of its checks."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.gen = torch.Generator(device="cuda").manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.capability = torch.cuda.get_device_capability()
        self.hopper = self.capability == (9, 0)
        self.checks: list[tuple[str, bool, str]] = []
        self.dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

    # ---- inputs ------------------------------------------------------------------------------------------
    def randn(self, shape, dtype: str, scale: float = 1.0):
        x = self.torch.randn(tuple(shape), generator=self.gen, device="cuda", dtype=self.torch.float32)
        return (x * scale).to(self.dtypes[dtype])

    def qkv(self, batch, sq, sk, hq, hkv, d, dv, dtype, scales=(1.0, 1.0, 1.0)):
        return (self.randn((batch, sq, hq, d), dtype, scales[0]), self.randn((batch, sk, hkv, d), dtype, scales[1]),
                self.randn((batch, sk, hkv, dv), dtype, scales[2]))

    def padded(self, shape, dtype: str, scale: float = 1.0, pad_rows: int = 64, pad_heads: int = 1):
        """Fresh random [b, s, h, d] values as a view into a larger, never-written buffer: pad_rows more rows
        and pad_heads more heads that the kernels must not read (initcheck flags any read of them; memcheck
        cannot, they are inside the allocation)."""
        b, s, h, d = shape
        buffer = self.torch.empty((b, s + pad_rows, h + pad_heads, d), device="cuda", dtype=self.dtypes[dtype])
        view = buffer[:, :s, :h]
        view.copy_(self.randn(shape, dtype, scale))
        return view

    def poisoned(self, shape, dtype: str):
        return self.torch.full(tuple(shape), float("nan"), device="cuda", dtype=self.dtypes[dtype])

    def block_grid(self, heads, sq, sk, block, density=0.5, empty_row=True):
        grid = self.rng.random((heads, -(-sq // block), -(-sk // block))) < density
        grid[:, :, -1] |= ~grid.any(axis=2)        # mostly rows that see something ...
        if empty_row:
            grid[0, 0, :] = False                  # ... but one query block of head 0 that sees nothing
        return grid

    # ---- bookkeeping -------------------------------------------------------------------------------------
    def require_hopper(self, what: str):
        if not self.hopper:
            major, minor = self.capability
            raise Skip(f"{what} needs an sm_90 GPU (H100/H200); this one is sm_{major}{minor}")

    def forward_paths(self):
        return ("mma_sync", "wgmma") if self.hopper else ("mma_sync",)

    def record(self, label: str, ok: bool, detail: str):
        self.checks.append((label, bool(ok), detail))
        print(f"{MARK} check {label}: {'PASS' if ok else 'FAIL'}  {detail}", flush=True)

    def note(self, text: str):
        print(f"{MARK} note {text}", flush=True)


def to64(x) -> np.ndarray:
    if type(x).__module__.split(".")[0] == "torch":
        import torch

        return x.detach().to("cpu", torch.float64).numpy()
    import cupy

    return cupy.asnumpy(x).astype(np.float64)


def as_torch(x):
    import torch

    return x if type(x).__module__.split(".")[0] == "torch" else torch.from_dlpack(x)


def pattern_mask(pattern, heads, sq, sk) -> np.ndarray:
    """A spec pattern's element mask, bool [heads, sq, sk]."""
    return np.broadcast_to(pattern.element(np.arange(heads)[:, None, None], np.arange(sq)[None, :, None],
                                           np.arange(sk)[None, None, :], sq, sk), (heads, sq, sk))


CHECKER = "(q_idx / 16) % 2 == (kv_idx / 16) % 2"       # a mask_mod: a checkerboard of 16 x 16 squares


def checker_mask(sq, sk) -> np.ndarray:
    return (np.arange(sq)[:, None] // 16 % 2) == (np.arange(sk)[None, :] // 16 % 2)


def check_forward(ctx, label, out, lse, q, k, v, *, dtype, causal=False, scale=None, mask=None, lse_tol=5e-3,
                  **mods):
    """ARCHITECTURE.md's criterion on out; LSE: -inf exactly where the reference's is, the rest within lse_tol."""
    from attngen.tools.reference import acceptance_check, attention_reference, attention_same_dtype_reference

    ctx.torch.cuda.synchronize()
    q64, k64, v64 = to64(q), to64(k), to64(v)
    ref, ref_lse = attention_reference(q64, k64, v64, causal=causal, scale=scale, mask=mask, **mods)
    same, _ = attention_same_dtype_reference(q64, k64, v64, causal=causal, scale=scale, mask=mask, dtype=dtype, **mods)
    ok, err, bound = acceptance_check(to64(out), same, ref)
    detail = f"max|out-ref64| {err:.3g} (bound {bound:.3g})"
    if lse is not None:
        got = to64(lse)
        pattern_ok = np.array_equal(np.isneginf(got), np.isneginf(ref_lse))
        finite = np.isfinite(ref_lse)
        with np.errstate(invalid="ignore"):
            lse_err = float(np.max(np.abs(got[finite] - ref_lse[finite]))) if finite.any() else 0.0
        lse_ok = pattern_ok and lse_err < lse_tol           # NaN compares False
        ok = ok and lse_ok
        detail += f", lse err {lse_err:.3g}{'' if pattern_ok else ', -inf pattern DIFFERS'}"
    ctx.record(label, ok, detail)


def framework_grads(q, k, v, dout, causal, scale, **mods):
    """The same-dtype baseline of the gradient criterion: naive attention's autograd in q's dtype
    (attngen.tools.checking.framework_attention), on the CPU so that the sanitizer sees no torch kernels of the
    check (a torch build without half matmuls on the CPU falls back to the GPU)."""
    from attngen.tools.checking import framework_attention

    for device in ("cpu", "cuda"):
        try:
            leaves = [as_torch(x).detach().to(device).clone().requires_grad_(True) for x in (q, k, v)]
            framework_attention(*leaves, causal, scale, **mods).backward(as_torch(dout).detach().to(device))
            return [to64(x.grad) for x in leaves]
        except (RuntimeError, NotImplementedError) as exc:   # e.g. "not implemented for 'Half'"
            if device == "cuda":
                raise
            print(f"{MARK} note framework baseline on the GPU: {exc}".splitlines()[0], flush=True)
    raise AssertionError("unreachable")


FLASH_OVERFLOW_TOLERANCE = (5.0, (1e-3, 1e-3, 1e-3))   # FlashAttention's test_flash_attn_bwd_overflow


def check_backward(ctx, label, grads, q, k, v, dout, *, causal=False, scale=None, mask=None, softcap=None,
                   alibi_slopes=None, mask_mod=None, score_mod=None, score_mod_grad=None, tolerance=None):
    """ARCHITECTURE.md's criterion on dq, dk, dv against float64, bounded by the framework's same-dtype error;
    tolerance=(factor, (slack_dq, slack_dk, slack_dv)) replaces its 2x + 1e-5 (every gradient finite)."""
    from attngen.tools.reference import acceptance_check, attention_reference_backward

    ctx.torch.cuda.synchronize()
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    mods = dict(softcap=softcap, alibi_slopes=alibi_slopes, mask_mod=mask_mod, score_mod=score_mod,
                score_mod_grad=score_mod_grad)
    ref = attention_reference_backward(to64(q), to64(k), to64(v), to64(dout), causal=causal, scale=scale,
                                       mask=mask, **mods)
    base = framework_grads(q, k, v, dout, causal, scale, mask=mask, **mods)
    parts, all_ok = [], True
    for i, (name, mine, theirs, r) in enumerate(zip(("dq", "dk", "dv"), grads, base, ref)):
        ok, err, bound = acceptance_check(to64(mine), theirs, r)
        if tolerance is not None:
            factor, slack = tolerance
            bound = factor * float(np.max(np.abs(theirs - r))) + slack[i]
            ok = bool(np.all(np.isfinite(to64(mine))) and err <= bound)
        all_ok &= ok
        parts.append(f"{name} {err:.3g}/{bound:.3g}{'' if ok else ' FAIL'}")
    ctx.record(label, all_ok, "max|grad-ref64|/bound: " + ", ".join(parts))


def forward_case(ctx, label, spec, path, sizes, *, qkv=None, call=None, mask=None, causal=None, scale=None,
                 **mods):
    """build(spec, path=path), one call on poisoned out/lse, checked. Returns (q, k, v, out, lse)."""
    import attngen

    kernel = attngen.build(spec, path=path)
    if path is not None and kernel.plan.path != path:
        ctx.record(label, False, f"asked for path {path}, the kernel is {kernel.plan.path}")
    batch, sq, sk, hq, hkv = sizes
    q, k, v = qkv if qkv is not None else ctx.qkv(batch, sq, sk, hq, hkv, spec.head_dim, spec.head_dim_v, spec.dtype)
    out = ctx.poisoned((batch, sq, hq, spec.head_dim_v), spec.dtype)
    lse = ctx.poisoned((batch, hq, sq), "fp32")
    kernel(q, k, v, out=out, lse=lse, **(call or {}))
    check_forward(ctx, f"{label} fwd[{kernel.plan.path}]", out, lse, q, k, v, dtype=spec.dtype,
                  causal=spec.causal if causal is None else causal, scale=scale, mask=mask, **mods)
    return q, k, v, out, lse


def backward_case(ctx, label, spec, path, q, k, v, out, lse, *, call=None, optional=False, dout=None, **ref):
    """build_backward(spec, path=path) on poisoned dq/dk/dv (dout: fresh random unless given), checked.
    optional: a path the planner does not offer for this spec is noted instead of failing."""
    import attngen

    try:
        kernels = attngen.build_backward(spec, path=path)
    except attngen.PlanError as exc:
        if not optional:
            raise
        ctx.note(f"{label}: no {path} dK/dV pass for this spec ({exc})")
        return
    chosen = kernels.plan.dkdv.path
    if path is not None and chosen != path:
        ctx.record(label, False, f"asked for dK/dV path {path}, got {chosen}")
    dout = ctx.randn(out.shape, spec.dtype) if dout is None else dout
    grads = [ctx.poisoned(x.shape, spec.dtype) for x in (q, k, v)]          # dq, dk, dv: q's, k's, v's shapes
    kernels(q, k, v, out, lse, dout, dq=grads[0], dk=grads[1], dv=grads[2], **(call or {}))
    passes = "+".join(kernels.plan.passes)
    check_backward(ctx, f"{label} bwd[{passes} {chosen}]", grads, q, k, v, dout, **ref)


def _spec(**fields):
    import attngen

    return attngen.Spec(**fields)


# ---- the families ------------------------------------------------------------------------------------------


def fwd_mma_sync(ctx):
    """Forward, mma.sync path (cp.async + ldmatrix + mma.sync): d64 bf16 causal 77x203 (issue 12's initcheck
    site), d128 fp16 full 203x77, d96 bf16 causal 203x77 (126 query rows that see no key: out 0, LSE -inf),
    d256 bf16 full 77x203 (128x64 on 8 warps)."""
    for d, dtype, causal, sq, sk in ((64, "bf16", True, SQ, SK), (128, "fp16", False, SK, SQ),
                                     (96, "bf16", True, SK, SQ), (256, "bf16", False, SQ, SK)):
        spec = _spec(head_dim=d, dtype=dtype, causal=causal)
        forward_case(ctx, f"d{d} {dtype} {'causal' if causal else 'full'} {sq}x{sk}", spec, "mma_sync",
                     (B, sq, sk, HQ, HKV))


def fwd_wgmma(ctx):
    """Forward, wgmma path (TMA producer warpgroup, mbarriers, two wgmma warpgroups, setmaxnreg; sm_90a):
    d64 bf16 causal 77x203, d128 fp16 full 203x77, d128 bf16 causal 203x77 (rows that see no key),
    d256 bf16 full 77x203."""
    ctx.require_hopper("the wgmma forward")
    for d, dtype, causal, sq, sk in ((64, "bf16", True, SQ, SK), (128, "fp16", False, SK, SQ),
                                     (128, "bf16", True, SK, SQ), (256, "bf16", False, SQ, SK)):
        spec = _spec(head_dim=d, dtype=dtype, causal=causal)
        forward_case(ctx, f"d{d} {dtype} {'causal' if causal else 'full'} {sq}x{sk}", spec, "wgmma",
                     (B, sq, sk, HQ, HKV))


def _dense_backward(ctx, path, cases, deterministic=False):
    for d, dtype, causal, sq, sk in cases:
        spec = _spec(head_dim=d, dtype=dtype, causal=causal, deterministic=deterministic)
        label = f"d{d} {dtype} {'causal' if causal else 'full'} {sq}x{sk}"
        q, k, v, out, lse = forward_case(ctx, label, spec, None, (B, sq, sk, HQ, HKV))
        backward_case(ctx, label, spec, path, q, k, v, out, lse, causal=causal)


def bwd_mma_sync(ctx):
    """Backward, mma.sync dK/dV pass with dQ added by fp32 atomics: delta kernel, dK/dV(+dQ) kernel, dQ
    conversion kernel. d64 bf16 causal 77x203, d128 fp16 full 203x77, d96 fp16 causal 203x77, d256 bf16
    causal 203x77 (64 keys on 8 warps, four sharing each 32, one 256-column chunk, a 2-deep ring)."""
    _dense_backward(ctx, "mma_sync", ((64, "bf16", True, SQ, SK), (128, "fp16", False, SK, SQ),
                                      (96, "fp16", True, SK, SQ), (256, "bf16", True, SK, SQ)))


def bwd_wgmma(ctx):
    """Backward, wgmma dK/dV pass (TMA ring of Q/dO tiles with each row's (LSE, delta), bulk dQ reduction;
    sm_90a): the delta kernel's row-stats form, the pass, the dQ conversion. d128 bf16 full and causal
    77x203 (issue 12's racecheck finding), d64 fp16 causal 203x77."""
    ctx.require_hopper("the wgmma dK/dV pass")
    _dense_backward(ctx, "wgmma", ((128, "bf16", False, SQ, SK), (128, "bf16", True, SQ, SK),
                                   (64, "fp16", True, SK, SQ)))


def bwd_wgmma_wide(ctx):
    """Backward, the wgmma dK/dV pass with keys as columns (dK^T, dV^T accumulated; P^T and dS^T through
    shared memory by stmatrix.trans; dQ tiles by vector atomics) and padded head dims: d256 bf16 causal
    77x203, d192 fp16 full 203x77, d96 bf16 causal 77x203 (keys as rows, padded to 128)."""
    ctx.require_hopper("the wgmma dK/dV pass")
    _dense_backward(ctx, "wgmma", ((256, "bf16", True, SQ, SK), (192, "fp16", False, SK, SQ),
                                   (96, "bf16", True, SQ, SK)))


def bwd_deterministic(ctx):
    """Backward with deterministic=True: delta kernel, the separate dQ pass (no atomics), the mma.sync
    dK/dV pass without dQ. d64 bf16 causal 77x203, d128 fp16 full 203x77."""
    _dense_backward(ctx, None, ((64, "bf16", True, SQ, SK), (128, "fp16", False, SK, SQ)), deterministic=True)


def tails_large_scores(ctx):
    """FlashAttention's test_flash_attn_bwd_overflow shape: q x 5, k x 3, v x 3, fp16, full, batch 2, 5 heads,
    seqlen 1, 2 and 3 (rows past seqlen inside every tile), d64 and d128, forward and backward on each
    dK/dV path (issue 12 finding 3: dQ NaN). The gradients are checked as that test does: finite, and
    within 5x the framework's error + 1e-3; at these magnitudes ARCHITECTURE.md's 2x + 1e-5 is below
    fp32 rounding of gradients that are exactly 0 (seqlen 1)."""
    for d in (64, 128):
        spec = _spec(head_dim=d, dtype="fp16")
        for n in (1, 2, 3):
            qkv = ctx.qkv(2, n, n, 5, 5, d, d, "fp16", scales=(5.0, 3.0, 3.0))
            for path in ctx.forward_paths():
                label = f"d{d} fp16 x5/x3 {n}x{n}"
                q, k, v, out, lse = forward_case(ctx, label, spec, path, (2, n, n, 5, 5), qkv=qkv)
                backward_case(ctx, label, spec, path, q, k, v, out, lse, tolerance=FLASH_OVERFLOW_TOLERANCE)


def padded_views(ctx):
    """q, k, v and dO as strided views into larger buffers whose extra rows (past seqlen) and extra heads are
    never written (under initcheck with allocator caching off they are uninitialized memory): a kernel that
    reads a row past seqlen, even one it then masks, is reported by initcheck, while memcheck sees an
    in-bounds access. Forward on each path and backward on each dK/dV path: d64 bf16 causal 77x203, d128 fp16
    full 203x77."""
    for d, dtype, causal, sq, sk in ((64, "bf16", True, SQ, SK), (128, "fp16", False, SK, SQ)):
        spec = _spec(head_dim=d, dtype=dtype, causal=causal)
        label = f"padded d{d} {dtype} {'causal' if causal else 'full'} {sq}x{sk}"
        for path in ctx.forward_paths():
            qkv = (ctx.padded((B, sq, HQ, d), dtype), ctx.padded((B, sk, HKV, d), dtype),
                   ctx.padded((B, sk, HKV, d), dtype))
            q, k, v, out, lse = forward_case(ctx, label, spec, path, (B, sq, sk, HQ, HKV), qkv=qkv)
            backward_case(ctx, label, spec, path, q, k, v, out, lse, causal=causal,
                          dout=ctx.padded(out.shape, dtype))


def runtime_layout(ctx):
    """Runtime block layouts (block-CSR uploaded per BlockMask), forward: block 64 on mma.sync (per-head
    random kept blocks, one query block seeing nothing, some blocks marked full) 77x203; block 128 on
    mma.sync and wgmma 203x333; block 64 with a mask_mod that partial blocks evaluate."""
    from attngen.masks import BlockMask

    spec64 = _spec(head_dim=64, dtype="bf16", mask={"kind": "runtime", "block_size": 64})
    grid = ctx.block_grid(HQ, SQ, SK, 64)
    full = grid & (ctx.rng.random(grid.shape) < 0.5)
    bm = BlockMask.from_dense(grid, SQ, SK, block_size=64, full=full)
    forward_case(ctx, "block64 per-head 77x203", spec64, "mma_sync", (B, SQ, SK, HQ, HKV),
                 call={"block_mask": bm}, mask=bm.element_mask())
    spec128 = _spec(head_dim=128, dtype="fp16", mask={"kind": "runtime", "block_size": 128})
    shared = ctx.block_grid(1, 203, 333, 128)
    bm128 = BlockMask.from_dense(shared, 203, 333, block_size=128)
    for path in ctx.forward_paths():
        forward_case(ctx, "block128 shared 203x333", spec128, path, (B, 203, 333, HQ, HKV),
                     call={"block_mask": bm128}, mask=bm128.element_mask())
    # a mask_mod, evaluated in partial blocks (no block marked full: a kernel skips the mask_mod in full ones)
    spec_mod = _spec(head_dim=64, dtype="bf16", mask={"kind": "runtime", "block_size": 64}, mask_mod=CHECKER)
    partial = BlockMask.from_dense(grid, SQ, SK, block_size=64)
    forward_case(ctx, "block64 + mask_mod 77x203", spec_mod, "mma_sync", (B, SQ, SK, HQ, HKV),
                 call={"block_mask": partial}, mask=partial.element_mask() & checker_mask(SQ, SK))


def runtime_layout_bwd(ctx):
    """Runtime block layouts, backward (the kv-major CSR derived from the BlockMask): block 128 on the
    mma.sync and wgmma dK/dV passes 203x333, block 64 deterministic (dQ pass reads the row-major CSR),
    block 64 with a mask_mod, and the autograd path attention(..., block_mask=)."""
    import attngen
    from attngen.masks import BlockMask

    spec128 = _spec(head_dim=128, dtype="bf16", mask={"kind": "runtime", "block_size": 128})
    bm128 = BlockMask.from_dense(ctx.block_grid(HQ, 203, 333, 128), 203, 333, block_size=128)
    mask128 = bm128.element_mask()
    q, k, v, out, lse = forward_case(ctx, "block128 203x333", spec128, None, (B, 203, 333, HQ, HKV),
                                     call={"block_mask": bm128}, mask=mask128)
    backward_case(ctx, "block128 203x333", spec128, "mma_sync", q, k, v, out, lse, call={"block_mask": bm128},
                  mask=mask128)
    if ctx.hopper:
        backward_case(ctx, "block128 203x333", spec128, "wgmma", q, k, v, out, lse, call={"block_mask": bm128},
                      mask=mask128)
    grid = ctx.block_grid(HQ, SQ, SK, 64)
    bm64 = BlockMask.from_dense(grid, SQ, SK, block_size=64, full=grid & (ctx.rng.random(grid.shape) < 0.5))
    mask64 = bm64.element_mask()
    spec_det = _spec(head_dim=64, dtype="fp16", mask={"kind": "runtime", "block_size": 64}, deterministic=True)
    q, k, v, out, lse = forward_case(ctx, "block64 deterministic 77x203", spec_det, None, (B, SQ, SK, HQ, HKV),
                                     call={"block_mask": bm64}, mask=mask64)
    backward_case(ctx, "block64 deterministic 77x203", spec_det, None, q, k, v, out, lse,
                  call={"block_mask": bm64}, mask=mask64)
    # a mask_mod, evaluated in partial blocks (no block marked full: a kernel skips the mask_mod in full ones)
    spec_mod = _spec(head_dim=64, dtype="bf16", mask={"kind": "runtime", "block_size": 64}, mask_mod=CHECKER)
    partial = BlockMask.from_dense(grid, SQ, SK, block_size=64)
    mask_mod64 = partial.element_mask() & checker_mask(SQ, SK)
    q, k, v, out, lse = forward_case(ctx, "block64 + mask_mod 77x203", spec_mod, None, (B, SQ, SK, HQ, HKV),
                                     call={"block_mask": partial}, mask=mask_mod64)
    backward_case(ctx, "block64 + mask_mod 77x203", spec_mod, None, q, k, v, out, lse, call={"block_mask": partial},
                  mask=mask_mod64)
    # the autograd path: attention(..., block_mask=) -> forward kernel, then build_backward's choice
    q, k, v = ctx.qkv(B, 203, 333, HQ, HKV, 128, 128, "bf16")
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = attngen.attention(*leaves, block_mask=bm128, return_lse=True)
    dout = ctx.randn(out.shape, "bf16")
    out.backward(dout)
    check_forward(ctx, "autograd block128 203x333 fwd", out, lse, q, k, v, dtype="bf16", mask=mask128)
    check_backward(ctx, "autograd block128 203x333 bwd", [x.grad for x in leaves], q, k, v, dout, mask=mask128)


def _pattern_workload(ctx, label, section, d, dtype, sq, sk):
    """A mask pattern compiled into the kernel: forward on each path, backward (mma.sync: patterns as code
    stay there) with dQ by atomics and deterministic."""
    spec = _spec(head_dim=d, dtype=dtype, mask=section)
    mask = pattern_mask(spec.mask_pattern, HQ, sq, sk)
    for path in ctx.forward_paths():
        q, k, v, out, lse = forward_case(ctx, f"{label} {sq}x{sk}", spec, path, (B, sq, sk, HQ, HKV), mask=mask)
    backward_case(ctx, f"{label} {sq}x{sk}", spec, None, q, k, v, out, lse, mask=mask)
    det = _spec(head_dim=d, dtype=dtype, mask=section, deterministic=True)
    backward_case(ctx, f"{label} deterministic {sq}x{sk}", det, None, q, k, v, out, lse, mask=mask)


def pattern_sliding_window(ctx):
    """Pattern as code: a causal sliding window of 50 keys (d64 bf16, 77x203) and a two-sided one
    (left 30, right 20; d128 fp16, 203x77)."""
    _pattern_workload(ctx, "sliding_window(50,0)", {"kind": "sliding_window", "left": 50, "right": 0},
                      64, "bf16", SQ, SK)
    _pattern_workload(ctx, "sliding_window(30,20)", {"kind": "sliding_window", "left": 30, "right": 20},
                      128, "fp16", SK, SQ)


def pattern_document(ctx):
    """Pattern as code: packed documents [90, 60, 53] and causal, d128 fp16, 203x203."""
    _pattern_workload(ctx, "document&causal", {"kind": "and", "of": [
        {"kind": "document", "seq_lens": [90, 60, 53]}, {"kind": "causal"}]}, 128, "fp16", 203, 203)


def pattern_bigbird(ctx):
    """Pattern as code with a block table the launcher uploads (BigBird's seeded random blocks): window 1,
    global token 0, one random block per query block, blocks of 128; d64 bf16, 203x333."""
    _pattern_workload(ctx, "bigbird", {"kind": "bigbird", "window": 1, "global_tokens": [0], "random_blocks": 1,
                                       "block_size": 128, "seed": 1}, 64, "bf16", 203, 333)


def mods_named_tensors(ctx):
    """score_mod (with score_mod_grad) and mask_mod over named tensors (per-head gain, per-batch-head bias,
    per-position document ids; rows of document -1 see nothing), causal, d64 bf16, 77x203: forward on each
    path, backward on the planner's dK/dV pass and on mma.sync."""
    import torch

    spec = _spec(head_dim=64, dtype="bf16", causal=True,
                 score_mod="score * gain[h] + bias[b * num_heads + h]", score_mod_grad="gain[h]",
                 mask_mod="doc_q[q_idx] >= 0 && doc_q[q_idx] == doc_kv[kv_idx]",
                 tensors={"gain": {"dtype": "float32", "shape": ["heads"]},
                          "bias": {"dtype": "float32", "shape": ["batch", "heads"]},
                          "doc_q": {"dtype": "int32", "shape": ["seqlen_q"]},
                          "doc_kv": {"dtype": "int32", "shape": ["seqlen_k"]}})
    gain = ctx.rng.uniform(0.5, 2.0, HQ).astype(np.float32)
    bias = ctx.rng.normal(0, 1, (B, HQ)).astype(np.float32)
    doc_kv = np.repeat(np.arange(4), [60, 50, 43, 50]).astype(np.int32)          # 203 keys
    doc_q = doc_kv[SK - SQ:].copy()                                               # aligned with the keys
    doc_q[10:20] = -1                                                             # rows that see nothing
    tensors = {name: torch.tensor(a, device="cuda") for name, a in
               (("gain", gain), ("bias", bias), ("doc_q", doc_q), ("doc_kv", doc_kv))}

    def score_mod(s, b, h, q_idx, kv_idx):
        h = np.asarray(h)
        return s * gain[h] + bias[b][h]

    def score_mod_grad(s, b, h, q_idx, kv_idx):
        return np.broadcast_to(gain[np.asarray(h)], np.broadcast_shapes(np.shape(s), np.shape(h)))

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_q[q_idx] >= 0) & (doc_q[q_idx] == doc_kv[kv_idx])

    call = {"tensors": tensors}
    for path in ctx.forward_paths():
        q, k, v, out, lse = forward_case(ctx, "score_mod+mask_mod 77x203", spec, path, (B, SQ, SK, HQ, HKV),
                                         call=call, score_mod=score_mod, mask_mod=mask_mod)
    for path in (None, "mma_sync"):
        backward_case(ctx, "score_mod+mask_mod 77x203", spec, path, q, k, v, out, lse, call=call, causal=True,
                      mask_mod=mask_mod, score_mod=score_mod, score_mod_grad=score_mod_grad)


def softcap_alibi(ctx):
    """softcap and ALiBi: a spec with softcap 20 (scale 0.5), ALiBi and a causal window of 60, d128 bf16
    77x203, forward on each path with [batch, heads] slopes and with the launcher's default slopes; and the
    FlashAttention keywords through autograd: attention(causal=True, window=(50, 0), softcap=5,
    alibi_slopes=[heads]) d64 fp16 203x77 with dQ by atomics and deterministic, and without the window
    d128 bf16 77x203 (the planner's dK/dV pass: wgmma on Hopper)."""
    import attngen
    import torch

    from attngen.masks import SlidingWindow
    from attngen.tools.reference import alibi_slopes

    spec = _spec(head_dim=128, dtype="bf16", softcap=20.0, scale=0.5, alibi=True,
                 mask={"kind": "sliding_window", "left": 60, "right": 0})
    mask = pattern_mask(spec.mask_pattern, HQ, SQ, SK)
    slopes = ctx.rng.uniform(0.02, 0.3, (B, HQ)).astype(np.float32)
    for path in ctx.forward_paths():
        forward_case(ctx, "softcap+alibi[b,h]+window 77x203", spec, path, (B, SQ, SK, HQ, HKV),
                     call={"alibi_slopes": torch.tensor(slopes, device="cuda")}, mask=mask, scale=0.5,
                     softcap=20.0, alibi_slopes=slopes)
        forward_case(ctx, "softcap+alibi(default)+window 77x203", spec, path, (B, SQ, SK, HQ, HKV), mask=mask,
                     scale=0.5, softcap=20.0, alibi_slopes=alibi_slopes(HQ))
    head_slopes = ctx.rng.uniform(0.02, 0.3, HQ).astype(np.float32)
    # (window, head_dim, dtype, seqlen_q, seqlen_k, deterministic); without a window the planner may take the
    # wgmma dK/dV pass (softcap and ALiBi gradients there), a window (a pattern) stays on mma.sync
    for window, d, dtype, sq, sk, deterministic in (((50, 0), 64, "fp16", SK, SQ, False),
                                                    ((50, 0), 64, "fp16", SK, SQ, True),
                                                    (None, 128, "bf16", SQ, SK, False)):
        q, k, v = ctx.qkv(B, sq, sk, HQ, HKV, d, d, dtype)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = attngen.attention(*leaves, causal=True, window=window, softcap=5.0,
                                     alibi_slopes=torch.tensor(head_slopes, device="cuda"), return_lse=True,
                                     deterministic=deterministic)
        dout = ctx.randn(out.shape, dtype)
        out.backward(dout)
        # a window with causal=True is the sliding-window pattern (right clipped to 0), not causal on top
        mask = pattern_mask(SlidingWindow(window[0], 0), HQ, sq, sk) if window else None
        causal = window is None
        label = (f"attention(causal, window={window}, softcap, alibi[h]{', deterministic' if deterministic else ''})"
                 f" d{d} {dtype} {sq}x{sk}")
        check_forward(ctx, label + " fwd", out, lse, q, k, v, dtype=dtype, causal=causal, mask=mask, softcap=5.0,
                      alibi_slopes=head_slopes)
        check_backward(ctx, label + " bwd", [x.grad for x in leaves], q, k, v, dout, causal=causal, mask=mask,
                       softcap=5.0, alibi_slopes=head_slopes)


def cupy_streams(ctx):
    """CuPy arrays on a non-blocking CuPy stream: attention (causal, d64 fp16, 77x203) and
    attention_backward, and a runtime BlockMask forward (block 64)."""
    import attngen
    import cupy

    from attngen.masks import BlockMask

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        rng = cupy.random.default_rng(int(ctx.rng.integers(1 << 30)))
        q, k, v = (rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16) for shape in
                   ((B, SQ, HQ, 64), (B, SK, HKV, 64), (B, SK, HKV, 64)))
        out, lse = attngen.attention(q, k, v, causal=True, return_lse=True)
        dout = rng.standard_normal(out.shape, dtype=cupy.float32).astype(cupy.float16)
        grads = attngen.attention_backward(q, k, v, out, lse, dout, causal=True)
        bm = BlockMask.from_dense(ctx.block_grid(HQ, SQ, SK, 64), SQ, SK, block_size=64)
        out_bm, lse_bm = attngen.attention(q, k, v, block_mask=bm, return_lse=True)
    stream.synchronize()
    check_forward(ctx, "cupy causal 77x203 fwd", out, lse, q, k, v, dtype="fp16", causal=True)
    check_backward(ctx, "cupy causal 77x203 bwd", grads, q, k, v, dout, causal=True)
    check_forward(ctx, "cupy block64 77x203 fwd", out_bm, lse_bm, q, k, v, dtype="fp16", mask=bm.element_mask())


def varlen(ctx):
    """Packed sequences (layout: varlen): lengths [17, 0, 1, 113, 30] for queries, [40, 3, 0, 90, 30] for keys,
    GQA 4:2, d64 bf16 causal: the schedule kernel, the forward on each path, the backward (planner's dK/dV
    pass, mma.sync, deterministic); then offsets past the packed rows (no tile may run, nothing is touched)."""
    import attngen
    import torch

    from attngen.tools.reference_varlen import attention_varlen_reference, attention_varlen_reference_backward

    lens_q, lens_k = [17, 0, 1, 113, 30], [40, 3, 0, 90, 30]
    cu_q, cu_k = (torch.tensor(np.concatenate([[0], np.cumsum(n)]), dtype=torch.int32, device="cuda")
                  for n in (lens_q, lens_k))
    q = as_torch(ctx.randn((sum(lens_q), HQ, 64), "bf16"))
    k, v = (as_torch(ctx.randn((sum(lens_k), HKV, 64), "bf16")) for _ in range(2))
    ref, ref_lse = attention_varlen_reference(to64(q), to64(k), to64(v), cu_q.cpu(), cu_k.cpu(), causal=True)
    dout = as_torch(ctx.randn(q.shape, "bf16"))
    ref_grads = attention_varlen_reference_backward(to64(q), to64(k), to64(v), to64(dout), cu_q.cpu(), cu_k.cpu(),
                                                    causal=True)
    spec = _spec(head_dim=64, dtype="bf16", causal=True, layout="varlen")
    call = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    for path in ctx.forward_paths():
        out = as_torch(ctx.poisoned(q.shape, "bf16"))
        lse = as_torch(ctx.poisoned((HQ, q.shape[0]), "fp32"))
        attngen.build(spec, path=path)(q, k, v, out=out, lse=lse, **call)
        err = float(np.max(np.abs(to64(out) - ref)))
        finite = np.isfinite(ref_lse)
        lse_ok = np.array_equal(np.isneginf(to64(lse)), np.isneginf(ref_lse)) and \
            float(np.max(np.abs(to64(lse)[finite] - ref_lse[finite]))) < 5e-3
        ctx.record(f"varlen fwd[{path or 'planner'}]", err < 2e-2 and lse_ok, f"max err {err:.3g}, lse {lse_ok}")
    for path, det in ((None, False), ("mma_sync", False), (None, True)):
        kernels = attngen.build_backward(attngen.Spec(**(spec.to_dict() | {"deterministic": det})), path=path)
        grads = [as_torch(ctx.poisoned(x.shape, "bf16")) for x in (q, k, v)]
        kernels(q, k, v, out, lse, dout, dq=grads[0], dk=grads[1], dv=grads[2], **call)
        errs = [float(np.max(np.abs(to64(g) - r))) for g, r in zip(grads, ref_grads)]
        ctx.record(f"varlen bwd[{'+'.join(kernels.plan.passes)} {kernels.plan.dkdv.path}]", max(errs) < 5e-2,
                   f"max errs {errs}")
    bad = torch.tensor([0, 17, 17, 18, 131, 4096], dtype=torch.int32, device="cuda")
    out = torch.full(q.shape, 3.0, device="cuda", dtype=q.dtype)
    attngen.build(spec)(q, k, v, out=out, cu_seqlens_q=bad, cu_seqlens_k=cu_k)
    torch.cuda.synchronize()
    ctx.record("varlen bad offsets touch nothing", bool(torch.all(out == 3.0)), "out left as it was")


def _run_paged_cache(ctx, label: str, lengths, new: int, page_size: int, splits: int) -> None:
    """One call of build_decode over a shuffled page table (d64 bf16, causal, `new` tokens appended and attended),
    checked against the float64 reference: the output and the cache after the append."""
    import attngen
    import torch

    from attngen.tools.reference_kvcache import attention_with_kvcache_reference

    pages_per = [-(-(n + new) // page_size) for n in lengths]
    total = sum(pages_per) + 1
    order = torch.randperm(total, generator=torch.Generator().manual_seed(page_size)).to(torch.int32)
    table = torch.full((len(lengths), max(pages_per)), int(order[-1]), dtype=torch.int32)
    taken = 0
    for b, n in enumerate(pages_per):
        table[b, :n] = order[taken:taken + n]
        taken += n
    table = table.cuda()
    k_cache, v_cache = (as_torch(ctx.randn((total, page_size, HKV, 64), "bf16")) for _ in range(2))
    q = as_torch(ctx.randn((len(lengths), new, HQ, 64), "bf16"))
    k, v = (as_torch(ctx.randn((len(lengths), new, HKV, 64), "bf16")) for _ in range(2))
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    ref, ref_lse, ref_k, _ = attention_with_kvcache_reference(
        to64(q), to64(k_cache), to64(v_cache), to64(k), to64(v), cache_seqlens=lengths,
        block_table=table.cpu().numpy(), causal=True)
    spec = _spec(head_dim=64, dtype="bf16", causal=True, layout="kvcache", page_size=page_size)
    out = as_torch(ctx.poisoned(q.shape, "bf16"))
    lse = as_torch(ctx.poisoned((len(lengths), HQ, new), "fp32"))
    attngen.build_decode(spec)(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                               num_splits=splits, out=out, lse=lse)
    err = float(np.max(np.abs(to64(out) - ref)))
    appended = bool(np.array_equal(to64(k_cache), ref_k))
    ctx.record(label, err < 2e-2 and appended,
               f"max err {err:.3g}, cache after the append {'as the reference' if appended else 'differs'}")


def kvcache(ctx):
    """Attention over a KV cache (build_decode), d64 bf16: paged caches in a shuffled page table, lengths
    [0, 1, 17, 300] with 2 new tokens appended across page boundaries, causal; 16-row pages (a page per warp
    slice) with the keys split over 3 CTAs (append, decode, combine), then 3-row pages (a page per row), one
    split. The output and the cache after the append are checked against the float64 reference."""
    for page_size, splits in ((16, 3), (3, 1)):
        _run_paged_cache(ctx, f"kvcache page {page_size}, {splits} splits", [0, 1, 17, 300], 2, page_size, splits)


def kvcache_prefill(ctx):
    """Chunked prefill over a KV cache (Hopper: the prefill kernel, the wgmma forward over pages): 80 new tokens
    appended to lengths [0, 5, 100, 300] and attended causally, 16-row pages (8 copy-engine boxes per key tile,
    pages looked up a tile ahead by the producer warp) and 64-row pages; the last tile's spare value rows are
    cleared by the compute warpgroups between two barriers, what racecheck and synccheck watch here. 12-row
    pages: the producer warpgroup gathers rows with cp.async into the swizzled tile (completion on the tile's
    barrier through cp.async.mbarrier.arrive, zero-fill past the keys)."""
    for page_size in (16, 64, 12):
        _run_paged_cache(ctx, f"kvcache prefill page {page_size}", [0, 5, 100, 300], 80, page_size, 0)


def fp8_forward(ctx):
    """FP8 (e4m3) forward on Hopper: the V^T transpose kernel (keys in P's register order, zeros past the
    keys) and the forward (k = 32 wgmma, P packed in place, descale factors per (batch, KV head), bf16 O staged
    in the Q region): d128 causal 77x203 and d256 full 203x77, checked against the FP8 algorithm at its
    rounding points; then twice through the remembered launch (pointers swapped in), the same bits."""
    import attngen
    from attngen.tools.reference import acceptance_check, attention_fp8_reference, attention_reference

    ctx.require_hopper("the FP8 forward")
    torch = ctx.torch
    for d, causal, sq, sk in ((128, True, SQ, SK), (256, False, SK, SQ)):
        kernel = attngen.build(_spec(head_dim=d, dtype="fp8_e4m3", causal=causal))
        q, k, v = (ctx.randn(shape, "fp32").to(torch.float8_e4m3fn)
                   for shape in ((B, sq, HQ, d), (B, sk, HKV, d), (B, sk, HKV, d)))
        factors = [torch.rand(B, HKV, generator=ctx.gen, device="cuda") + 0.5 for _ in range(3)]
        out, lse = ctx.poisoned((B, sq, HQ, d), "bf16"), ctx.poisoned((B, HQ, sq), "fp32")
        kernel(q, k, v, out=out, lse=lse, q_descale=factors[0], k_descale=factors[1], v_descale=factors[2])
        torch.cuda.synchronize()
        q64, k64, v64 = (to64(x) * to64(f).repeat(x.shape[2] // HKV, axis=1)[:, None, :, None]
                         for x, f in zip((q, k, v), factors))
        ref, ref_lse = attention_reference(q64, k64, v64, causal=causal)
        alg, _ = attention_fp8_reference(q64, k64, v64, causal=causal)
        ok, err, bound = acceptance_check(to64(out), alg, ref)
        got_lse, finite = to64(lse), np.isfinite(ref_lse)
        lse_ok = np.array_equal(np.isneginf(got_lse), np.isneginf(ref_lse)) and (
            not finite.any() or float(np.max(np.abs(got_lse[finite] - ref_lse[finite]))) < 5e-3)
        ctx.record(f"fp8 d{d} {'causal' if causal else 'full'} {sq}x{sk}", ok and lse_ok,
                   f"max|out-ref64| {err:.3g} (bound {bound:.3g}), lse {'ok' if lse_ok else 'WRONG'}")
        # the calls users make: the first records a launch, the second swaps fresh pointers into it
        given = dict(q_descale=factors[0], k_descale=factors[1], v_descale=factors[2])
        again = [kernel(q, k, v, **given)[0] for _ in range(2)]
        torch.cuda.synchronize()
        ctx.record(f"fp8 d{d} remembered launch", all(torch.equal(x, out) for x in again), "the same bits as the first call")


WORKLOADS = {f.__name__: f for f in (
    fwd_mma_sync, fwd_wgmma, bwd_mma_sync, bwd_wgmma, bwd_wgmma_wide, bwd_deterministic, tails_large_scores, padded_views,
    runtime_layout, runtime_layout_bwd, pattern_sliding_window, pattern_document, pattern_bigbird,
    mods_named_tensors, softcap_alibi, cupy_streams, varlen, kvcache, kvcache_prefill, fp8_forward)}


def run_workload(name: str, seed: int) -> int:
    """One workload in this process (module doc); returns the exit code."""
    if os.environ.get("ATTNGEN_SANITIZE_NO_POOL") == "1":
        import cupy

        cupy.cuda.set_allocator(None)                  # every CuPy array its own cudaMalloc (module doc)
        cupy.cuda.set_pinned_memory_allocator(None)
    try:
        ctx = Context(seed)
        start = time.perf_counter()
        WORKLOADS[name](ctx)
        ctx.torch.cuda.synchronize()
    except Skip as exc:
        print(f"{MARK} SKIP {name}: {exc}", flush=True)
        return 0
    except Exception:
        traceback.print_exc()
        print(f"{MARK} CRASH {name}", flush=True)
        return CRASH_EXIT
    failed = [label for label, ok, _ in ctx.checks if not ok]
    print(f"{MARK} workload {name}: {len(ctx.checks) - len(failed)}/{len(ctx.checks)} checks passed "
          f"in {time.perf_counter() - start:.1f} s", flush=True)
    return CHECK_FAILED_EXIT if failed else 0


# ================================================================================================ driver


ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?")
RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s*"
                          r"\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)")
HAZARD_COUNT = re.compile(r"\[(\d+)\s+hazards?\]")
SANITIZER_LINE = re.compile(r"^=========\s?(.*)$")
QUIET_LINES = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "Target application returned",
               "Saved host backtrace", "Host Frame", "Device Frame", "at ", "by thread", "in ", "Address ")


def find_sanitizer(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("COMPUTE_SANITIZER"), shutil.which("compute-sanitizer"),
                      "/usr/local/cuda/bin/compute-sanitizer",
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "compute-sanitizer")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def sanitizer_help(sanitizer: str) -> str:
    try:
        return subprocess.run([sanitizer, "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def tool_flags(tool: str, args, help_text: str) -> list[str]:
    flags = []
    if tool == "racecheck":
        flags += ["--racecheck-report", args.racecheck_report]
    if args.extra_checks:
        wanted = []
        if tool in ("memcheck", "synccheck"):
            wanted.append(("--check-warpgroup-mma", "yes"))
        if tool == "memcheck":
            wanted.append(("--check-bulk-copy", "yes"))
        for flag, value in wanted:
            if flag in help_text:
                flags += [flag, value]
            else:
                print(f"note: this compute-sanitizer has no {flag}; left out", file=sys.stderr)
    return flags + shlex.split(args.sanitizer_args or "")


def parse_log(text: str, tool: str) -> dict:
    """errors / warnings from the sanitizer's summary (None: no summary), the workload's check lines, the
    first finding."""
    result = {"errors": None, "warnings": None, "hazards": None, "checks_passed": 0, "checks_failed": 0,
              "skipped": False, "crashed": False, "first_finding": None}
    race = RACE_SUMMARY.findall(text)
    # "ERROR SUMMARY: N errors", and past --print-limit also "ERROR SUMMARY: M errors were not displayed."
    summaries = [line for line in text.splitlines() if "ERROR SUMMARY:" in line]
    errors = [m for line in summaries if "not displayed" not in line for m in ERROR_SUMMARY.findall(line)]
    if not errors and summaries:
        errors = [max((m for line in summaries for m in ERROR_SUMMARY.findall(line)), key=int, default=None)]
        errors = [e for e in errors if e is not None]
    if tool == "racecheck" and race:
        displayed, errs, warns = race[-1]
        result["errors"], result["warnings"] = int(errs), int(warns)
        result["hazards"] = sum(int(n) for n in HAZARD_COUNT.findall(text)) or int(displayed)
    elif errors:
        result["errors"] = int(errors[-1])
    for line in text.splitlines():
        if line.startswith(f"{MARK} check "):
            if ": PASS" in line:
                result["checks_passed"] += 1
            elif ": FAIL" in line:
                result["checks_failed"] += 1
        elif line.startswith(f"{MARK} SKIP"):
            result["skipped"] = True
        elif line.startswith(f"{MARK} CRASH"):
            result["crashed"] = True
        elif result["first_finding"] is None:
            match = SANITIZER_LINE.match(line)
            if match:
                body = match.group(1).strip()
                if body and not body.startswith(QUIET_LINES):
                    result["first_finding"] = body[:300]
    return result


def status_of(run: dict, warnings_ok: bool = False) -> str:
    if run["timed_out"]:
        return "TIMEOUT"
    if run["tool"] != "plain" and run["errors"] is None:
        return f"NO SUMMARY (rc={run['rc']})"
    if run["errors"]:
        return "ERRORS"
    if run["warnings"] and not warnings_ok:
        return "WARNINGS"           # racecheck's warnings: the sanitizer's exit code counts them too
    if run["crashed"]:
        return "CRASH"
    if run["checks_failed"] or run["rc"] == CHECK_FAILED_EXIT:
        return "CHECK FAILED"
    if run["rc"] not in (0, SANITIZER_ERROR_EXIT):
        return f"EXIT {run['rc']}"
    if run["rc"] == SANITIZER_ERROR_EXIT and not (run["warnings"] and warnings_ok):
        return "ERRORS?"            # the sanitizer's exit code without a count in the summary
    return "skip" if run["skipped"] else "ok"


_print_lock = threading.Lock()


def execute(tool: str, workload: str, args, sanitizer: str | None, help_text: str, out_dir: Path, counter) -> dict:
    """One subprocess (under the sanitizer unless tool == "plain"); its log under out_dir."""
    child = [sys.executable, str(Path(__file__).resolve()), "--workload", workload, "--seed", str(args.seed)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", ATTNGEN_CACHE_DIR=str(args.cache_dir),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if tool == "plain":
        command = child
    else:
        command = [sanitizer, "--tool", tool, "--error-exitcode", str(SANITIZER_ERROR_EXIT),
                   "--print-limit", str(args.print_limit), *tool_flags(tool, args, help_text), *child]
        if tool in UNCACHED_TOOLS and not args.keep_caching:
            env.update(PYTORCH_NO_CUDA_MEMORY_CACHING="1", ATTNGEN_SANITIZE_NO_POOL="1")
    log_path = out_dir / f"{tool}__{workload}.log"
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(shlex.quote(c) for c in command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)       # the session this call started: the sanitizer and python
            rc = proc.wait()
    seconds = time.perf_counter() - start
    run = {"tool": tool, "workload": workload, "rc": rc, "seconds": round(seconds, 1), "timed_out": timed_out,
           "log": str(log_path), **parse_log(log_path.read_text(errors="replace"), tool)}
    run["status"] = status_of(run, args.warnings_ok)
    with _print_lock:
        counter[0] += 1
        print(f"[{counter[0]:3d}/{counter[1]}] {tool:9s} {workload:24s} errors={_cell(run['errors']):>5s} "
              f"checks={run['checks_passed']}/{run['checks_passed'] + run['checks_failed']}  "
              f"{seconds:7.1f} s  {run['status']}", flush=True)
    return run


def _cell(value) -> str:
    return "-" if value is None else str(value)


def print_table(runs: list[dict]) -> None:
    header = f"{'tool':10s} {'workload':24s} {'errors':>7s} {'warnings':>8s} {'checks':>8s} {'seconds':>8s}  status"
    print("\n" + header + "\n" + "-" * len(header))
    for r in runs:
        checks = f"{r['checks_passed']}/{r['checks_passed'] + r['checks_failed']}"
        print(f"{r['tool']:10s} {r['workload']:24s} {_cell(r['errors']):>7s} {_cell(r['warnings']):>8s} "
              f"{checks:>8s} {r['seconds']:8.1f}  {r['status']}")
    bad = [r for r in runs if r["status"] not in ("ok", "skip")]
    if bad:
        print("\nnot clean:")
        for r in bad:
            finding = f"\n      first finding: {r['first_finding']}" if r["first_finding"] else ""
            hazards = f" ({r['hazards']} hazards)" if r.get("hazards") else ""
            print(f"  {r['tool']} {r['workload']}: {r['status']}{hazards}, log {r['log']}{finding}")


def drive(args) -> int:
    tools = [t for t in args.tools.split(",") if t]
    unknown = [t for t in tools if t not in TOOLS]
    workloads = list(WORKLOADS) if args.workloads in (None, "", "all") else [w for w in args.workloads.split(",") if w]
    unknown += [w for w in workloads if w not in WORKLOADS]
    if unknown:
        print(f"error: unknown tool/workload {unknown}; tools: {', '.join(TOOLS)}; workloads: {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    sanitizer = find_sanitizer(args.sanitizer) if tools else None
    if tools and sanitizer is None:
        print("error: compute-sanitizer not found (give --sanitizer PATH, or put it on PATH)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    help_text = sanitizer_help(sanitizer) if sanitizer else ""
    if sanitizer:
        version = subprocess.run([sanitizer, "--version"], capture_output=True, text=True).stdout.strip()
        print(f"{sanitizer}: {' | '.join(version.splitlines()) or '?'}")
    print(f"logs: {out_dir}   cache: {args.cache_dir}   jobs: {args.jobs}   timeout: {args.timeout} s")
    runs: list[dict] = []
    plan = ([] if args.no_warm else [("plain", w) for w in workloads]) + [(t, w) for t in tools for w in workloads]
    counter = [0, len(plan)]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        # the plain runs first, all of them, so that nothing compiles under a sanitizer
        if not args.no_warm:
            runs += list(pool.map(lambda w: execute("plain", w, args, sanitizer, help_text, out_dir, counter),
                                  workloads))
        futures = [pool.submit(execute, t, w, args, sanitizer, help_text, out_dir, counter)
                   for t in tools for w in workloads]
        runs += [f.result() for f in futures]
    print_table(runs)
    (out_dir / "summary.json").write_text(json.dumps(runs, indent=1))
    bad = [r for r in runs if r["status"] not in ("ok", "skip")]
    errors = sum(r["errors"] or 0 for r in runs)
    print(f"\n{len(runs)} runs, {errors} sanitizer errors, {len(bad)} not clean; summary {out_dir / 'summary.json'}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Workloads: " + ", ".join(WORKLOADS) + " (--list describes them).")
    parser.add_argument("--workload", help="run this one workload here, without a sanitizer (the child mode)")
    parser.add_argument("--list", action="store_true", help="list the workloads and what each covers")
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, of: " + ", ".join(TOOLS)
                        + " (default: all; '' runs the plain correctness pass only)")
    parser.add_argument("--workloads", default="all", help="comma-separated workload names (default: all)")
    parser.add_argument("--out", default="/tmp/attngen-sanitize", help="folder for the logs and summary.json")
    parser.add_argument("--cache-dir", default=os.environ.get("ATTNGEN_CACHE_DIR") or "/tmp/attngen-sanitize-cache",
                        help="ATTNGEN_CACHE_DIR shared by every run (default: $ATTNGEN_CACHE_DIR or "
                             "/tmp/attngen-sanitize-cache)")
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                        help=f"runs at a time, each its own process on the one GPU (default {DEFAULT_JOBS}: half the "
                             "CPU cores, at most 8; the sanitizers' time is mostly on the host)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-warm", action="store_true", help="skip the plain (unsanitized) pass")
    parser.add_argument("--sanitizer", help="path of compute-sanitizer (default: $COMPUTE_SANITIZER, PATH, "
                                            "/usr/local/cuda/bin)")
    parser.add_argument("--print-limit", type=int, default=100, help="records the sanitizer prints per run")
    parser.add_argument("--racecheck-report", default="analysis", choices=("analysis", "hazard", "all"),
                        help="racecheck's --racecheck-report (default analysis)")
    parser.add_argument("--extra-checks", action="store_true",
                        help="add --check-warpgroup-mma / --check-bulk-copy where offered")
    parser.add_argument("--warnings-ok", action="store_true",
                        help="racecheck warnings (hazards it ranks below errors) do not make a run unclean")
    parser.add_argument("--keep-caching", action="store_true",
                        help="keep torch's caching allocator and CuPy's pool under memcheck/initcheck")
    parser.add_argument("--sanitizer-args", default="", help="more compute-sanitizer options, one string")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in WORKLOADS.items():
            print(f"{name}\n    " + " ".join(fn.__doc__.split()))
        return 0
    if args.workload:
        if args.workload not in WORKLOADS:
            parser.error(f"--workload: unknown {args.workload!r}; one of {', '.join(WORKLOADS)}")
        return run_workload(args.workload, args.seed)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
