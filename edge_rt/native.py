"""Native kernels: C sources compiled on first use and loaded through ctypes (optional).

`load_library(src, what)` builds `src` once per source, compiler flags and machine type with the
C compiler on PATH ($CC, default `cc`) into $EDGE_RT_HOME/native/ (default
~/.cache/edge-rt/native/), written under a temporary name and renamed, so concurrent first uses are
safe, and returns the ctypes library. No compiler, a failed build or EDGE_RT_NATIVE=0: None, with one
warning naming the reason and what `what` falls back to (none for EDGE_RT_NATIVE=0). Callers keep a
torch or numpy path for None; ctypes releases the GIL during calls.

Kernels: offload/endor_kernel.c (Endor decode, offload/native.py) and edge_rt/models/decode_kernels.c
(decode-step attention, add + RMSNorm and SwiGLU gate, edge_rt/models/native_kernels.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

BUILD_TIMEOUT_S = 120
_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def simd_level() -> str:
    """"avx2" on x86-64 CPUs with AVX2 and FMA, else "baseline"."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "avx2" if x86 and {"avx2", "fma"} <= _cpu_flags() else "baseline"


def has_avx512_bf16() -> bool:
    """Whether this CPU runs AVX-512 BF16 (vdpbf16ps) with AVX-512 F/BW/VL."""
    return simd_level() == "avx2" and {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= _cpu_flags()


def has_avx512_vnni() -> bool:
    """Whether this CPU runs AVX-512 VNNI (vpdpbusd) with AVX-512 F/BW/VL."""
    return simd_level() == "avx2" and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= _cpu_flags()


def compiler_flags(simd: str = "baseline", openmp: bool = False) -> list[str]:
    """Flags for a shared library. simd "baseline": SSSE3 on x86-64 (every CPU since 2006);
    "avx2": adds AVX2 and FMA where this CPU has them (the build key includes the flags, so a
    library built for one CPU is not loaded on a lesser one sharing the cache). openmp: -fopenmp;
    loaded after torch, the library binds to torch's libgomp (same soname), one thread pool."""
    flags = ["-O3", "-fPIC", "-shared", "-std=gnu99", "-fno-math-errno"] + (["-fopenmp"] if openmp else [])
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mssse3")
        if simd == "avx2" and simd_level() == "avx2":
            flags += ["-mavx2", "-mfma"]
    return flags


def _build(src: Path, out_dir: Path, flags: list[str]) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags, platform.machine()]).encode()).hexdigest()[:16]
    lib = out_dir / f"{src.stem}-{key}.so"
    if lib.is_file():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(src), "-o", tmp], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{cc} failed on {src.name}: {first}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def enabled() -> bool:
    return os.environ.get("EDGE_RT_NATIVE", "1") != "0"


def load_library(src: Path, what: str, simd: str = "baseline", openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled `src`, or None (see the module doc); `what` ends the fallback warning."""
    if not enabled():
        return None
    from edge_rt.loading.resolve import edge_rt_home

    try:
        with _lock:
            return ctypes.CDLL(str(_build(src, edge_rt_home() / "native", compiler_flags(simd, openmp))))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"edge-rt: {what}: {e}", RuntimeWarning, stacklevel=3)
        return None
