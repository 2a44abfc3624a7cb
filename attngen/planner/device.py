"""Device: the budget a kernel must fit. Live properties through CuPy, or a named preset offline."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SpecError


@dataclass(frozen=True)
class Device:
    """The numbers the planner needs. Rates are for the cost model only (dense fp16/bf16 tensor-core
    throughput reachable with mma.sync, and HBM bandwidth)."""

    arch: str                    # "sm_90"
    name: str
    sm_count: int
    smem_per_block: int          # opt-in dynamic shared memory per block, bytes
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    mma_tflops: float = 312.0    # matrix peak reachable by mma.sync, TFLOP/s
    hbm_gbps: float = 2000.0     # GB/s
    l2_gbps: float = 6000.0      # L2 read bandwidth, GB/s (serves K/V re-reads across query tiles)
    clock_ghz: float = 1.41      # SM clock, for the shared-memory bandwidth (128 B/clock/SM)
    matrix_peak_tflops: float = 312.0   # dense fp16/bf16 matrix peak of any instruction: the roofline bench reports

    @property
    def cc(self) -> int:
        return int(self.arch.removeprefix("sm_").rstrip("a"))


# Opt-in smem per block as documented in the CUDA programming guide (per-SM minus the 1 KB reserved).
PRESETS = {
    "sm_80": Device("sm_80", "A100 (preset)", 108, 163 * 1024, 164 * 1024, mma_tflops=312.0, hbm_gbps=2000.0, clock_ghz=1.41,
                    matrix_peak_tflops=312.0),
    "sm_86": Device("sm_86", "RTX 30xx / A10 (preset)", 84, 99 * 1024, 100 * 1024, max_threads_per_sm=1536,
                    max_ctas_per_sm=16, mma_tflops=140.0, hbm_gbps=900.0, l2_gbps=2500.0, clock_ghz=1.70,
                    matrix_peak_tflops=142.0),
    "sm_89": Device("sm_89", "L4 / RTX 40xx (preset)", 58, 99 * 1024, 100 * 1024, max_threads_per_sm=1536,
                    max_ctas_per_sm=24, mma_tflops=120.0, hbm_gbps=300.0, l2_gbps=2000.0, clock_ghz=2.50,
                    matrix_peak_tflops=121.0),
    # mma.sync on Hopper reaches about two thirds of the wgmma peak (~990 TFLOP/s dense bf16 on H100 SXM on
    # paper; ~790 measured with wgmma on an H200 at its sustained clock, the roofline the bench reports).
    "sm_90": Device("sm_90", "H100 / H200 (preset)", 132, 227 * 1024, 228 * 1024, mma_tflops=660.0, hbm_gbps=3350.0,
                    l2_gbps=10000.0, clock_ghz=1.755, matrix_peak_tflops=790.0),
}


ARCH_VARIANTS = {"sm_90a": "sm_90"}   # arch-specific targets (wgmma, setmaxnreg) and the preset they use


def preset(arch: str) -> Device:
    """The preset of sm_80, sm_86, sm_89, sm_90 or sm_90a (exactly: no other suffix is a real target)."""
    key = ARCH_VARIANTS.get(arch, arch) if isinstance(arch, str) else None
    if key not in PRESETS:
        raise SpecError("arch", arch, " | ".join([*PRESETS, *ARCH_VARIANTS]))
    return PRESETS[key]


def live_device(index: int | None = None) -> Device:
    """Properties of the current (or given) CUDA device, read through CuPy."""
    import cupy

    dev = cupy.cuda.Device(index) if index is not None else cupy.cuda.Device()
    attrs = dev.attributes
    major, minor = divmod(int(dev.compute_capability), 10)
    arch = f"sm_{major}{minor}"
    base = PRESETS.get(arch, PRESETS["sm_80"])
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    return Device(
        arch=arch,
        name=props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        sm_count=attrs["MultiProcessorCount"],
        smem_per_block=attrs["MaxSharedMemoryPerBlockOptin"],
        smem_per_sm=attrs["MaxSharedMemoryPerMultiprocessor"],
        regs_per_sm=attrs["MaxRegistersPerMultiprocessor"],
        max_threads_per_sm=attrs["MaxThreadsPerMultiProcessor"],
        max_ctas_per_sm=attrs.get("MaxBlocksPerMultiprocessor", base.max_ctas_per_sm),
        mma_tflops=base.mma_tflops,
        hbm_gbps=base.hbm_gbps,
        l2_gbps=base.l2_gbps,
        clock_ghz=attrs["ClockRate"] / 1e6,
        matrix_peak_tflops=base.matrix_peak_tflops,
    )


def resolve(arch: str | None) -> Device:
    """An explicit arch gives its preset (no GPU needed); None asks the current GPU."""
    return live_device() if arch is None else preset(arch)
