"""Byte sizes as users write them: "64MB", "1.5GiB", "512k", 123456."""

from __future__ import annotations

import math
import re

from edge_rt.errors import InvalidOptionError

# unit (lower case) -> bytes. SI units are powers of 1000, IEC units (and bare K/M/G/T, as most
# command-line tools read them) powers of 1024.
UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Bytes in a size: an integer, or a number with a unit (B, KB/MB/GB/TB, KiB/MiB/GiB/TiB, K/M/G/T).

    Raises:
        InvalidOptionError naming `what` for anything else (negative, empty, unknown unit).
    """
    if isinstance(value, bool):
        raise InvalidOptionError(f"{what} must be a size like 64MB or 1.5GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise InvalidOptionError(f"{what} must be a positive size, got {value!r}")
        return int(value)
    m = _SIZE_RE.fullmatch(value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in UNITS:
        raise InvalidOptionError(f"{what} must be a size like 64MB, 512MiB or 1.5GiB, got {value!r}")
    n = int(float(m.group(1)) * UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidOptionError(f"{what} must be a positive size, got {value!r}")
    return n


def format_size(n: int) -> str:
    """A byte count for humans, in MiB or GiB with one decimal (e.g. '64.0 MiB')."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"
