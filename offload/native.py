"""Native kernels, compiled from C on first use and called through ctypes (optional).

`endor_kernel()` returns the Endor bitmap decode (offload/endor_kernel.c) or None, and callers
keep their numpy path for None: the kernel and the numpy path write the same bits (tests compare
them), so the only difference is speed (docs/OFFLOAD.md).

The library is built and loaded by edge_rt/native.py (once per source, flags and machine, into
$EDGE_RT_HOME/native/). No compiler, a failed build or EDGE_RT_NATIVE=0: None, with one warning
naming the reason (none for EDGE_RT_NATIVE=0). ctypes releases the GIL during the call, so row
ranges decode in parallel threads.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from edge_rt.native import load_library

SOURCE = Path(__file__).with_name("endor_kernel.c")


@functools.lru_cache(maxsize=None)
def endor_kernel():
    """The compiled Endor decode: (`edge_rt_endor_decode16`, `edge_rt_endor_decode16to32`) ctypes
    functions, or None (see the module doc)."""
    lib = load_library(SOURCE, "Endor decode falls back to numpy (about 4x slower)")
    if lib is None:
        return None
    lib.edge_rt_endor_init.restype = None
    lib.edge_rt_endor_init()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fns = (lib.edge_rt_endor_decode16, lib.edge_rt_endor_decode16to32)
    for fn in fns:
        fn.argtypes = [p, i64, i64, p, i64, p, i64, p, i64]
        fn.restype = i64
    return fns
