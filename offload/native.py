"""Native kernels, compiled from C on first use and called through ctypes (optional).

`endor_kernel()` returns the Endor bitmap decode (offload/endor_kernel.c) or None, and callers
keep their numpy path for None: the kernel and the numpy path write the same bits (tests compare
them), so the only difference is speed (docs/OFFLOAD.md).

The library is built once per source, compiler flags and machine type with the C compiler on PATH
($CC, default `cc`) into $EDGE_RT_HOME/native/ (default ~/.cache/edge-rt/native/), written under a
temporary name and renamed, so concurrent first uses are safe. No compiler, a failed build or
EDGE_RT_NATIVE=0: None, with one warning naming the reason (none for EDGE_RT_NATIVE=0). ctypes
releases the GIL during the call, so row ranges decode in parallel threads.
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

SOURCE = Path(__file__).with_name("endor_kernel.c")
BUILD_TIMEOUT_S = 120
_lock = threading.Lock()


def _flags() -> list[str]:
    flags = ["-O3", "-fPIC", "-shared", "-std=c99"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mssse3")  # every x86-64 CPU since 2006
    return flags


def _build(src: Path, out_dir: Path) -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not on PATH)")
    flags = _flags()
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


@functools.lru_cache(maxsize=None)
def endor_kernel():
    """The compiled Endor decode: (`edge_rt_endor_decode16`, `edge_rt_endor_decode16to32`) ctypes
    functions, or None (see the module doc)."""
    if os.environ.get("EDGE_RT_NATIVE", "1") == "0":
        return None
    from edge_rt.loading.resolve import edge_rt_home

    try:
        with _lock:
            lib = ctypes.CDLL(str(_build(SOURCE, edge_rt_home() / "native")))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"edge-rt: Endor decode falls back to numpy (about 4x slower): {e}", RuntimeWarning, stacklevel=2)
        return None
    lib.edge_rt_endor_init.restype = None
    lib.edge_rt_endor_init()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fns = (lib.edge_rt_endor_decode16, lib.edge_rt_endor_decode16to32)
    for fn in fns:
        fn.argtypes = [p, i64, i64, p, i64, p, i64, p, i64]
        fn.restype = i64
    return fns
