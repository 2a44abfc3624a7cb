"""DecodePlan: the decode kernel over a KV cache (issue 15), and how many splits its keys get.

Decode is memory-bound: each new token reads its sequence's whole K/V cache once, so the plan is about
bytes in flight and about filling the SMs, not about tensor-core tiles.

- One CTA owns BLOCK_M = 16 packed query rows of one KV head of one sequence: the GQA group's query heads
  times the new tokens, token-major (a group of 4 at Sq = 1 fills 4 rows). Every K/V byte is read once for
  the whole group. More rows (bigger groups, speculative tokens) take more row blocks.
- Its 4 warps split each stage's CTA_KEYS = 4 x BLOCK_N keys, a BLOCK_N-key slice each, with their own online
  softmax; they merge in shared memory at the end.
- `stages` K/V stages stream through a cp.async ring: enough for two CTAs per SM at DECODE_SMEM_TARGET bytes.
- Split-KV: when batch x heads_kv x row blocks CTAs do not fill the GPU, the keys are split over
  `splits` CTAs per (sequence, KV head, row block), and a combine kernel merges their partial (O, LSE). The
  split count depends on host-known sizes only (the cache's capacity, not cache_seqlens), so a launch's grid
  is fixed by the input shapes and can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .device import Device
from .forward import (SMEM_RESERVED_PER_CTA, SMEM_ROW_PAD, WGMMA_CONSUMER_REGS, WGMMA_PRODUCER_REGS, Plan, WarpLaunch,
                      candidates, round_up, wgmma_registers)
from ..errors import PlanError
from ..spec import Spec

DECODE_ROWS = 16              # packed query rows per CTA: one mma m-tile
DECODE_WARPS = 4
DECODE_KEYS_PER_WARP = 16     # keys per warp per stage: CTA_KEYS = 64
DECODE_SMEM_TARGET = 110 * 1024   # per CTA: two CTAs per SM on sm_80/sm_90 (164/228 KB)
MIN_STAGES, MAX_STAGES = 2, 4
MAX_SPLITS = 64               # the split count's bound (the partial buffers' size)
MIN_TILES_PER_SPLIT = 4       # a split streams at least this many stages (its prologue and merge amortised)
WAVE_FILL = 0.9               # the busy fraction of the CTA slots a split count must reach
# New tokens per sequence from which a call runs the tiled Hopper forward over the cache (chunked prefill)
# instead of the decode kernel: its 128-row query tiles keep the tensor cores busy, where the decode kernel's
# 16-row blocks would each read the whole cache again.
PREFILL_MIN_QUERIES = 64


@dataclass(frozen=True, kw_only=True)
class DecodePlan(WarpLaunch):
    arch: str
    block_m: int              # packed query rows per CTA
    block_n: int              # keys per warp per stage
    warps: int
    stages: int
    head_dim_padded: int
    head_dim_v_padded: int
    smem_row_pad: int
    smem_bytes: int
    ctas_per_sm: int
    m_tiles: int = 1
    path: str = "mma_sync"

    @property
    def mma_warps(self) -> int:
        """Warps that own query rows: one, as far as the tile shape goes (every warp holds all 16 rows, over
        its own slice of the keys)."""
        return 1

    @property
    def cta_keys(self) -> int:
        return self.block_n * self.warps


def decode_smem_bytes(spec: Spec, stages: int) -> int:
    d, dim_v = round_up(spec.head_dim, 16), round_up(spec.head_dim_v, 16)
    q_tile = DECODE_ROWS * (max(d, dim_v) + SMEM_ROW_PAD)
    kv = stages * DECODE_KEYS_PER_WARP * DECODE_WARPS * ((d + SMEM_ROW_PAD) + (dim_v + SMEM_ROW_PAD))
    merge = DECODE_WARPS * DECODE_ROWS * dim_v * 2     # the warps' fp32 partial O (in bf16 units), in the ring's place
    return max(q_tile + kv, q_tile + merge) * spec.elem_bytes + merge_stats_bytes()


def merge_stats_bytes() -> int:
    """Each warp's row maxima and sums, then each row's total, for the merge (fp32)."""
    return (2 * DECODE_WARPS + 2) * DECODE_ROWS * 4


def make_decode_plan(spec: Spec, device: Device) -> DecodePlan:
    """The deepest ring under DECODE_SMEM_TARGET (at least MIN_STAGES, and under the device's limit)."""
    fits = [s for s in range(MIN_STAGES, MAX_STAGES + 1) if decode_smem_bytes(spec, s) <= device.smem_per_block]
    if not fits:
        raise PlanError(f"decode: {spec.name} needs {decode_smem_bytes(spec, MIN_STAGES)} B of shared memory "
                        f"for {MIN_STAGES} stages; {device.arch} allows {device.smem_per_block} B per CTA")
    under = [s for s in fits if decode_smem_bytes(spec, s) <= DECODE_SMEM_TARGET]
    stages = max(under or fits[:1])
    smem = decode_smem_bytes(spec, stages)
    ctas = max(1, min(device.smem_per_sm // (smem + SMEM_RESERVED_PER_CTA), device.max_threads_per_sm // (32 * DECODE_WARPS)))
    return DecodePlan(arch=device.arch, block_m=DECODE_ROWS, block_n=DECODE_KEYS_PER_WARP, warps=DECODE_WARPS,
                      stages=stages, head_dim_padded=round_up(spec.head_dim, 16),
                      head_dim_v_padded=round_up(spec.head_dim_v, 16), smem_row_pad=SMEM_ROW_PAD, smem_bytes=smem,
                      ctas_per_sm=ctas)


def decode_splits(plan: DecodePlan, sms: int, batch: int, heads_kv: int, row_blocks: int, capacity: int,
                  requested: int = 0) -> int:
    """How many CTAs share one (sequence, KV head, row block)'s keys. requested > 0 is the caller's
    (FlashAttention's num_splits), capped at MAX_SPLITS. 0: the fewest splits whose CTAs fill their waves
    (ctas * s over ceil(ctas * s / slots) whole waves of slots = SMs x CTAs per SM) to WAVE_FILL, else the
    best-filled count: every split adds a CTA prologue and a partial (O, LSE) to write and merge. At most one
    split per MIN_TILES_PER_SPLIT stages of the cache's capacity, at most MAX_SPLITS. 256 CTAs on 264 slots
    keep 1 split; 8 CTAs take 30."""
    if requested > 0:
        return min(requested, MAX_SPLITS)
    ctas, slots = batch * heads_kv * row_blocks, sms * plan.ctas_per_sm
    useful = max(1, min(MAX_SPLITS, capacity // (MIN_TILES_PER_SPLIT * plan.cta_keys)))

    def fill(s):
        return ctas * s / (math.ceil(ctas * s / slots) * slots)
    enough = [s for s in range(1, useful + 1) if fill(s) >= WAVE_FILL]
    return enough[0] if enough else max(range(1, useful + 1), key=lambda s: (fill(s), -s))


def explain_decode(spec: Spec, device: Device, shapes=((1, 8, 32768), (8, 8, 32768), (32, 8, 32768),
                                                       (32, 8, 4096))) -> str:
    """`attngen plan` for a `layout: kvcache` spec: the kernels, the ring's budget, and the split counts the
    launch would choose at a few (batch, heads_kv, capacity) shapes (one query token, GQA group <= 16)."""
    plan = make_decode_plan(spec, device)
    d, dim_v = plan.head_dim_padded, plan.head_dim_v_padded
    cache = f"paged, {spec.page_size} rows per page" if spec.page_size else "contiguous per sequence"
    if not spec.page_size:
        rows = "a sequence's rows are contiguous: one address per warp slice"
    elif spec.page_size % plan.block_n == 0:
        rows = f"{plan.block_n} divides the page size: one block-table read per warp slice (it lies in one page)"
    else:
        rows = f"pages of {spec.page_size} rows do not hold whole {plan.block_n}-key slices: one block-table read per row"
    lines = [
        f"decode over a KV cache ({cache}) on {device.arch}: three kernels in one module, on the caller's stream:",
        "  kvcache_append  new k, v rows into the cache at cache_seqlens[b] + i (when given)",
        f"  decode          one CTA per (split, KV head x row block, sequence): {plan.block_m} packed query rows (the "
        f"GQA group's heads x the new tokens), {plan.warps} warps each streaming a {plan.block_n}-key slice of every "
        f"{plan.cta_keys}-key stage",
        "  decode_combine  merges the splits' partial (O, LSE) when the keys are split",
        f"key rows: {rows}",
        f"smem = (Q tile {plan.block_m} x ({max(d, dim_v)} + {plan.smem_row_pad}) + stages x {plan.cta_keys} x "
        f"(({d} + {plan.smem_row_pad}) + ({dim_v} + {plan.smem_row_pad}))) x 2 B + merge statistics "
        f"{merge_stats_bytes()} B",
        f"  stages: the deepest ring under {DECODE_SMEM_TARGET} B (two CTAs per SM), at least {MIN_STAGES}: "
        f"{plan.stages} stages -> {plan.smem_bytes} B, {plan.ctas_per_sm} CTAs per SM",
        f"splits: the fewest whose CTAs fill {WAVE_FILL:.0%} of their waves of {device.sm_count} SMs x "
        f"{plan.ctas_per_sm} slots, at most {MAX_SPLITS} and one per {MIN_TILES_PER_SPLIT} stages of capacity:",
    ]
    for batch, heads_kv, capacity in shapes:
        s = decode_splits(plan, device.sm_count, batch, heads_kv, 1, capacity)
        lines.append(f"  batch {batch:>3}, {heads_kv} KV heads, capacity {capacity:>6}: {s:>2} split{'s' if s > 1 else ''}"
                     f", {batch * heads_kv * s} CTAs")
    prefill = make_prefill_plan(spec, device)
    if prefill is None:
        lines.append(f"prefill: none on {device.arch} (needs the wgmma path); the decode kernel serves every seqlen_q")
    else:
        loads = prefill_loads(spec.page_size, prefill.block_n)
        how = (f"the producer warpgroup gathers each {prefill.block_n}-key tile with 16-byte cp.async, "
               f"{GATHER_ROWS_PER_PASS} rows a pass, each row from its page ({loads.producer_registers} registers "
               "for it)" if loads.gather else
               f"each {prefill.block_n}-key tile arrives as {prefill.block_n // loads.box_rows} copy-engine "
               f"box{'es' if loads.box_rows < prefill.block_n else ''} of {loads.box_rows} rows, each inside one page "
               "(the page looked up one tile ahead)")
        lines.append(f"prefill (seqlen_q >= {PREFILL_MIN_QUERIES}): the wgmma forward, {prefill.block_m}x{prefill.block_n} "
                     f"tiles, {prefill.stages} stages, {prefill.smem_bytes} B; {how}")
    return "\n".join(lines)


# The producer warpgroup's registers when it gathers key rows itself (cp.async addresses per row) instead of
# issuing copy-engine boxes from one thread (40 spills them); the compute warpgroups keep the rest. setmaxnreg
# moves registers within the CTA's pool, fixed at launch: 384 threads x the 168 each is given (24 + 2 x 240 per
# thread slot); asking for more blocks setmaxnreg.inc for ever.
GATHER_PRODUCER_REGS, GATHER_CONSUMER_REGS = 56, 224
assert GATHER_PRODUCER_REGS + 2 * GATHER_CONSUMER_REGS <= WGMMA_PRODUCER_REGS + 2 * WGMMA_CONSUMER_REGS
GATHER_ROWS_PER_PASS = 16     # 128 threads x 16 bytes: 16 rows of one 128-byte column chunk per pass


@dataclass(frozen=True)
class PrefillLoads:
    """How the prefill kernel's producer fills a key tile from the cache. box_rows: copy-engine boxes of that
    many rows, each inside one page, all issued by one thread (a contiguous cache: one box per tile); None: the
    producer warpgroup gathers the tile row by row with 16-byte cp.async, each row from its own page."""

    box_rows: int | None
    producer_registers: int
    consumer_registers: int

    @property
    def gather(self) -> bool:
        return self.box_rows is None


def prefill_loads(page_size: int | None, block_n: int) -> PrefillLoads:
    """Boxes wherever they fit: the longest run of rows dividing both the page and the tile, if it is a multiple
    of 8 (a box starts on the 128-byte swizzle's 8-row period). Measured on the H200 (BENCHMARKS.md), 16-row
    pages ran 1.30-1.48x the dense forward as 8 boxes per tile and 1.63-2.02x gathered, so the gather only serves the
    page sizes no box fits (1 to 7, 12, 20, ...), which would otherwise fall to the decode kernel."""
    rows = math.gcd(page_size, block_n) if page_size else block_n
    if rows % 8 == 0:
        return PrefillLoads(rows, WGMMA_PRODUCER_REGS, WGMMA_CONSUMER_REGS)
    return PrefillLoads(None, GATHER_PRODUCER_REGS, GATHER_CONSUMER_REGS)


def make_prefill_plan(spec: Spec, device: Device) -> Plan | None:
    """The Hopper forward's best plan for a `layout: kvcache` spec (the chunked-prefill kernel); None without a
    wgmma path: the decode kernel then serves every seqlen_q."""
    for candidate in candidates(spec, device):
        plan = candidate.plan
        if plan is None or plan.path != "wgmma" or plan.block_n % GATHER_ROWS_PER_PASS:
            continue
        if wgmma_registers(spec, plan.block_n) <= prefill_loads(spec.page_size, plan.block_n).consumer_registers:
            return plan                  # (a gathering producer leaves the compute warpgroups fewer registers)
    return None
