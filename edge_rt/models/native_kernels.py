"""Decode-step kernels in C (edge_rt/models/decode_kernels.c), for CPU decode steps and verify chunks.

- `rope_attention`: rope on q and k, k and v into the KV cache, causal attention for T queries
  (query t sees positions 0..start+t), in one call; `attention` is the same without rope and cache.
- `add_rms_norm`: the residual add and the RMSNorm after it.
- `silu_mul`: SwiGLU's gate, silu(g) * u, rounded as PyTorch's bf16 ops round.
- `int4_matmul` (edge_rt/models/int4_matmul.c): int4 group-quantized matrix products for
  Int4Linear's "native" (AVX2 + FMA), "native_bf16" (AVX-512 BF16) and "native_vnni" (AVX-512
  VNNI, int8 activations) kernels; `int8_matmul` for Int8Linear; the weights are read once per
  call whatever the rows.

All run on OpenMP threads (queries, rows or outputs split between them; the split never changes a
result's bits); the libraries bind to torch's own libgomp, so they share PyTorch's thread pool.

Every kernel computes a row exactly as a one-row call computes it, so a T-token speculative verify
chunk is bit-identical to T one-token steps without T separate attention calls (the per-query SDPA
loop it replaces cost about 35 us a query and layer on a 2-core CPU; docs/SPECULATIVE.md). Plain
decode steps (T = 1) run through the same kernels, so both paths share one set of numerics.
`available()` is False without a C compiler or with EDGE_RT_NATIVE=0; the model then runs PyTorch
(SDPA one query at a time for verify chunks). Each function returns None, or `fusable` False,
where its dtypes, device or layout do not apply, and the caller runs PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from edge_rt.native import load_library

SOURCE = Path(__file__).with_name("decode_kernels.c")
INT4_SOURCE = Path(__file__).with_name("int4_matmul.c")


@functools.lru_cache(maxsize=None)
def _kernel():
    lib = load_library(SOURCE, "decode-step kernels fall back to PyTorch (slower decoding and verify)",
                       simd="avx2", openmp=True)
    if lib is None:
        return None
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.edge_rt_attention.argtypes = [p, i64, i64, i64, p, p, i64, i64, p, i64, i64, i64, *[i64] * 6, f32]
    lib.edge_rt_rope_attention.argtypes = [p, i64, i64, i64, p, p, i64, p, p, i64, i64, i64, p, *[i64] * 6, f32]
    lib.edge_rt_add_rms_norm.argtypes = [p, p, i64, p, f32, p, p, i64, i64, i64]
    lib.edge_rt_silu_mul_bf16.argtypes = [p, i64, i64, p]
    for fn in (lib.edge_rt_attention, lib.edge_rt_rope_attention, lib.edge_rt_add_rms_norm, lib.edge_rt_silu_mul_bf16):
        fn.restype = i64
    return lib


def available() -> bool:
    return _kernel() is not None


@functools.lru_cache(maxsize=None)
def _int4_kernel():
    from edge_rt.native import simd_level

    if simd_level() != "avx2":
        return None  # the portable build is slower than PyTorch's int4 kernel: use that instead
    lib = load_library(INT4_SOURCE, "int4 matrix products fall back to PyTorch's kernel", simd="avx2", openmp=True)
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.edge_rt_int4_matmul, lib.edge_rt_int4_matmul_bf16, lib.edge_rt_int4_matmul_vnni):
        fn.argtypes = [p, p, p, i64, i64, i64, i64, i64, i64, p, i64, i64]
        fn.restype = i64
    for fn in (lib.edge_rt_int8_matmul_bf16, lib.edge_rt_int8_matmul_vnni):
        fn.argtypes = [p, p, p, i64, i64, i64, i64, p, i64, i64]
        fn.restype = i64
    return lib


def int4_available(variant: str = "native") -> bool:
    """Whether `int4_matmul` runs here: x86-64 with AVX2 and FMA, and the kernel built;
    variant "native_bf16" also needs AVX-512 BF16, "native_vnni" AVX-512 VNNI."""
    from edge_rt.native import has_avx512_bf16, has_avx512_vnni

    need = {"native": lambda: True, "native_bf16": has_avx512_bf16, "native_vnni": has_avx512_vnni}[variant]
    return _int4_kernel() is not None and need()


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [rows, K] bf16 with contiguous rows (a view where it already is one)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 and x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16).contiguous()


def int4_matmul(x: torch.Tensor, codes: torch.Tensor, sz: torch.Tensor, n_out: int, repeat: int = 1,
                variant: str = "native") -> torch.Tensor:
    """x @ w.T for int4 weights in models/int4_matmul.c's layout (see linear.pack_native).

    Args:
        x: [..., Kx] bf16 on CPU (rows contiguous).
        codes, sz: from linear.pack_native (K = Kx * repeat).
        n_out: N, the outputs (codes hold them padded to a multiple of 16).
        repeat: the input is read `repeat` times along K (int8 weights as two 4-bit halves).
        variant: "native" (AVX2 + FMA, fp32 products), "native_bf16" (AVX-512 BF16 dot
            products) or "native_vnni" (AVX-512 VNNI: x quantized to int8 per 32-wide group, as
            llama.cpp does, then exact integer dot products); the codes must be packed for it
            (pack_native's `variant`).
    Returns:
        [..., N] bf16, each row computed exactly as a one-row call computes it.
    """
    Kx, N = x.shape[-1], n_out
    x2 = _bf16_rows(x)
    y = torch.empty(x2.shape[0], N, dtype=torch.bfloat16)
    lib = _int4_kernel()
    fn = {"native_bf16": lib.edge_rt_int4_matmul_bf16, "native_vnni": lib.edge_rt_int4_matmul_vnni}.get(
        variant, lib.edge_rt_int4_matmul)
    _check(fn(codes.data_ptr(), sz.data_ptr(), x2.data_ptr(), 1, x2.stride(0),
                                              x2.shape[0], Kx, repeat, N, y.data_ptr(), 1, N),
           f"int4 matmul ({N} x {Kx * repeat})", "an input width that is a multiple of 32")
    return y.view(*x.shape[:-1], N)


def int8_matmul(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, n_out: int,
                variant: str = "native_bf16") -> torch.Tensor:
    """x @ w.T for int8 weights (w = d * q per 32-wide group) on AVX-512 BF16 or ("native_vnni")
    VNNI, in linear.Int8Linear's layout for it: x [..., K] bf16 on CPU -> [..., N] bf16, each row
    computed exactly as a one-row call computes it."""
    K = x.shape[-1]
    x2 = _bf16_rows(x)
    y = torch.empty(x2.shape[0], n_out, dtype=torch.bfloat16)
    lib = _int4_kernel()
    fn = lib.edge_rt_int8_matmul_vnni if variant == "native_vnni" else lib.edge_rt_int8_matmul_bf16
    _check(fn(codes.data_ptr(), d.data_ptr(), x2.data_ptr(), x2.stride(0), x2.shape[0], K, n_out, y.data_ptr(), 1,
              n_out), f"int8 matmul ({n_out} x {K})", "an input width that is a multiple of 32")
    return y.view(*x.shape[:-1], n_out)


def _check(rc: int, what: str, need: str = "a multiple of 8") -> None:
    if rc == -1:
        raise MemoryError(f"native {what}: scratch buffer could not be allocated")
    if rc:
        raise ValueError(f"native {what}: size not supported ({need} is needed)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention, one query at a time in C.

    Args:
        q: [B, T, H, hd] fp32 (any strides with the last dim contiguous).
        k, v: [B, Hkv, S, hd] fp32 cache views (rows contiguous); the last T positions are the queries'.
        scale: score scale (1 / sqrt(hd)).
    Returns:
        [B, T, H * hd] fp32.
    """
    B, T, H, hd = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.empty(B, T, H, hd, dtype=torch.float32)
    _check(_kernel().edge_rt_attention(q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
                                       k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                                       out.data_ptr(), out.stride(0), out.stride(1), out.stride(2),
                                       B, T, H, Hkv, hd, S, scale), f"attention (head size {hd})")
    return out.view(B, T, H * hd)


def fusable(qkv: torch.Tensor, cos: torch.Tensor, cache, head_dim: int) -> bool:
    """Whether `rope_attention` takes this step: a CPU fp32 cache with `append_slots`, a bf16 or
    fp32 projection with contiguous rows, fp32 rope rows, a head size that is a multiple of 8 up to
    512, and the kernel built."""
    return (getattr(cache, "append_slots", None) is not None and cache.dtype == torch.float32
            and qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float32) and qkv.stride(-1) == 1
            and cos.dtype == torch.float32 and cos.stride(-1) == 1 and head_dim % 8 == 0 and 0 < head_dim <= 512
            and available())


def rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, n_heads: int, n_kv: int,
                   scale: float, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A decode step or exact verify chunk in one call: rope on q and k, k and v into the cache,
    causal attention (query t sees positions 0..start+t).

    Args:
        qkv: [B, T, (H + 2 Hkv) * hd] the fused projection (bf16 or fp32).
        cos, sin: [T, 1, hd] fp32 rope rows of the T positions (sin's first half negated).
        cache: an edge_rt.kv.cache.KVCache (fp32, on CPU); it grows by T positions.
        out_dtype: fp32, or bf16 (rounded from the fp32 result in the kernel).
    Returns:
        [B, T, H * hd] in out_dtype.
    """
    B, T, width = qkv.shape
    hd = width // (n_heads + 2 * n_kv)
    if not 0 < hd <= 512 or hd % 8:
        raise ValueError(f"native attention (head size {hd}): size not supported (a multiple of 8 is needed)")
    keys, values, start = cache.append_slots(T)
    bf16 = out_dtype == torch.bfloat16
    out = torch.empty(B, T, n_heads * hd, dtype=torch.bfloat16 if bf16 else torch.float32)
    _check(_kernel().edge_rt_rope_attention(
        qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), qkv.stride(0), qkv.stride(1),
        cos.data_ptr(), sin.data_ptr(), cos.stride(0),
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), start,
        out.data_ptr(), int(bf16), B, T, n_heads, n_kv, hd, scale), f"attention (head size {hd})")
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(h, RMSNorm(h) in out_dtype) for h = x + y (x where y is None) in one call, or None where
    the kernel does not apply (the caller runs PyTorch): x fp32 and y bf16/fp32, contiguous on CPU."""
    d = x.shape[-1]
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and out_dtype in (torch.bfloat16, torch.float32)
            and weight.dtype == torch.float32 and d % 8 == 0 and x.is_contiguous() and available()):
        return None
    if y is not None and not (y.dtype in (torch.bfloat16, torch.float32) and y.is_contiguous() and y.shape == x.shape):
        return None
    h = x if y is None else torch.empty_like(x)
    out = torch.empty(x.shape, dtype=out_dtype)
    _check(_kernel().edge_rt_add_rms_norm(x.data_ptr(), None if y is None else y.data_ptr(),
                                          int(y is not None and y.dtype == torch.bfloat16), weight.data_ptr(), eps,
                                          h.data_ptr(), out.data_ptr(), int(out_dtype == torch.bfloat16),
                                          x.numel() // d, d), f"RMSNorm (width {d})")
    return h, out


def silu_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """silu(g) * u for gu = [g | u] on the last dim, bf16 on CPU, in one call (rounded as PyTorch's
    bf16 silu and product round), or None where it does not apply (the caller runs PyTorch)."""
    n2 = gu.shape[-1]
    if not (gu.device.type == "cpu" and gu.dtype == torch.bfloat16 and n2 % 16 == 0 and gu.is_contiguous()
            and available()):
        return None
    out = torch.empty(*gu.shape[:-1], n2 // 2, dtype=torch.bfloat16)
    _check(_kernel().edge_rt_silu_mul_bf16(gu.data_ptr(), gu.numel() // n2, n2 // 2, out.data_ptr()),
           f"SwiGLU gate (width {n2 // 2})")
    return out
