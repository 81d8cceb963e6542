"""Device strings -> `Device`: what we run on, its memory, preferred dtype and profile.

This is the only code in edge-rt that parses device strings. Accepted (case-insensitive,
surrounding whitespace ignored): "auto", "cpu", "cuda", "cuda:N", "mps".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from devices.cpu import CpuInfo, cpu_info
from devices.probe import Probe
from devices.profile import DeviceProfile, cpu_profile, cuda_profile, mps_profile
from edge_rt.errors import DeviceError

VALID_FORMS = '"auto", "cpu", "cuda", "cuda:N" (N >= 0), "mps"'
_SPEC_RE = re.compile(r"(auto|cpu|mps|cuda)(?::([0-9]+))?", re.ASCII)
_GIB = 1024**3


@dataclass(frozen=True)
class Device:
    """A resolved device: kind ("cpu" | "cuda" | "mps"), index (CUDA only), memory in bytes."""

    kind: str
    index: int | None
    name: str
    total_memory: int
    free_memory: int
    default_dtype: torch.dtype
    cpu: CpuInfo
    profile: DeviceProfile

    @property
    def torch_device(self) -> torch.device:
        if self.kind == "cuda":
            return torch.device("cuda", self.index)
        return torch.device(self.kind)

    @property
    def label(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    def describe(self) -> str:
        """One line for humans, e.g. 'cuda:0 NVIDIA L4 (22.1 GiB, 21.8 GiB free, bfloat16)'."""
        mem = f"{self.total_memory / _GIB:.1f} GiB, {self.free_memory / _GIB:.1f} GiB free"
        dtype = str(self.default_dtype).removeprefix("torch.")
        if self.kind == "cpu":
            feats = " ".join(self.cpu.features) or "no SIMD detected"
            cpu = f"{self.cpu.arch}, {self.cpu.cores} cores, {feats}"
            return f"cpu {self.name} ({cpu}; {mem}, {dtype})"
        return f"{self.label} {self.name} ({mem}, {dtype})"

    def to_dict(self) -> dict:
        """JSON-ready dict (dtype as its name, features as a list)."""
        d = asdict(self)
        d["default_dtype"] = str(self.default_dtype).removeprefix("torch.")
        d["cpu"]["features"] = list(self.cpu.features)
        d["device"] = self.label
        return d


def parse_device(spec: str) -> tuple[str, int | None]:
    """Parse a device string without touching hardware.

    Args:
        spec: "auto", "cpu", "cuda", "cuda:N" or "mps" (any case, surrounding whitespace ok).

    Returns:
        (kind, index): kind is "auto", "cpu", "cuda" or "mps"; index is N for CUDA ("cuda"
        means 0) and None otherwise.

    Raises:
        DeviceError: one line naming the bad string and the valid forms.
    """
    m = _SPEC_RE.fullmatch(spec.strip().lower()) if isinstance(spec, str) else None
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise DeviceError(f"invalid device {spec!r}: expected one of {VALID_FORMS}")
    kind, index = m.group(1), m.group(2)
    if kind == "cuda":
        return kind, int(index or 0)
    return kind, None


def resolve_device(spec: str = "auto", probe: Probe | None = None) -> Device:
    """Turn a device string into a `Device`, checking that it exists here.

    Args:
        spec: a device string (see `parse_device`). "auto" picks cuda:0, else mps, else cpu.
        probe: hardware queries to use; the real `Probe()` by default (tests pass a fake).

    Returns:
        The Device, with its memory measured now and its default dtype and profile filled in.

    Raises:
        DeviceError: bad string, or the requested device is not available here.
    """
    kind, index = parse_device(spec)
    probe = probe or Probe()
    if kind == "auto":
        if probe.cuda_available() and probe.cuda_device_count() > 0:
            kind, index = "cuda", 0
        elif probe.mps_available():
            kind = "mps"
        else:
            kind = "cpu"
    host = cpu_info(probe)
    if kind == "cuda":
        return _cuda_device(probe, index or 0, host)
    if kind == "mps":
        return _mps_device(probe, host)
    return _cpu_device(probe, host)


def _cpu_default_dtype(cpu: CpuInfo) -> torch.dtype:
    if cpu.arch == "x86_64" and (cpu.has("avx512f") or cpu.has("avx2")):
        return torch.bfloat16
    if cpu.arch == "arm64" and cpu.has("bf16"):
        return torch.bfloat16
    return torch.float32


def _cpu_device(probe: Probe, host: CpuInfo) -> Device:
    total, avail = probe.virtual_memory()
    apple = host.arch == "arm64" and probe.system() == "Darwin"
    return Device(
        "cpu", None, host.name, total, min(avail, total), _cpu_default_dtype(host), host,
        cpu_profile(host, apple_silicon=apple),
    )  # fmt: skip


def _cuda_device(probe: Probe, index: int, host: CpuInfo) -> Device:
    count = probe.cuda_device_count() if probe.cuda_available() else 0
    if count == 0:
        build = probe.torch_cuda_version()
        why = (
            f"torch built with CUDA {build}, but no GPU or driver found"
            if build
            else f"torch {torch.__version__} is a CPU-only build"
        )
        raise DeviceError(
            f"CUDA device requested but torch.cuda is not available here ({why}); "
            "use --device cpu or auto"
        )
    if index >= count:
        raise DeviceError(
            f"cuda:{index} requested but only {count} CUDA device(s) visible "
            f"(valid: cuda:0..cuda:{count - 1}); use --device cuda:0 or auto"
        )
    free, total = probe.cuda_mem_info(index)
    cap = probe.cuda_capability(index)
    dtype = torch.bfloat16 if cap >= (8, 0) else torch.float16
    name = probe.cuda_name(index)
    return Device("cuda", index, name, total, min(free, total), dtype, host, cuda_profile(cap))


def _mps_device(probe: Probe, host: CpuInfo) -> Device:
    if not probe.mps_available():
        raise DeviceError(
            "MPS device requested but torch.backends.mps is not available here "
            "(needs Apple silicon, macOS 12.3+ and an MPS-enabled torch); use --device cpu or auto"
        )
    ram_total, ram_avail = probe.virtual_memory()
    total = probe.mps_recommended_max_memory() or ram_total  # Metal's working-set cap
    return Device(
        "mps", None, f"Apple GPU ({host.name})", total, min(ram_avail, total), torch.float16,
        host, mps_profile(),
    )  # fmt: skip
