"""Endor: unstructured-sparse weights as a bitmap of nonzero positions plus the packed nonzeros.

A pruned [N, K] matrix is stored as records (suffixes of the weight's name, see RECORDS):
    .bitmap        uint8 [N, ceil(K / 8)]: bit j of byte b is column 8 b + j (numpy "little" order)
    .values        the nonzeros in row-major order: the weight's own bits (uint16 for bf16/fp16,
                   float32) or int8 codes
    .tile_offsets  int64 [n_tiles + 1]: index of the first value of each tile of `tile_rows` rows
    .scales        float32 [N], only for int8 values: value = code * scale[row]
The tile offsets make every tile decodable on its own, so decoding runs tile by tile with
scratch memory bounded by one tile, and tiles can be decoded in parallel on a GPU.

"Nonzero" means nonzero *bits*: a kept -0.0 stays -0.0, pruned positions decode to +0.0, so the
decoded tensor equals the pruned dense tensor bit for bit (for int8 values: the pruned tensor
after `quantize_rows`, the reference that test compares to).

Decoding on CPU is vectorized over a whole range of rows, with no per-tile loop. 16-bit values
into a same-width target: a C kernel compiled on first use (offload/native.py, endor_kernel.c;
about 0.12 ns per weight on one core). Otherwise, or without a C compiler: numpy unpacks the
bitmap to a bool mask and takes the positions of its ones (flatnonzero), one torch scatter
writes the values there, and one searchsorted checks every tile's count against the offsets
(about 0.9 ns per weight). Both release the GIL, so row ranges decode in parallel threads, and
write the same bits (docs/OFFLOAD.md). On CUDA: torch (shift-and-mask, masked_scatter).
Bytes per weight at density d: bf16 values 2 d + 1/8 (1.125 at 50%, 1.78x fewer than dense
bf16); int8 values d + 1/8 + 4 / K.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import numpy as np
import torch

from offload import native

FORMAT_VERSION = 1
DEFAULT_TILE_ROWS = 256
RECORDS = ("bitmap", "values", "tile_offsets", "scales")  # record name = target + "." + suffix
VALUE_TYPES = ("native", "int8")  # native: the weight dtype's own bits; int8: codes + row scales
# torch dtype -> integer dtype of the same width: values are moved as bit patterns, never as floats
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@dataclass
class EndorTensor:
    """One encoded matrix (numpy arrays, ready for a store)."""

    shape: tuple[int, int]
    dtype: str  # decoded dtype: "bfloat16" | "float16" | "float32"
    values_type: str  # "native" | "int8"
    tile_rows: int
    bitmap: np.ndarray
    values: np.ndarray
    tile_offsets: np.ndarray
    scales: np.ndarray | None = None

    def records(self) -> dict[str, np.ndarray]:
        out = {"bitmap": self.bitmap, "values": self.values, "tile_offsets": self.tile_offsets}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    def spec(self) -> dict:
        """The tensor-table entry a store keeps for this matrix."""
        return {"format": "endor", "version": FORMAT_VERSION, "shape": list(self.shape), "dtype": self.dtype,
                "values": self.values_type, "tile_rows": self.tile_rows, "nnz": int(self.tile_offsets[-1])}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.records().values())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (codes int8 [N, K], scales fp32 [N]); zeros stay zero."""
    wf = w.float()
    scale = wf.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The int8 reference: (codes * row scale) in fp32, cast to `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def encode(w: torch.Tensor, tile_rows: int = DEFAULT_TILE_ROWS, values: str = "native") -> EndorTensor:
    """Encode a (pruned) 2-D weight. Zero bits are the pruned positions.

    Args:
        w: [N, K] bfloat16, float16 or float32.
        tile_rows: rows per tile.
        values: "native" (the weight's own bits) or "int8" (codes with a scale per row).
    Returns:
        The EndorTensor; `decode` gives back `w` bit for bit ("native") or `dequantize_rows`
        of its codes ("int8").
    """
    if w.dim() != 2 or w.dtype not in BITS:
        raise ValueError(f"Endor encodes 2-D bf16/fp16/fp32 weights, got {tuple(w.shape)} {w.dtype}")
    if values not in VALUE_TYPES:
        raise ValueError(f"values must be one of {VALUE_TYPES}, got {values!r}")
    N, K = w.shape
    w = w.detach().cpu().contiguous()
    scales = None
    if values == "int8":
        q, s = quantize_rows(w)
        bits = q.numpy()
        scales = s.numpy().astype(np.float32)
    else:
        bits = w.view(BITS[w.dtype]).numpy()
    mask = bits != 0  # [N, K]
    row_nnz = mask.sum(axis=1, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(row_nnz)])
    n_tiles = -(-N // tile_rows)
    tile_offsets = starts[np.minimum(np.arange(n_tiles + 1) * tile_rows, N)]
    return EndorTensor(
        shape=(N, K), dtype=_dtype_name(w.dtype), values_type=values, tile_rows=tile_rows,
        bitmap=np.packbits(mask, axis=1, bitorder="little"),
        values=np.ascontiguousarray(bits[mask]).view(np.uint16 if bits.itemsize == 2 else bits.dtype),
        tile_offsets=tile_offsets.astype(np.int64), scales=scales,
    )


def decode(parts: dict[str, torch.Tensor], spec: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode one matrix from its records (torch tensors on one device) into `out`.

    Args:
        parts: suffix -> tensor ("bitmap", "values", "tile_offsets" and "scales" for int8);
            on CPU they may be views of numpy buffers.
        spec: the tensor-table entry (`EndorTensor.spec()`).
        out: optional scratch with at least N*K elements of the decoded dtype; the result is
            a view of it.
    Returns:
        [N, K] tensor of the decoded dtype, on the parts' device.
    """
    N, K = spec["shape"]
    dtype = getattr(torch, spec["dtype"])
    device = parts["bitmap"].device
    if out is None:
        out = torch.empty(N * K, dtype=dtype, device=device)
    w = out.reshape(-1)[: N * K].view(N, K)
    if spec["values"] == "int8":
        codes = torch.empty(N, K, dtype=torch.int8, device=device)
        _scatter(parts, spec, codes)
        w.copy_(dequantize_rows(codes, parts["scales"], dtype))
        return w
    _scatter(parts, spec, w.view(BITS[dtype]))
    return w


def _scatter(parts: dict[str, torch.Tensor], spec: dict, plane: torch.Tensor) -> None:
    """Write the values at the bitmap's positions of `plane` (an integer view), zeros elsewhere."""
    values = parts["values"].view(plane.dtype) if parts["values"].element_size() == plane.element_size() \
        else parts["values"]
    if plane.device.type == "cpu":
        _scatter_cpu(parts["bitmap"].numpy(), values, parts["tile_offsets"].numpy(), spec["tile_rows"],
                     plane.view(-1))
    else:
        _scatter_torch(parts["bitmap"], values, plane)


def _scatter_cpu(bitmap: np.ndarray, values: torch.Tensor, offsets: np.ndarray, tile_rows: int,
                 plane: torch.Tensor) -> None:
    """Write `values` at the bitmap's set bits of `plane` and zeros elsewhere, vectorized over all
    rows. 16-bit values into a contiguous plane: the native kernel (offload/native.py, ~0.12 ns per
    weight). Otherwise numpy unpacks the bitmap to a bool mask and takes the positions of its ones,
    one torch scatter puts the values there (~0.9 ns per weight). Both release the GIL and check
    every tile's count against the offsets.

    Args:
        bitmap: uint8 [R, ceil(K / 8)], the rows to decode.
        values: the rows' nonzeros in row-major order, as integers of plane's dtype.
        offsets: [n_tiles + 1] index of each tile's first value, relative to values[0].
        tile_rows: rows per tile (the bitmap's first row starts a tile).
        plane: 1-D integer tensor of R * K elements (possibly strided: the top halves of a
            widening target, whose other halves the caller zeroes).
    """
    R = bitmap.shape[0]
    K = plane.numel() // R if R else 0
    if _scatter_native(bitmap, values, offsets, tile_rows, plane, R, K):
        return
    plane.zero_()
    mask = np.unpackbits(bitmap, axis=1, count=K, bitorder="little").view(np.bool_)  # [R, K]; bool: fast nonzero
    pos = mask.ravel().nonzero()[0]  # [nnz] ascending (np.flatnonzero without its Python wrapper)
    # The count of positions before each tile's first row must be the stored offset: a corrupt
    # bitmap or offsets table is refused before any value lands in the wrong place.
    counted = pos.searchsorted(_tile_starts(len(offsets), tile_rows, R, K))
    if (counted != offsets).any():
        t = int(np.flatnonzero(np.diff(counted) != np.diff(offsets))[0]) if len(offsets) > 1 else 0
        raise ValueError(f"Endor tile {t}: bitmap has {counted[t + 1] - counted[t]} nonzeros, "
                         f"offsets say {offsets[t + 1] - offsets[t]}")
    if pos.size != values.numel():
        raise ValueError(f"Endor: bitmap has {pos.size} nonzeros, {values.numel()} values are stored")
    plane.scatter_(0, torch.from_numpy(pos), values)  # ~2x faster than numpy's fancy assignment


def _scatter_native(bitmap, values, offsets, tile_rows, plane, R, K) -> bool:
    """The native kernel's decode into `plane`: int16 (the values' own width) or int32 (bf16 bits
    into the upper halves: the fp32 of the same value). False where it does not apply or the data
    do not check out (then the numpy path redoes it and raises the precise error)."""
    if not (R and plane.dtype in (torch.int16, torch.int32) and values.dtype == torch.int16
            and plane.is_contiguous() and values.is_contiguous() and bitmap.flags.c_contiguous
            and bitmap.shape[1] == (K + 7) // 8 and plane.numel() == R * K):
        return False
    kernels = native.endor_kernel()
    if kernels is None or (plane.dtype == torch.int32 and sys.byteorder != "little"):
        return False
    kernel = kernels[plane.dtype == torch.int32]
    counted = np.empty(len(offsets), dtype=np.int64)
    used = kernel(bitmap.ctypes.data, R, K, values.data_ptr(), values.numel(), plane.data_ptr(), tile_rows,
                  counted.ctypes.data, len(counted))
    return used == values.numel() and np.array_equal(counted, offsets)


@functools.lru_cache(maxsize=256)
def _tile_starts(n: int, tile_rows: int, rows: int, k: int) -> np.ndarray:
    """Flat index of the first weight of each of n - 1 tiles, and the end: [n]."""
    starts = np.minimum(np.arange(n, dtype=np.int64) * tile_rows, rows) * k
    starts.flags.writeable = False
    return starts


def decode_rows(parts: dict[str, torch.Tensor], spec: dict, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
    """Decode rows [r0, r1) on CPU straight into `out`, cast to out's dtype.

    Args:
        parts: the records as CPU tensors.
        spec: the tensor-table entry.
        r0, r1: whole tiles: r0 a multiple of tile_rows, r1 too or the last row.
        out: [r1 - r0, K] contiguous float tensor (the decoded dtype or a wider one, e.g. fp32 for bf16).
    Returns:
        out. Equal to decode(parts, spec)[r0:r1].to(out.dtype), bit for bit.
    """
    N, K = spec["shape"]
    tr = spec["tile_rows"]
    if r0 % tr or not (r0 < r1 <= N) or (r1 % tr and r1 != N):
        raise ValueError(f"rows [{r0}, {r1}) are not tile-aligned (whole tiles of {tr} rows of {N})")
    dtype = getattr(torch, spec["dtype"])
    bitmap, offsets = parts["bitmap"].numpy(), parts["tile_offsets"].numpy()
    t0, t1 = r0 // tr, -(-r1 // tr)
    lo, hi = int(offsets[t0]), int(offsets[t1])
    vals = parts["values"][lo:hi]
    if spec["values"] == "int8":
        codes = torch.empty((r1 - r0) * K, dtype=torch.int8)
        _scatter_cpu(bitmap[r0:r1], vals, offsets[t0 : t1 + 1] - lo, tr, codes)
        return out.copy_(dequantize_rows(codes.view(r1 - r0, K), parts["scales"][r0:r1], dtype))
    if out.dtype != dtype:
        if dtype == torch.bfloat16 and out.dtype == torch.float32 and out.is_contiguous() and _scatter_native(
                bitmap[r0:r1], vals.view(torch.int16), offsets[t0 : t1 + 1] - lo, tr, out.view(torch.int32).view(-1),
                r1 - r0, K):
            return out
        out.zero_()  # a widening target: the halves the values do not go to
    plane, vals = _plane_and_values(out, vals, dtype)
    _scatter_cpu(bitmap[r0:r1], vals, offsets[t0 : t1 + 1] - lo, tr, plane)
    return out


def _plane_and_values(out: torch.Tensor, vals: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1-D integer view of `out` to scatter into, and the values as integers for it (exact widening)."""
    if out.dtype == dtype:
        return out.view(BITS[dtype]).view(-1), vals.view(BITS[dtype])
    if dtype == torch.bfloat16 and out.dtype == torch.float32 and sys.byteorder == "little":
        # bf16 is the top half of an fp32: the 16-bit values go to the odd halves
        return out.view(torch.int16).view(-1)[1::2], vals.view(torch.int16)
    wide = vals.view(dtype).to(out.dtype)
    return out.view(BITS[out.dtype]).view(-1), wide.view(BITS[out.dtype])


SHIFTS = torch.arange(8, dtype=torch.uint8)


def _scatter_torch(bitmap: torch.Tensor, values: torch.Tensor, plane: torch.Tensor) -> None:
    N, K = plane.shape
    bits = (bitmap.unsqueeze(-1) >> SHIFTS.to(bitmap.device)) & 1  # [N, K/8, 8]
    mask = bits.view(N, -1)[:, :K].bool()
    plane.zero_()
    plane.masked_scatter_(mask, values)
