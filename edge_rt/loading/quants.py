"""GGML tensor codecs: raw GGUF bytes -> torch tensors.

Block layouts (from ggml's ggml-common.h; each block covers 32 consecutive inputs of a row):
    Q8_0: fp16 d, int8 qs[32]                    w = d * q
    Q4_0: fp16 d, uint8 qs[16]                   w = d * (q - 8), q = low nibbles then high nibbles
    Q4_1: fp16 d, fp16 m, uint8 qs[16]           w = d * q + m
The decoders here are vectorized torch code and are tested bit for bit against `gguf.quants`
(the reference implementation of llama.cpp's Python package). Types without a decoder here
(the K-quants and friends) are dequantized by `gguf.quants` itself.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants as gq

from edge_rt.errors import UnsupportedModelError

BLOCK = 32

# Types edge-rt loads; the value says who decodes them ("edge-rt" here, "gguf" = gguf.quants).
SUPPORTED_TYPES = {
    QT.F32: "edge-rt", QT.F16: "edge-rt", QT.BF16: "edge-rt",
    QT.Q8_0: "edge-rt", QT.Q4_0: "edge-rt", QT.Q4_1: "edge-rt",
    QT.Q5_0: "gguf", QT.Q5_1: "gguf", QT.Q2_K: "gguf", QT.Q3_K: "gguf",
    QT.Q4_K: "gguf", QT.Q5_K: "gguf", QT.Q6_K: "gguf",
}
# Types whose codes map exactly onto Int4Linear's (q - 8) * scale + zero.
INT4_TYPES = (QT.Q4_0, QT.Q4_1)


def check_supported(name: str, qtype) -> None:
    if qtype not in SUPPORTED_TYPES:
        label = getattr(qtype, "name", str(qtype))
        raise UnsupportedModelError(
            f"tensor {name}: type {label} is not supported (supported: "
            + ", ".join(t.name for t in SUPPORTED_TYPES) + ")"
        )


def _view(raw: np.ndarray) -> torch.Tensor:
    """A torch view of memory-mapped, read-only file bytes (never written to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(raw))


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> torch.Tensor:
    # raw: bytes of [rows, K] -> [rows, K/32, block_bytes] uint8
    return _view(raw).reshape(rows, -1, block_bytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    # b: [..., 2] uint8 -> [...] fp16 (little endian)
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [R, G, 16] uint8 -> [R, G, 32] codes: low nibbles are inputs 0..15, high nibbles 16..31
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def split_int4(raw: np.ndarray, qtype, shape: tuple[int, int]):
    """Q4_0/Q4_1 bytes -> (q [N, K] uint8 in 0..15, scale [N, K/32] fp32, zero [N, K/32] fp32)."""
    N, K = shape
    if qtype == QT.Q4_0:
        b = _blocks(raw, N, 18)
        d = _f16(b[..., 0:2]).float()
        q = _nibbles(b[..., 2:])
        zero = torch.zeros_like(d)
    elif qtype == QT.Q4_1:
        b = _blocks(raw, N, 20)
        d = _f16(b[..., 0:2]).float()
        m = _f16(b[..., 2:4]).float()
        q = _nibbles(b[..., 4:])
        zero = m + 8.0 * d  # d*q + m == d*(q-8) + (m + 8d)
    else:
        raise ValueError(f"{qtype!r} is not a 4-bit group type")
    return q.reshape(N, K), d, zero


def split_q8_0(raw: np.ndarray, shape: tuple[int, int]):
    """Q8_0 bytes -> (q [N, K] int8, d [N, K/32] fp32)."""
    N, K = shape
    b = _blocks(raw, N, 34)
    d = _f16(b[..., 0:2]).float()
    q = b[..., 2:].contiguous().view(torch.int8).reshape(N, K)
    return q, d


def int8_as_int4(q: torch.Tensor, d: torch.Tensor):
    """Write w = d * q (int8 q, 32-wide groups) as two 4-bit halves for Int4Linear.

    q = 16 * hi + lo with hi = q >> 4 in -8..7 and lo = q & 15 in 0..15, so
    w = (hi + 8 - 8) * 16d + (lo - 8) * d + 8d: the codes [hi + 8 | lo] over 2K inputs, scales
    [16d | d], zeros [0 | 8d], applied to the input repeated twice. Exact in fp32.
    Returns (codes [N, 2K] uint8, scale [N, 2K/32], zero [N, 2K/32]).
    """
    qi = q.view(torch.uint8)
    hi = ((qi >> 4) ^ 8)  # (q >> 4) + 8 for the signed high nibble, computed on the raw byte
    codes = torch.cat([hi, qi & 15], dim=1)
    scale = torch.cat([16.0 * d, d], dim=1)
    zero = torch.cat([torch.zeros_like(d), 8.0 * d], dim=1)
    return codes, scale, zero


def dequantize(raw: np.ndarray, qtype, shape: tuple[int, int] | tuple[int]) -> torch.Tensor:
    """Raw GGUF tensor data -> fp32 torch tensor of `shape` (row-major, torch order)."""
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if qtype == QT.F32:
        t = torch.from_numpy(np.ascontiguousarray(raw).view(np.float32).copy())
    elif qtype == QT.F16:
        t = torch.from_numpy(np.ascontiguousarray(raw).view(np.float16).copy()).float()
    elif qtype == QT.BF16:
        u = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).copy())
        t = u.view(torch.bfloat16).float()
    elif qtype == QT.Q8_0:
        b = _blocks(raw, rows, 34)
        d = _f16(b[..., 0:2]).float()
        q = b[..., 2:].contiguous().view(torch.int8).float()
        t = d.unsqueeze(-1) * q
    elif qtype == QT.Q4_0:
        b = _blocks(raw, rows, 18)
        d = _f16(b[..., 0:2]).float()
        t = d.unsqueeze(-1) * (_nibbles(b[..., 2:]).float() - 8.0)
    elif qtype == QT.Q4_1:
        b = _blocks(raw, rows, 20)
        d = _f16(b[..., 0:2]).float()
        m = _f16(b[..., 2:4]).float()
        t = d.unsqueeze(-1) * _nibbles(b[..., 4:]).float() + m.unsqueeze(-1)
    else:
        check_supported("?", qtype)
        t = torch.from_numpy(np.ascontiguousarray(gq.dequantize(np.asarray(raw), qtype), dtype=np.float32))
    return t.reshape(shape)
