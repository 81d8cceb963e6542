"""Probe: the one place that asks the hardware (and torch) what is there.

Every query `devices` makes goes through a `Probe` method, so tests swap in a subclass that
returns canned answers and exercise the CUDA and MPS paths on a machine that has neither.
Methods that read the host (files, sysctl) return ""/None on failure instead of raising.
"""

from __future__ import annotations

import os
import platform
import subprocess

import psutil
import torch


class Probe:
    """Real hardware queries; override methods in a subclass to fake a machine."""

    cpuinfo_path: str = "/proc/cpuinfo"

    # --- CUDA (only called after cuda_available() is True, except torch_cuda_version) ---

    def cuda_available(self) -> bool:
        return torch.cuda.is_available()

    def torch_cuda_version(self) -> str | None:
        """CUDA version torch was built with; None for a CPU-only build."""
        return torch.version.cuda

    def cuda_device_count(self) -> int:
        return torch.cuda.device_count()

    def cuda_name(self, index: int) -> str:
        return torch.cuda.get_device_name(index)

    def cuda_mem_info(self, index: int) -> tuple[int, int]:
        """(free, total) bytes, as torch.cuda.mem_get_info returns them."""
        free, total = torch.cuda.mem_get_info(index)
        return int(free), int(total)

    def cuda_capability(self, index: int) -> tuple[int, int]:
        major, minor = torch.cuda.get_device_capability(index)
        return int(major), int(minor)

    # --- MPS ---

    def mps_available(self) -> bool:
        return torch.backends.mps.is_available()

    def mps_recommended_max_memory(self) -> int | None:
        """Metal's recommended working-set size in bytes; None where torch lacks the call."""
        fn = getattr(torch.mps, "recommended_max_memory", None)
        return int(fn()) if fn is not None else None

    # --- host CPU and memory ---

    def machine(self) -> str:
        return platform.machine()

    def system(self) -> str:
        return platform.system()

    def processor(self) -> str:
        return platform.processor()

    def cpuinfo_text(self) -> str:
        """Contents of /proc/cpuinfo; "" where it cannot be read (macOS, Windows, sandboxes)."""
        try:
            with open(self.cpuinfo_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def sysctl(self, name: str) -> str | None:
        """`sysctl -n name` output (macOS); None if the key or the tool is missing."""
        try:
            out = subprocess.run(
                ["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() or None

    def torch_cpu_capability(self) -> str:
        """ATen's CPU dispatch level: "AVX512", "AVX2", "DEFAULT", "SVE256", ..."""
        return torch.backends.cpu.get_cpu_capability()

    def cpu_count(self) -> int:
        """Physical cores where known, else logical CPUs."""
        return psutil.cpu_count(logical=False) or os.cpu_count() or 1

    def virtual_memory(self) -> tuple[int, int]:
        """(total, available) bytes of host RAM."""
        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
