"""Plan: tile sizes chosen from an explicit shared-memory / register budget, with a cost model.

The model (ARCHITECTURE.md): FlashAttention's bound Bc = ceil(M / 4d), Br = min(Bc, d) is the starting
point; the real kernel keeps a Q tile of block_m rows and `stages` K/V tiles of block_n rows in shared
memory, each warp owns 16 * m_tiles rows of the Q tile and holds its fp32 O accumulator and S tile in
registers. Every candidate is checked against the device's opt-in shared memory and 255 registers per
thread; the survivors are ranked by predicted time, near-ties by (wgmma) longer key tiles, then more warps
resident per SM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .device import Device
from ..errors import PlanError
from ..spec import Spec
from ..variant import variant_of

SMEM_ROW_PAD = 8             # bf16/fp16 elements of padding per smem row: rows shift by 16 B, so ldmatrix
                             # phases hit 8 distinct bank groups (no conflicts) for any head dim.
SMEM_RESERVED_PER_CTA = 1024  # the driver reserves 1 KB of shared memory per CTA
REG_OVERHEAD = 64             # addresses, loop counters, ldmatrix fragments in flight; fitted to ptxas (sm_80/90)
REG_OVERHEAD_BLOCK_SPARSE = 8    # CSR row bounds and the step -> key-tile map (fitted to ptxas, sm_80/90)
REG_PER_MASK_DIVISION = 4        # per integer division or remainder in the mask predicate
REG_SCORE_MODS = 16              # scale, slope, the row/column of each score (fitted to ptxas, sm_80/90)
REG_VARLEN = 16                  # a varlen CTA's sequence and tile come from memory, not from parameters and
                                 # blockIdx that ptxas rematerialises: addresses derived from them stay live
                                 # (fitted to ptxas, sm_90, mma.sync: +0 to +40 by tile)
REG_ALLOC_GRANULE = 8         # registers are allocated per thread in units of 8
SMEM_BYTES_PER_CLOCK = 128    # per SM

# The wgmma path (sm_90a): 3 warpgroups of 128 threads, 1 CTA per SM.
WGMMA_COMPUTE_GROUPS = 2      # 64 query rows each: block_m = 128
WGMMA_PRODUCER_REGS = 24      # setmaxnreg: the loading warpgroup gives registers back ...
WGMMA_CONSUMER_REGS = 240     # ... and the compute warpgroups take them (24*128 + 2*240*128 <= 64K)
WGMMA_REG_OVERHEAD = 48       # descriptors, barrier addresses, row statistics, softmax temporaries
WGMMA_SMEM_ALIGN = 1024       # tiles start on the 128-byte swizzle's 1024-byte period

# The problem the predicted time refers to (FlashAttention's benchmark shape at seqlen 4096).
REFERENCE_PROBLEM = dict(batch=4, seqlen_q=4096, seqlen_k=4096, heads=16)


def round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


class WarpLaunch:
    """What a plan of `warps` warps per CTA on `arch` and a `path` adds to its fields (shared by the forward
    and backward plans)."""

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def target(self) -> str:
        """The NVRTC target: wgmma and setmaxnreg need the arch-specific sm_90a."""
        return self.arch + "a" if self.path == "wgmma" else self.arch

    @property
    def producer_registers(self) -> int:
        return WGMMA_PRODUCER_REGS

    @property
    def consumer_registers(self) -> int:
        return WGMMA_CONSUMER_REGS

    def to_dict(self) -> dict:
        return asdict(self) | {"threads": self.threads}


@dataclass(frozen=True, kw_only=True)
class Plan(WarpLaunch):
    arch: str
    block_m: int
    block_n: int
    warps: int
    m_tiles: int              # 16-row mma tiles per warp: block_m = 16 * m_tiles * warps
    stages: int               # K/V tiles resident in shared memory (>= 2: double buffering)
    head_dim_padded: int      # head_dim rounded up to the mma k-step (16)
    head_dim_v_padded: int
    smem_row_pad: int
    smem_bytes: int
    regs_estimate: int
    ctas_per_sm: int
    predicted_flops: float    # for REFERENCE_PROBLEM
    predicted_hbm_bytes: float
    predicted_smem_bytes: float
    predicted_time_us: float
    bound: str                # which term of the cost model dominates: "mma", "hbm" or "smem"
    path: str = "mma_sync"    # "mma_sync" | "wgmma" (sm_90a: TMA, warpgroups, setmaxnreg)

    @property
    def mma_warps(self) -> int:
        """Warps that own query rows (the wgmma path's first warpgroup only loads)."""
        return self.warps - 4 if self.path == "wgmma" else self.warps


@dataclass(frozen=True)
class Candidate:
    block_m: int
    block_n: int
    warps: int
    stages: int
    plan: Plan | None
    reject: str               # empty when the candidate fits
    path: str = "mma_sync"


def smem_bytes(spec: Spec, block_m: int, block_n: int, stages: int) -> int:
    d, dim_v = round_up(spec.head_dim, 16), round_up(spec.head_dim_v, 16)
    q_rows = block_m * (max(d, dim_v) + SMEM_ROW_PAD)   # the Q tile; the O tile is staged in its place
    kv_rows = stages * block_n * ((d + SMEM_ROW_PAD) + (dim_v + SMEM_ROW_PAD))
    return (q_rows + kv_rows) * spec.elem_bytes


def wgmma_smem_bytes(spec: Spec, block_m: int, block_n: int, stages: int) -> int:
    """Q tile (or the 16-bit O staged in its place, if larger: FP8), the K/V rings (no padding: swizzled), the
    mbarriers, and 1 KB to align the window."""
    d, dim_v = round_up(spec.head_dim, 64), round_up(spec.head_dim_v, 64)
    barriers = round_up((1 + 4 * stages) * 8, 16)
    q_region = max(block_m * d * spec.elem_bytes, block_m * dim_v * 2)
    return WGMMA_SMEM_ALIGN + q_region + stages * block_n * (d + dim_v) * spec.elem_bytes + barriers


FP8_REG_MARGIN = 16


def wgmma_registers(spec: Spec, block_n: int) -> int:
    """Per compute thread: the 64 x dim_v O accumulator, the 64 x block_n S tile and its packed P (two values a
    register, four at FP8) over 128 threads."""
    packed_p = block_n // (8 if spec.fp8 else 4)
    return round_up(spec.head_dim_v, 64) // 2 + block_n // 2 + packed_p + WGMMA_REG_OVERHEAD + mask_registers(spec)


def wgmma_unsupported(spec: Spec, device: Device) -> str:
    """Why the wgmma path cannot serve this spec on this device ("" when it can)."""
    if device.cc != 90:
        return f"wgmma needs sm_90 (Hopper), not {device.arch}"
    if spec.fp8 and spec.head_dim % 128:
        return f"FP8 wgmma: head_dim={spec.head_dim} must be whole 128-byte rows"
    # TMA brings 64-column chunks; a head dim that is a multiple of 32 is padded to them with zeros (the
    # tensor map's bounds fill the padding). A KV cache's gathering producer copies whole chunks of cache rows,
    # so there the head dims must be whole chunks.
    align = 64 if variant_of(spec).kvcache else 32
    if spec.head_dim % align or spec.head_dim_v % align or spec.head_dim_v > spec.head_dim:
        return (f"wgmma path: head_dim={spec.head_dim}, head_dim_v={spec.head_dim_v} must be multiples of {align} "
                "with head_dim_v <= head_dim")
    return ""


def tile_list_bytes(spec: Spec, warps: int, block_n: int, seqlen_k: int) -> int:
    """Shared memory a sparse kernel adds at launch: the warps' counts and one int per key tile (a pattern
    lists its tiles there; a runtime layout copies its CSR row there, so no step reads a global index)."""
    if variant_of(spec).schedule == "dense":
        return 0
    return 4 * (warps + math.ceil(seqlen_k / block_n))


def index_bytes(spec: Spec, block_m: int, seqlen_q: int, seqlen_k: int, heads: int) -> int:
    """Upper bound of the mask index data one problem reads from memory (per batch entry): block-CSR
    row pointers and every column of a dense layout (runtime), or the block table's bits (pattern)."""
    variant = variant_of(spec)
    if variant.schedule == "runtime":
        rows, cols = spec.mask_block_size
        return 4 * heads * math.ceil(seqlen_q / block_m) * (4 + math.ceil(seqlen_k / cols))
    if variant.block_table:
        rows, cols = spec.mask_block_size
        return 4 * heads * math.ceil(seqlen_q / block_m) * math.ceil(math.ceil(seqlen_k / cols) / 32)
    return 0


def regs_estimate(spec: Spec, block_n: int, m_tiles: int) -> int:
    """fp32 O accumulator, S tile and packed P per thread (16 rows x cols over 32 lanes each) plus overhead."""
    dim_v = round_up(spec.head_dim_v, 16)
    per_m_tile = dim_v // 2 + block_n // 2 + block_n // 4     # O acc + S + P (two 16-bit values per register)
    return per_m_tile * m_tiles + REG_OVERHEAD + mask_registers(spec) + (REG_VARLEN if spec.layout == "varlen" else 0)


def mask_registers(spec: Spec) -> int:
    """Registers the mask schedule, the predicates and the score modifiers add (integer divisions and
    remainders by constants hold their magic-number temporaries live through the masked tiles)."""
    variant = variant_of(spec)
    regs = REG_PER_MASK_DIVISION * variant.predicate_cost
    if variant.schedule != "dense":
        regs += REG_OVERHEAD_BLOCK_SPARSE
    if variant.score_mods:
        regs += REG_SCORE_MODS
    return regs


def occupancy(device: Device, smem: int, regs: int, threads: int) -> int:
    by_smem = device.smem_per_sm // (smem + SMEM_RESERVED_PER_CTA)
    by_regs = device.regs_per_sm // (round_up(regs, REG_ALLOC_GRANULE) * threads)
    by_threads = device.max_threads_per_sm // threads
    return min(by_smem, by_regs, by_threads, device.max_ctas_per_sm)


def problem_cost(spec: Spec, block_m: int, block_n: int, warps: int, m_tiles: int, device: Device,
                 ctas_per_sm: int, batch: int, seqlen_q: int, seqlen_k: int, heads: int, path: str = "mma_sync"):
    """Predicted FLOPs, HBM bytes, shared-memory bytes read and time (us) for one problem."""
    if path == "wgmma":    # the compute warpgroups read like warps of 64 rows; wgmma runs at the matrix peak
        warps, m_tiles = WGMMA_COMPUTE_GROUPS, 4
    d, dim_v = spec.head_dim, spec.head_dim_v
    causal_fraction = 0.5 if spec.causal and seqlen_q == seqlen_k else 1.0
    flops = 2.0 * batch * heads * seqlen_q * seqlen_k * (d + dim_v) * causal_fraction
    q_bytes = batch * heads * seqlen_q * d * spec.elem_bytes
    o_bytes = batch * heads * seqlen_q * dim_v * spec.elem_bytes
    kv_bytes = batch * heads * seqlen_k * (d + dim_v) * spec.elem_bytes   # heads: K/V re-read per query head
    m_blocks = math.ceil(seqlen_q / block_m)
    hbm = q_bytes + o_bytes + m_blocks * kv_bytes * causal_fraction + batch * index_bytes(
        spec, block_m, seqlen_q, seqlen_k, heads)
    # Query tiles of one head run side by side, so K/V re-reads after the first mostly hit L2.
    l2_rereads = (m_blocks - 1) * kv_bytes * causal_fraction
    # Every warp reads the whole K and V tile (ldmatrix) once per tile and its Q fragments once per tile.
    n_tiles = math.ceil(seqlen_k / block_n) * causal_fraction
    dp, dim_v_padded = round_up(d, 16), round_up(dim_v, 16)
    per_tile = warps * (block_n * (dp + dim_v_padded) + 16 * m_tiles * dp) * spec.elem_bytes
    smem = batch * heads * m_blocks * n_tiles * per_tile
    ctas = batch * heads * m_blocks
    waves = ctas / (device.sm_count * ctas_per_sm)
    wave_efficiency = waves / math.ceil(waves)
    # Resident warps hide the latency of ldmatrix -> mma -> exp2 chains; about 12 per SM suffice.
    latency_efficiency = min(1.0, 0.7 + 0.3 * ctas_per_sm * warps / 12)
    if path == "wgmma":    # asynchronous warpgroup MMAs with the softmax overlapped: latency is hidden
        latency_efficiency, rate = 1.0, device.matrix_peak_tflops * (2 if spec.fp8 else 1)   # e4m3: twice bf16's
    else:
        rate = device.mma_tflops
    t_mma = flops / (rate * 1e12 * latency_efficiency)
    t_hbm = (hbm - l2_rereads) / (device.hbm_gbps * 1e9) + l2_rereads / (device.l2_gbps * 1e9)
    t_smem = smem / (SMEM_BYTES_PER_CLOCK * device.clock_ghz * 1e9 * device.sm_count)
    terms = {"mma": t_mma, "hbm": t_hbm, "smem": t_smem}
    bound = max(terms, key=terms.get)
    return flops, hbm, smem, terms[bound] / wave_efficiency * 1e6, bound


def predict_us(spec: Spec, plan: Plan, device: Device, batch: int, seqlen_q: int, seqlen_k: int, heads: int) -> float:
    """The cost model's time for `plan` on one problem (the autotuner and the bench compare it with measurements)."""
    return problem_cost(spec, plan.block_m, plan.block_n, plan.warps, plan.m_tiles, device, plan.ctas_per_sm,
                        batch, seqlen_q, seqlen_k, heads, plan.path)[3]


def layout_fit(spec: Spec, device: Device, block_m: int, block_n: int, warps: int, smem: int) -> tuple[int, str]:
    """Shared memory with the sparse step list at the reference seqlen, and why the tiles do not fit the
    mask blocks or the device ("" when they do); both kernel paths check these."""
    if variant_of(spec).schedule == "runtime" or variant_of(spec).block_table:
        rows, cols = spec.mask_block_size
        if rows % block_m or cols % block_n:
            return smem, f"tiles {block_m}x{block_n} do not divide the mask blocks {rows}x{cols}"
    # A sparse schedule lists its key tiles in shared memory too (sized at launch; here at the reference seqlen).
    smem_at_reference = smem + tile_list_bytes(spec, warps, block_n, REFERENCE_PROBLEM["seqlen_k"])
    if smem_at_reference > device.smem_per_block:
        return smem_at_reference, (f"shared memory {smem_at_reference} B exceeds the {device.arch} budget of "
                                   f"{device.smem_per_block} B by {smem_at_reference - device.smem_per_block} B")
    return smem_at_reference, ""


def evaluate(spec: Spec, device: Device, block_m: int, block_n: int, warps: int, stages: int,
             path: str = "mma_sync") -> Candidate:
    """Build the plan for one tile configuration, or say why it does not fit."""
    def reject(why):
        return Candidate(block_m, block_n, warps, stages, None, why, path)

    if path == "wgmma":
        return evaluate_wgmma(spec, device, block_m, block_n, warps, stages, reject)
    if spec.fp8:
        return reject("fp8_e4m3 runs on Hopper's wgmma path only (mma.sync here takes 16-bit inputs)")

    if block_m % (16 * warps):
        return reject(f"block_m={block_m} is not a multiple of 16 rows x warps={warps}")
    m_tiles = block_m // (16 * warps)
    if m_tiles > 2:
        return reject(f"{m_tiles} mma row tiles per warp (at most 2)")
    if block_n % 16:
        return reject(f"block_n={block_n} is not a multiple of 16")
    smem = smem_bytes(spec, block_m, block_n, stages)
    smem_at_reference, why = layout_fit(spec, device, block_m, block_n, warps, smem)
    if why:
        return reject(why)
    regs = regs_estimate(spec, block_n, m_tiles)
    if regs > device.max_regs_per_thread:
        return reject(f"~{regs} registers/thread exceed {device.max_regs_per_thread}")
    threads = 32 * warps
    ctas = occupancy(device, smem_at_reference, regs, threads)
    if ctas < 1:
        return reject("no CTA fits on an SM")
    ref = REFERENCE_PROBLEM | {"heads": spec.num_heads or REFERENCE_PROBLEM["heads"]}
    flops, hbm, smem_read, t_us, bound = problem_cost(spec, block_m, block_n, warps, m_tiles, device, ctas, **ref)
    plan = Plan(arch=device.arch, block_m=block_m, block_n=block_n, warps=warps, m_tiles=m_tiles, stages=stages,
                head_dim_padded=round_up(spec.head_dim, 16), head_dim_v_padded=round_up(spec.head_dim_v, 16),
                smem_row_pad=SMEM_ROW_PAD, smem_bytes=smem, regs_estimate=regs, ctas_per_sm=ctas,
                predicted_flops=flops, predicted_hbm_bytes=hbm, predicted_smem_bytes=smem_read, predicted_time_us=t_us,
                bound=bound)
    return Candidate(block_m, block_n, warps, stages, plan, "")


def evaluate_wgmma(spec: Spec, device: Device, block_m: int, block_n: int, warps: int, stages: int, reject) -> Candidate:
    """The wgmma path's plan for one tile configuration (evaluate's checks in its terms)."""
    why = wgmma_unsupported(spec, device)
    if why:
        return reject(why)
    if (block_m, warps) != (64 * WGMMA_COMPUTE_GROUPS, 4 * (1 + WGMMA_COMPUTE_GROUPS)):
        return reject(f"wgmma path: block_m={block_m}, warps={warps}; it runs {64 * WGMMA_COMPUTE_GROUPS} rows "
                      f"on {4 * (1 + WGMMA_COMPUTE_GROUPS)} warps")
    if block_n % 16 or not 16 <= block_n <= 256:
        return reject(f"wgmma path: block_n={block_n} must be a multiple of 16 in 16..256")
    if spec.fp8 and block_n != 128:
        return reject(f"FP8 wgmma: block_n={block_n}; V^T's rows are one 128-byte swizzle row of keys (128)")
    smem = wgmma_smem_bytes(spec, block_m, block_n, stages)
    _, why = layout_fit(spec, device, block_m, block_n, warps, smem)
    if why:
        return reject(why)
    regs = wgmma_registers(spec, block_n)
    # At FP8 the estimate runs ~16 over ptxas (d256 128x128: estimated 256, compiled without spills at 240);
    # within that margin the build's spill check decides.
    if regs > WGMMA_CONSUMER_REGS + (FP8_REG_MARGIN if spec.fp8 else 0):
        return reject(f"~{regs} registers per compute thread exceed the {WGMMA_CONSUMER_REGS} setmaxnreg gives")
    ref = REFERENCE_PROBLEM | {"heads": spec.num_heads or REFERENCE_PROBLEM["heads"]}
    flops, hbm, smem_read, t_us, bound = problem_cost(spec, block_m, block_n, warps, 1, device, 1, **ref, path="wgmma")
    plan = Plan(arch=device.arch, block_m=block_m, block_n=block_n, warps=warps, m_tiles=1, stages=stages,
                head_dim_padded=round_up(spec.head_dim, 64), head_dim_v_padded=round_up(spec.head_dim_v, 64),
                smem_row_pad=0, smem_bytes=smem, regs_estimate=regs, ctas_per_sm=1, predicted_flops=flops,
                predicted_hbm_bytes=hbm, predicted_smem_bytes=smem_read, predicted_time_us=t_us, bound=bound,
                path="wgmma")
    return Candidate(block_m, block_n, warps, stages, plan, "", "wgmma")


def candidate_grid(spec: Spec, device: Device):
    """(block_m, block_n, warps, stages, path) of every candidate: the mma.sync grid (not for FP8, which has
    no mma.sync kernel), and on Hopper the wgmma one."""
    for warps in (4, 8) if not spec.fp8 else ():
        for m_tiles in (1, 2):
            for block_n in (32, 64, 128):
                for stages in (2, 3):
                    yield 16 * warps * m_tiles, block_n, warps, stages, "mma_sync"
    if device.cc == 90:
        # 128: measured fastest at d64 and d128 (176 lost at d64, 2026-11-22). 80: where 128 does not fit
        # (d > 128), FlashAttention-3's d256 tile; on the H200 128x80 ran 1.03-1.11x 128x64 at d256. A KV
        # cache keeps 64: its pages of 64 or 256 rows would cut an 80-key tile into 16-row copies.
        widths = (64, 128) if variant_of(spec).kvcache else (64, 80, 128)
        for block_n in widths:
            for stages in (2, 3):
                yield 64 * WGMMA_COMPUTE_GROUPS, block_n, 4 * (1 + WGMMA_COMPUTE_GROUPS), stages, "wgmma"


def rank_key(c: Candidate):
    p = c.plan
    # Fastest predicted first; among near-ties prefer (wgmma) longer key tiles, whose fixed per-step cost
    # (barrier waits, the softmax's row reductions) the model leaves out, then more warps resident per SM
    # to hide ldmatrix and exp2 latency (d256 on mma.sync: 64x64 on 4 warps ran 0.80x 128x64 on 8 on the
    # H200, a tie in the model), then fewer registers, then less shared memory.
    return (round(p.predicted_time_us, 1), -p.block_n if p.path == "wgmma" else 0, -p.ctas_per_sm * p.warps,
            p.regs_estimate, p.smem_bytes)


def candidates(spec: Spec, device: Device) -> list[Candidate]:
    """Every candidate, the fitting ones ranked first (best first), then the rejected ones."""
    evaluated = [evaluate(spec, device, *cfg) for cfg in candidate_grid(spec, device)]
    fits = sorted((c for c in evaluated if c.plan), key=rank_key)
    return fits + [c for c in evaluated if not c.plan]


def check_dtype(spec: Spec, device: Device) -> None:
    """FP8 has kernels on Hopper only: say so before any candidate is weighed."""
    if spec.fp8 and device.cc != 90:
        raise PlanError(f"dtype fp8_e4m3 needs Hopper (sm_90, wgmma with e4m3 operands), not {device.arch}")


def make_plan(spec: Spec, device: Device) -> Plan:
    if spec.tile is not None:
        t = spec.tile
        c = evaluate(spec, device, t.block_m, t.block_n, t.warps, t.stages, t.path)
        if c.plan is None:
            raise PlanError(f"tile override {t.block_m}x{t.block_n}, {t.warps} warps, {t.stages} stages "
                            f"does not fit {device.arch}: {c.reject}")
        return c.plan
    check_dtype(spec, device)
    ranked = candidates(spec, device)
    if not ranked or ranked[0].plan is None:
        raise PlanError(f"no tile configuration fits {device.arch} for head_dim={spec.head_dim}")
    return ranked[0].plan


def explain(spec: Spec, device: Device) -> str:
    """The budget arithmetic and the candidate table, the chosen row marked."""
    d, dim_v, eb = spec.head_dim, spec.head_dim_v, spec.elem_bytes
    m_elems = device.smem_per_block // eb
    bc = math.ceil(m_elems / (4 * d))
    br = min(bc, d)
    table = candidates(spec, device) if spec.tile is None else None
    chosen = table[0].plan if table and table[0].plan is not None else make_plan(spec, device)
    lines = [
        f"spec   {spec.name}: head_dim={d} head_dim_v={dim_v} {spec.dtype} causal={spec.causal}",
        f"device {device.arch} ({device.name}): {device.smem_per_block} B smem/block (opt-in), "
        f"{device.smem_per_sm} B/SM, {device.regs_per_sm} regs/SM, {device.sm_count} SMs",
        f"paper  M = {m_elems} elements -> Bc = ceil(M/4d) = {bc}, Br = min(Bc, d) = {br}",
        f"smem   = (block_m*(max(d,dim_v)+{SMEM_ROW_PAD}) + stages*block_n*((d+{SMEM_ROW_PAD})+(dim_v+{SMEM_ROW_PAD}))) * {eb} B"
        f"   (d, dim_v padded to {round_up(d, 16)}, {round_up(dim_v, 16)})",
        f"regs   ~ m_tiles*(dim_v/2 + block_n/2 + block_n/4) + {REG_OVERHEAD} per thread (fp32 O and S, packed P)",
        f"time   = max(FLOPs/{device.mma_tflops:g} TFLOP/s, HBM/{device.hbm_gbps:g} GB/s, smem reads/"
        f"(128 B/clk x {device.clock_ghz:g} GHz x {device.sm_count} SMs)) / wave efficiency, for batch="
        f"{REFERENCE_PROBLEM['batch']} seqlen={REFERENCE_PROBLEM['seqlen_q']} heads="
        f"{spec.num_heads or REFERENCE_PROBLEM['heads']}",
        "rank   by time (0.1 us); near-ties: longer key tiles (wgmma), more warps resident per SM, fewer "
        "registers, less smem",
        "io     " + ("16 B global accesses (cp.async) per 8 columns; rows 16-byte aligned"
                     if variant_of(spec).global_vector > 1 else
                     "head dims off the multiples of 8: element loads and stores up to the real head dim (rows "
                     "2-byte aligned; shared memory zero past it); no wgmma path"),
    ]
    if spec.layout == "varlen":
        lines += [
            "layout varlen: packed q [total_q, heads, d], k/v [total_k, heads_kv, d], cu_seqlens [batch+1] on the GPU; "
            "grid = heads x (ceil(total_q/block_m) + batch) CTAs (sized without reading cu_seqlens), a one-CTA "
            "schedule kernel first places each sequence's tiles, longest key range first (causal: its last tiles "
            f"first); each CTA binary-searches its place; regs + {REG_VARLEN} (mma_sync: the sequence is loaded, not "
            "a parameter)"]
    if device.cc == 90:
        lines[3:3] = ["path   mma_sync (the formulas below) | wgmma (sm_90a: 1 loading + "
                      f"{WGMMA_COMPUTE_GROUPS} compute warpgroups, 1 CTA/SM):"]
        lines += [
            f"wgmma  smem = {WGMMA_SMEM_ALIGN} + (block_m*d + stages*block_n*(d+dim_v)) * {eb} + mbarriers B (swizzled rows, "
            f"no row padding; d, dim_v rounded up to whole 64-column chunks, zero-filled); regs ~ dim_v/2 + block_n/2 + block_n/4 + {WGMMA_REG_OVERHEAD} per "
            f"compute thread <= {WGMMA_CONSUMER_REGS}; time at {device.matrix_peak_tflops:g} TFLOP/s"]
    if spec.fp8:
        lines += [
            "fp8    q, k, v e4m3 (1 B), out bf16; wgmma k = 32, both operands K-major: a transpose kernel writes V^T "
            "per call with each 32 keys in P's register order (codegen/fp8.py); the Q region is max(block_m*d, "
            "block_m*dim_v*2) B, the bf16 O staged there; P packed as 256 P (+8 in the exp2 shift); descales per "
            "(batch, KV head)"]
    lines += [
        "",
        f"  {'path':>8} {'bm':>4} {'bn':>4} {'warps':>5} {'stg':>3} {'smem B':>8} {'regs':>4} {'cta/SM':>6} "
        f"{'GFLOP':>7} {'HBM MB':>7} {'t us':>8} {'bound':>5}  note",
    ]
    if table is None:
        table = [Candidate(chosen.block_m, chosen.block_n, chosen.warps, chosen.stages, chosen, "", chosen.path)]
        lines.insert(-1, "tile   fixed by the spec's tile override")
    for c in table:
        p = c.plan
        if p is None:
            lines.append(f"  {c.path:>8} {c.block_m:>4} {c.block_n:>4} {c.warps:>5} {c.stages:>3} {'':>8} {'':>4} {'':>6} "
                         f"{'':>7} {'':>7} {'':>8} {'':>5}  rejected: {c.reject}")
            continue
        mark = "<- chosen" if p == chosen else ""
        lines.append(f"  {p.path:>8} {p.block_m:>4} {p.block_n:>4} {p.warps:>5} {p.stages:>3} {p.smem_bytes:>8} "
                     f"{p.regs_estimate:>4} {p.ctas_per_sm:>6} {p.predicted_flops / 1e9:>7.1f} "
                     f"{p.predicted_hbm_bytes / 1e6:>7.1f} {p.predicted_time_us:>8.1f} {p.bound:>5}  {mark}")
    return "\n".join(lines)
