"""Device profiles: rough memory-bandwidth and peak-compute figures for the memory planner.

Nothing here is measured. CPU figures come from the SIMD features and core count, CUDA figures
from a compute-capability table, MPS from one Apple-silicon figure. They are right to within a
small factor at best; the planner uses them to rank options (stream vs. keep resident), never
as promises. A later profiler can replace them with measured numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from devices.cpu import CpuInfo


@dataclass(frozen=True)
class DeviceProfile:
    """Rough throughput estimates (see module docstring): GB/s of memory, GFLOP/s of compute."""

    memory_bandwidth_gbps: float
    peak_gflops: float
    source: str  # how the figures were made, e.g. "estimate: x86_64 avx512f x 16 cores"


# fp32 FLOPs per cycle per core by best SIMD feature: lanes x 2 (FMA) x assumed FMA units.
CPU_FLOPS_PER_CYCLE = (
    ("avx512f", 64), ("avx2", 32), ("avx", 16), ("sve", 32), ("asimd", 16), ("sse4_2", 8),
)  # fmt: skip
CPU_CLOCK_GHZ = {"x86_64": 3.0, "arm64": 2.5}
# Host RAM GB/s per core and clamp range: laptop dual-channel ~20-60, servers a few hundred.
CPU_BW_PER_CORE = {"x86_64": (5.0, 20.0, 200.0), "arm64": (4.0, 8.0, 300.0)}
APPLE_UNIFIED_BW_GBPS = 100.0  # M1..M4 base chips 68-120 GB/s; Pro/Max more

# (major, minor) -> (GB/s, dense fp16/bf16 GFLOP/s) of a typical part; lookup takes the
# highest entry <= the device's capability. Figures from vendor spec sheets, rounded.
CUDA_TABLE = {
    (6, 0): (500.0, 20_000.0),  # P100 / GTX 10xx
    (7, 0): (900.0, 110_000.0),  # V100
    (7, 5): (320.0, 60_000.0),  # T4, RTX 20xx
    (8, 0): (1_500.0, 300_000.0),  # A100
    (8, 6): (450.0, 70_000.0),  # RTX 30xx, A10
    (8, 7): (200.0, 20_000.0),  # Jetson Orin
    (8, 9): (500.0, 150_000.0),  # RTX 40xx, L4
    (9, 0): (3_000.0, 900_000.0),  # H100 / H200
    (10, 0): (8_000.0, 2_000_000.0),  # B200
    (12, 0): (900.0, 200_000.0),  # RTX 50xx
}
CUDA_FALLBACK = (200.0, 5_000.0)  # older than anything in the table

MPS_PROFILE = (APPLE_UNIFIED_BW_GBPS, 5_000.0)


def cpu_profile(cpu: CpuInfo, apple_silicon: bool = False) -> DeviceProfile:
    """Estimate a CPU's bandwidth from its core count and its peak from SIMD width x cores."""
    best, per_cycle = next(((f, n) for f, n in CPU_FLOPS_PER_CYCLE if cpu.has(f)), ("scalar", 4))
    gflops = cpu.cores * CPU_CLOCK_GHZ.get(cpu.arch, 2.0) * per_cycle
    if apple_silicon:
        bw = APPLE_UNIFIED_BW_GBPS
    else:
        per_core, lo, hi = CPU_BW_PER_CORE.get(cpu.arch, (2.0, 5.0, 50.0))
        bw = min(max(per_core * cpu.cores, lo), hi)
    return DeviceProfile(bw, gflops, f"estimate: {cpu.arch} {best} x {cpu.cores} cores")


def cuda_profile(capability: tuple[int, int]) -> DeviceProfile:
    """Look up typical figures for a CUDA compute capability."""
    keys = [k for k in CUDA_TABLE if k <= capability]
    bw, gflops = CUDA_TABLE[max(keys)] if keys else CUDA_FALLBACK
    return DeviceProfile(bw, gflops, f"estimate: CUDA capability {capability[0]}.{capability[1]}")


def mps_profile() -> DeviceProfile:
    """Typical figures for an Apple-silicon GPU (base M-series chip)."""
    return DeviceProfile(*MPS_PROFILE, "estimate: Apple silicon GPU")
