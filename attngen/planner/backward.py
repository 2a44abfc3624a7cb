"""Backward plan: tiles for the two backward kernels, from the same budget model as the forward.

- dkdv pass: a CTA holds BLOCK_N keys (32 per pair of warps, or per four at d256) and their values, streams
  the query tiles (BLOCK_M rows) of its GQA group with dO, and accumulates CHUNK columns of dK and of dV (a
  warp: its 32 keys, its half or quarter of the columns; the scores: its 32 keys, its share of the queries;
  P^T and dS^T through shared memory). By default it also adds dQ += dS K for its keys to an fp32 buffer with
  atomics (fused_dq).
- dq pass (spec `deterministic: true` only): a CTA holds BLOCK_M query rows (16 per warp) and their dO,
  streams K/V tiles of BLOCK_N keys, and accumulates CHUNK columns of dQ; no atomics anywhere.

Registers bound the accumulators, so wide heads split the gradient columns into chunks, one CTA each;
every chunk recomputes the scores, which the ranking counts as extra matmul work. Shared memory holds the
resident tiles plus a STAGES-deep ring of the streamed ones (rows padded like the forward's).

On Hopper (sm_90a) the fused dK/dV pass has a wgmma form, ranked first where it applies (head dims that
are multiples of 32, padded with zeros to the copy engine's 64-column chunks): a producer warpgroup brings
K/V once and a ring of Q (with the rows' LSE and delta) and dO tiles by TMA; two compute warpgroups run the
five matmuls per step as wgmma, dQ included. It has two layouts:
- keys as rows (padded head dims 64 or 128): each warpgroup owns 64 keys as the wgmma M and holds all of
  their dK and dV rows; P^T and dS^T feed the products from registers, dS^T reaches dQ through shared memory.
- keys as columns (wider heads, as FlashAttention-3 does for 192 and 256): 64 keys per CTA, 32 per warpgroup
  as the wgmma N, so the accumulators are dK^T and dV^T (head_dim / 64 tiles of 64 x 32: 256 columns cost 64
  registers each instead of 128); P^T and dS^T go through shared memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .device import Device
from ..errors import PlanError
from .forward import (SMEM_ROW_PAD, WGMMA_COMPUTE_GROUPS, WGMMA_CONSUMER_REGS, WGMMA_SMEM_ALIGN, WarpLaunch, occupancy,
                   round_up)
from ..spec import Spec
from ..variant import variant_of

REG_OVERHEAD_BACKWARD = 64     # addresses, counters, ldmatrix fragments in flight (as the forward's)
# dK/dV warp layouts, (keys per warp, warps sharing them), preferred first: 32 keys make each B fragment feed
# two mma; the warps sharing them split the step's queries (S^T, dP^T) and the chunk's columns (dK, dV). Four
# sharing keep chunks wider than 128 (d256's whole head: one pass over the scores) within the registers, 64
# columns of dK and dV a warp: d256 on the H200 ran 1.21x (causal 1.28x) the pairs' two chunks of 128.
DKDV_LAYOUTS = ((32, 2), (32, 4), (16, 1))
# Registers per thread by layout, (per gradient column of the chunk, per query of the step, overhead).
# (32, 2), FlashAttention-2's pairs: fitted to ptxas on sm_90 where it decides (d128 64x128 chunk 128: 253
# measured, no spill; smaller tiles take up to 35 more, as ptxas spends what the 255 cap leaves).
# (32, 4): half the pair's columns and queries a warp, more addresses; fitted at d256 64x64 chunk 256 (254 on
# sm_90, 252 on sm_80); d192 and d128 take up to 25 more. (16, 1), a warp has every query and column of its
# keys: fitted on sm_80/sm_90, d64-256, within 6 registers.
# Score modifiers are not counted: where they push a tile into spills, the build takes the next candidate.
DKDV_REGS = {(32, 2): (1.0, 1.4, 36), (32, 4): (0.5, 0.7, 82), (16, 1): (1.25, 1.7, 36)}
# Head dims off the multiples of 8 load and store element by element (GLOBAL_VECTOR 1): more addresses live
# (d97's 64x128 chunk-112 tile took 255 registers and 8 bytes of spill where the estimate gave 237).
DKDV_UNALIGNED_REGS = 20
# The dK/dV pass's measured best CTA size on sm_90 (bench_backward_tiles.py, BENCHMARKS.md): 4 warps (64
# keys) when it computes dK/dV only, 8 warps (128 keys) when it also adds dQ (half the atomics per FLOP).
DKDV_WARPS, DKDV_WARPS_FUSED = 4, 8
RESIDENT_WARPS_ENOUGH = 8      # warps per SM past which more resident warps stop ranking a tile higher
# The wgmma dK/dV pass, keys as rows: 64 keys per compute warpgroup (the wgmma M of S^T); steps of 64 queries
# at head_dim 128 and 128 at 64, so that each step's dQ is two 64 x 64 parts, one per warpgroup. A 3-deep ring
# measured the same as 2 (d128 16384: 417 vs 422 TFLOP/s; causal 414 vs 401; d64 396 vs 394).
WGMMA_BWD_KEYS_PER_GROUP, WGMMA_BWD_STAGES = 64, 2
WGMMA_BWD_ROW_HEAD_DIMS = (64, 128)   # padded head_dim; dK and dV rows (d/2 + d_v/2 registers) stay in registers
WGMMA_BWD_REG_OVERHEAD = 40        # descriptors, barrier addresses, the step's LSE/delta, loop state
# Keys as columns: 32 keys per warpgroup (the wgmma N), 64 per CTA, steps of 64 queries; each accumulator tile
# of 64 head columns x 32 keys is 16 registers per thread.
WGMMA_BWD_COLUMN_KEYS_PER_GROUP = 32
WGMMA_BWD_PAD = 64                 # TMA brings 64-column chunks: head dims are padded to them with zeros


def wgmma_dkdv_unsupported(spec: Spec, device: Device) -> str:
    """Why the wgmma dK/dV pass cannot serve this spec on this device ("" when it can)."""
    if device.cc != 90:
        return f"wgmma needs sm_90 (Hopper), not {device.arch}"
    if spec.deterministic:
        return "deterministic: the wgmma pass adds dQ with atomics"
    if spec.head_dim % 32 or spec.head_dim_v % 32:
        return (f"wgmma backward: head_dim and head_dim_v must be multiples of 32 (padded with zeros to 64-column "
                f"chunks), got {spec.head_dim}/{spec.head_dim_v}")
    # Pattern masks are offered too: where a ptxas serialises the pass's wgmma behind the pattern's step
    # classification (seen as C7519 with the H200 machine's NVRTC; not with 13.5), the build rejects the
    # candidate (build.clean) and takes the mma.sync one.
    return ""


@dataclass(frozen=True)
class WgmmaDkdvShape:
    """The wgmma dK/dV pass's layout for a pair of padded head dims: keys as the wgmma M (rows) or N (columns)."""
    keys_as_columns: bool
    block_m: int              # queries per step
    block_n: int              # keys per CTA
    registers: int            # estimated per compute thread


def wgmma_dkdv_shape(d: int, dim_v: int) -> WgmmaDkdvShape:
    """Keys as rows where its registers fit (padded d 64 or 128), else keys as columns. d and dim_v padded."""
    if d in WGMMA_BWD_ROW_HEAD_DIMS:
        block_m = 64 * 64 * WGMMA_COMPUTE_GROUPS // d     # dQ of a step: two 64 x 64 parts, one per warpgroup
        # dK and dV accumulators (d/2 and dim_v/2 per thread), S^T and dP^T (block_m/2 each; dQ's 32 reuse them)
        regs = (d + dim_v) // 2 + block_m + WGMMA_BWD_REG_OVERHEAD
        if regs <= WGMMA_CONSUMER_REGS:
            return WgmmaDkdvShape(False, block_m, WGMMA_BWD_KEYS_PER_GROUP * WGMMA_COMPUTE_GROUPS, regs)
    keys = WGMMA_BWD_COLUMN_KEYS_PER_GROUP
    # dK^T and dV^T (16 registers per 64 columns), S and dP (16 each), then a 64 x 64 dQ tile (32) in their place
    regs = (d + dim_v) // 64 * (keys // 2) + keys + WGMMA_BWD_REG_OVERHEAD
    return WgmmaDkdvShape(True, 64, keys * WGMMA_COMPUTE_GROUPS, regs)


def wgmma_dkdv_smem_bytes(d: int, dim_v: int, shape: WgmmaDkdvShape, stages: int) -> int:
    """K and V, a ring of Q and dO tiles with 8 bytes of row statistics per query, two dS^T buffers (one
    is read by the other warpgroup's dQ while this one writes); keys as rows: two fp32 64 x 64 dQ parts
    (staged for the bulk reduction); keys as columns: P^T (dQ is added from registers); then the mbarriers
    (kv, then per slot q, do, empty) in 16-byte units; plus the 1 KB the launch adds to align to the swizzle
    period. d and dim_v padded."""
    block_m, block_n = shape.block_m, shape.block_n
    scores = block_n * block_m * 2
    tiles = (block_n * (d + dim_v) * 2 + stages * (block_m * (d + dim_v) * 2 + block_m * 8) + 2 * scores
             + (scores if shape.keys_as_columns else WGMMA_COMPUTE_GROUPS * 64 * 64 * 4))
    barriers = (1 + 3 * stages) * 8
    return WGMMA_SMEM_ALIGN + tiles + round_up(barriers, 16)


def _wgmma_dkdv_pass(spec: Spec, device: Device, stages: int) -> tuple[BackwardPass | None, str]:
    why = wgmma_dkdv_unsupported(spec, device)
    if why:
        return None, why
    d, dim_v = round_up(spec.head_dim, WGMMA_BWD_PAD), round_up(spec.head_dim_v, WGMMA_BWD_PAD)
    shape = wgmma_dkdv_shape(d, dim_v)
    block_m, block_n = shape.block_m, shape.block_n
    if variant_of(spec).schedule == "runtime" or variant_of(spec).block_table:
        rows, cols = spec.mask_block_size
        if rows % block_m or cols % block_n:
            return None, f"tiles {block_m}x{block_n} do not divide the mask blocks {rows}x{cols}"
    smem = wgmma_dkdv_smem_bytes(d, dim_v, shape, stages)
    if smem > device.smem_per_block:
        return None, f"shared memory {smem} B exceeds {device.smem_per_block} B"
    if shape.registers > WGMMA_CONSUMER_REGS:
        return None, f"~{shape.registers} registers/thread exceed {WGMMA_CONSUMER_REGS}"
    warps = 4 * (1 + WGMMA_COMPUTE_GROUPS)
    # S, dP, dV, dK and dQ against the forward's S and O (padding included: it is computed)
    factor = (2 * d + 2 * dim_v + d) / (d + dim_v)
    return BackwardPass(arch=device.arch, kind="dkdv", block_m=block_m, block_n=block_n, warps=warps, stages=stages,
                        chunk=max(d, dim_v), n_chunks=1, head_dim_padded=d, head_dim_v_padded=dim_v, smem_row_pad=0,
                        smem_bytes=smem, regs_estimate=shape.registers, ctas_per_sm=1, matmul_factor=factor,
                        fused_dq=True, vector_atomics=True, path="wgmma",
                        keys_as_columns=shape.keys_as_columns, warp_keys=block_n // (4 * WGMMA_COMPUTE_GROUPS)), ""


@dataclass(frozen=True, kw_only=True)
class BackwardPass(WarpLaunch):
    arch: str
    kind: str                 # "dq" | "dkdv"
    block_m: int              # query rows per CTA (dq) or per step (dkdv)
    block_n: int              # keys per step (dq) or per CTA (dkdv)
    warps: int
    stages: int
    chunk: int                # gradient columns per CTA
    n_chunks: int
    head_dim_padded: int
    head_dim_v_padded: int
    smem_row_pad: int
    smem_bytes: int
    regs_estimate: int
    ctas_per_sm: int
    matmul_factor: float      # matmul work relative to one forward, recomputation included
    fused_dq: bool            # dkdv: also adds dQ with atomics (no dq pass)
    vector_atomics: bool      # sm_90+: red.global.add.v2.f32 (two columns per instruction)
    path: str = "mma_sync"    # "mma_sync" | "wgmma" (dK/dV on sm_90a)
    keys_as_columns: bool = False   # wgmma: keys are the wgmma N and the accumulators dK^T, dV^T (wide heads)
    warp_keys: int = 16       # dkdv: keys per warp (mma_sync 32: two warps split their queries and columns)


@dataclass(frozen=True)
class BackwardPlan:
    arch: str
    dq: BackwardPass | None   # the separate dQ pass (deterministic), or None: dQ comes from the dK/dV pass
    dkdv: BackwardPass

    @property
    def passes(self) -> dict:
        """kind -> pass, in launch order."""
        return {"dq": self.dq, "dkdv": self.dkdv} if self.dq else {"dkdv": self.dkdv}

    def to_dict(self) -> dict:
        return {"arch": self.arch} | {kind: p.to_dict() for kind, p in self.passes.items()}


def pass_kinds(spec: Spec) -> tuple[str, ...]:
    """The passes a spec's backward runs: dK/dV with dQ fused, or (deterministic) dQ and dK/dV apart."""
    return ("dq", "dkdv") if spec.deterministic else ("dkdv",)


def _chunks(d: int, dim_v: int, kind: str, widest: int = 128, narrower_than: int = 0) -> list[int]:
    """Chunk widths (multiples of 16, at most `widest`, wider than `narrower_than`) that divide every gradient's
    columns, widest first."""
    widths = (d,) if kind == "dq" else (d, dim_v)
    return [c for c in range(min(max(widths), widest), narrower_than, -16) if all(w % c == 0 for w in widths)]


def _pass(kind, spec: Spec, device: Device, block_m, block_n, warps, chunk, stages,
          warp_keys: int = 16, sharers: int = 1) -> tuple[BackwardPass | None, str]:
    variant = variant_of(spec)
    if variant.schedule == "runtime" or variant.block_table:
        rows, cols = spec.mask_block_size          # a tile must lie inside one block of the layout / table
        if rows % block_m or cols % block_n:
            return None, f"tiles {block_m}x{block_n} do not divide the mask blocks {rows}x{cols}"
    d, dim_v = round_up(spec.head_dim, 16), round_up(spec.head_dim_v, 16)
    row = lambda cols: (cols + SMEM_ROW_PAD) * spec.elem_bytes  # noqa: E731
    if kind == "dq":
        smem = block_m * (row(d) + row(dim_v)) + stages * block_n * (row(d) + row(dim_v))
        n_chunks = d // chunk
        # acc dQ, then S/P, dP/dS (fp32) and the packed dS per thread; LSE and delta per row
        regs = chunk // 2 + block_n + block_n // 4 + REG_OVERHEAD_BACKWARD
        matmul = n_chunks * (d + dim_v) + d            # S and dP per chunk, dQ once, per (row, key)
    else:
        # K and V, the ring of Q and dO with 8 bytes of row statistics; P^T and dS^T where two warps share keys
        # (they exchange their shares of the queries), else dS^T for the warps that add dQ
        if block_m % (16 * sharers) or chunk % (8 * sharers):
            return None, f"{sharers} warps sharing keys cannot split {block_m} queries and {chunk} columns"
        scores_tiles = 2 if warp_keys == 32 else 0 if spec.deterministic else 1
        smem = (block_n * (row(d) + row(dim_v)) + stages * block_m * (row(d) + row(dim_v) + 8)
                + scores_tiles * block_n * row(block_m))
        n_chunks = max(d, dim_v) // chunk
        # acc dK and dV (chunk/2 each), S^T and dP^T, a packed fragment, the columns' LSE (see the constants)
        per_col, per_query, overhead = DKDV_REGS[warp_keys, sharers]
        regs = int(per_col * chunk + per_query * block_m) + overhead + (DKDV_UNALIGNED_REGS if variant.global_vector == 1 else 0)
        matmul = n_chunks * (d + dim_v) + d + dim_v       # S^T and dP^T per chunk, dK and dV once
        if not spec.deterministic:
            matmul += d                             # dQ once (each chunk adds its columns)
    if smem > device.smem_per_block:
        return None, f"shared memory {smem} B exceeds {device.smem_per_block} B"
    if regs > device.max_regs_per_thread:
        return None, f"~{regs} registers/thread exceed {device.max_regs_per_thread}"
    ctas = occupancy(device, smem, regs, 32 * warps)
    if ctas < 1:
        return None, "no CTA fits on an SM"
    factor = matmul / (d + dim_v)
    return BackwardPass(arch=device.arch, kind=kind, block_m=block_m, block_n=block_n, warps=warps, stages=stages,
                        chunk=chunk, n_chunks=n_chunks, head_dim_padded=d, head_dim_v_padded=dim_v,
                        smem_row_pad=SMEM_ROW_PAD, smem_bytes=smem, regs_estimate=regs, ctas_per_sm=ctas,
                        matmul_factor=factor, fused_dq=kind == "dkdv" and not spec.deterministic,
                        vector_atomics=device.cc >= 90, warp_keys=warp_keys), ""


def pass_candidates(kind: str, spec: Spec, device: Device) -> list[tuple[tuple, BackwardPass | None, str]]:
    """((block_m, block_n, warps, chunk, stages, path, warp_keys), pass or None, why rejected) for every
    configuration, best first. Two warps and a single stage (no overlap of loads and math) exist for small shared
    memories."""
    d, dim_v = round_up(spec.head_dim, 16), round_up(spec.head_dim_v, 16)
    out = []
    if kind == "dkdv" and device.cc == 90:
        p, why = _wgmma_dkdv_pass(spec, device, WGMMA_BWD_STAGES)
        shape = wgmma_dkdv_shape(round_up(spec.head_dim, WGMMA_BWD_PAD), round_up(spec.head_dim_v, WGMMA_BWD_PAD))
        out.append(((shape.block_m, shape.block_n, 4 * (1 + WGMMA_COMPUTE_GROUPS), max(d, dim_v), WGMMA_BWD_STAGES,
                     "wgmma", shape.block_n // (4 * WGMMA_COMPUTE_GROUPS)), p, why))
    for warps in (2, 4, 8):
        for other in (32, 64, 128) if kind == "dq" else (32, 64):
            for warp_keys, sharers in ((16, 1),) if kind == "dq" else DKDV_LAYOUTS:
                if warps % sharers:
                    continue
                # four warps a key tile only for the chunks a pair cannot hold: at d128 the H200 ran its 64x64
                # tile 1.15x slower than the 16-key 32x128 (BENCHMARKS.md, issue 17 round 8)
                widths = dict(widest=256, narrower_than=128) if sharers == 4 else {}
                for chunk in _chunks(d, dim_v, kind, **widths):
                    for stages in (3, 2, 1):
                        block_m, block_n = (16 * warps, other) if kind == "dq" else (other, warp_keys * warps // sharers)
                        p, why = _pass(kind, spec, device, block_m, block_n, warps, chunk, stages, warp_keys, sharers)
                        out.append(((block_m, block_n, warps, chunk, stages, "mma_sync", warp_keys), p, why))

    def rank(item):
        p = item[1]
        if p is None:
            return (math.inf,)
        # dQ: overlapped loads, least recomputation, the biggest tile (operand reuse), more CTAs per SM.
        # dK/dV: least recomputation, then enough resident warps to hide the step's latencies (up to 8: d256's
        # pass on the H200 ran 32x64 on 4 warps at 0.79x and 32x32 on 2 at 0.50x the speed of 32x128 on 8
        # with a ring one stage shorter), overlapped loads, its measured best warp count, the biggest tile.
        if p.path == "wgmma":     # the tensor cores' own path first
            return (-math.inf,)
        if kind == "dq":
            return (-p.stages, p.matmul_factor, -(p.block_m * p.block_n), -p.ctas_per_sm)
        preferred = 0 if p.warps == (DKDV_WARPS_FUSED if p.fused_dq else DKDV_WARPS) else 1
        resident_warps = min(RESIDENT_WARPS_ENOUGH, p.ctas_per_sm * p.warps)
        return (p.matmul_factor, -resident_warps, -p.stages, preferred, -(p.block_m * p.block_n), -p.warp_keys,
                -p.ctas_per_sm)
    return sorted(out, key=rank)


def make_backward_plan(spec: Spec, device: Device) -> BackwardPlan:
    chosen = {"dq": None}
    for kind in pass_kinds(spec):
        ranked = pass_candidates(kind, spec, device)
        if not ranked or ranked[0][1] is None:
            raise PlanError(f"no {kind} backward tile fits {device.arch} for head_dim={spec.head_dim}, "
                            f"head_dim_v={spec.head_dim_v}: " + "; ".join(sorted({why for _, _, why in ranked})))
        chosen[kind] = ranked[0][1]
    return BackwardPlan(device.arch, chosen["dq"], chosen["dkdv"])


def explain_backward(spec: Spec, device: Device) -> str:
    how = ("two passes, no atomics (deterministic)" if spec.deterministic else
           "one pass, dQ added with fp32 atomics (deterministic: true gives a separate dQ pass)")
    lines = [f"backward on {device.arch}: {how}; dK/dV ranked by matmul work (chunks recompute the scores), "
             f"then warps resident per SM (up to {RESIDENT_WARPS_ENOUGH}), stages, the measured warp count "
             f"({DKDV_WARPS_FUSED} with dQ, {DKDV_WARPS} without), tile area, CTAs per SM; dQ by stages, matmul "
             f"work, tile area, CTAs per SM"]
    if device.cc == 90:
        lines.append("  sm_90: the wgmma dK/dV pass first where it applies (build keeps it only if ptxas reports no "
                     "spills), head dims padded to 64; keys as rows (d 64/128: dQ by bulk reductions) or as columns "
                     "(wider: dK^T, dV^T accumulators, dQ by vector atomics); smem = 1024 + block_n*(d+dv)*2 + "
                     "stages*(block_m*(d+dv)*2 + 8*block_m) + 2*block_n*block_m*2 + (rows: 2*64*64*4; columns: "
                     "block_n*block_m*2) + mbarriers")
    for kind in pass_kinds(spec):
        lines.append(f"  {kind}: {'block_m (CTA) x block_n (step)' if kind == 'dq' else 'block_m (step) x block_n (CTA)'}")
        if kind == "dkdv":
            lines.append("    a warp's 32 keys shared by 2 warps (by 4 for chunks over 128: block_n = 8*warps), "
                         "or 16 keys alone; mma_sync regs ~ per_col*chunk + per_query*block_m + overhead, per "
                         "layout: " + ", ".join(f"{k}/{n}: {c}, {q}, {o}" for (k, n), (c, q, o) in DKDV_REGS.items()))
        per_warp = "rows" if kind == "dq" else "keys"          # a warp's query rows (dq) or keys (dkdv)
        lines.append(f"    {'':2}{'tile':>9} {'path':>8} {'warps':>5} {per_warp:>4} {'chunk':>5} {'stages':>6} {'smem B':>7} "
                     f"{'regs':>5} {'CTAs':>4} {'matmul':>6}  note")
        ranked = pass_candidates(kind, spec, device)
        for i, ((bm, bn, warps, chunk, stages, path, warp_keys), p, why) in enumerate(ranked):
            mark = "->" if i == 0 and p else "  "
            head = f"    {mark}{bm:>4}x{bn:<4} {path:>8} {warps:>5} {warp_keys:>4} {chunk:>5} {stages:>6}"
            if p:
                lines.append(f"{head} {p.smem_bytes:>7} {p.regs_estimate:>5} {p.ctas_per_sm:>4} {p.matmul_factor:>6.2f}")
            else:
                lines.append(f"{head} {'':>7} {'':>5} {'':>4} {'':>6}  rejected: {why}")
    return "\n".join(lines)
