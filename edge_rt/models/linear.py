"""The linear-layer factory and the weight formats that plug into it.

Models build every projection with `make_linear`; a loader then swaps a module for another format
(`swap_linear`) without the model knowing. Formats here:
- dense: `nn.Linear` in the compute dtype;
- int4 groups (`Int4Linear`): 4-bit codes with a scale and zero per group of 32 inputs,
  w = (q - 8) * scale + zero. GGUF Q4_0 (zero = 0) and Q4_1 (zero = m + 8 d) map onto it without
  re-quantizing; only scale and zero are rounded to the compute dtype. Kernels: edge-rt's own C
  kernels for bf16 on CPU ("native" with AVX2 + FMA, "native_bf16" with AVX-512 BF16,
  "native_vnni" with AVX-512 VNNI on activations rounded to int8 per group as llama.cpp rounds
  them; models/int4_matmul.c: weights read once per call whatever the rows, each row computed as
  a one-row call computes it), PyTorch's packed int4 matmuls
  (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA), or a dense weight where
  none exists (MPS). GGUF Q8_0 maps onto it exactly as two 4-bit halves (input_repeat=2);
- int8 groups (`Int8Linear`): GGUF Q8_0 as it is, w = d * q, on the AVX-512 BF16 or VNNI kernels
  only (the loader uses it where one runs: half the products of the two halves).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


NATIVE_KERNELS = ("native", "native_bf16", "native_vnni")  # edge-rt's own int4 kernels (models/int4_matmul.c)


def make_linear(in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """The one place models get a linear layer from (dense by default)."""
    return nn.Linear(in_features, out_features, bias=bias)


def swap_linear(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted path `name` with `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class Int4Linear(nn.Module):
    """Linear layer with 4-bit group-quantized weights: w = (q - 8) * scale + zero per group."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device, input_repeat: int = 1,
                 kernel: str = "dense", inner_k_tiles: int = 8):
        """
        Args:
            q: [N, K * input_repeat] integer codes in 0..15.
            scale, zero: [N, K * input_repeat // group_size] (any float dtype; stored in `dtype`).
            group_size: inputs per group (32 for GGUF Q4 blocks).
            bias: [N] or None.
            input_repeat: the input is concatenated this many times before the product (2 for
                int8 weights split into two 4-bit halves, see loading.quants.int8_as_int4).
            kernel: NATIVE_KERNELS (edge-rt's C kernels, bf16 on CPU), "cpu" / "cuda" (PyTorch's packed
                int4 matmuls) or "dense" (dequantized weight); the loader chooses it for the device
                (loading.weights.int4_kernel_for).
            inner_k_tiles: the CUDA kernel's K tiling (K must be a multiple of 16 * it).
        """
        super().__init__()
        N, K = q.shape
        self.input_repeat = input_repeat
        self.padded_out = -N % 16  # the packed kernels want N divisible by 16: pad with zero rows
        self.in_features, self.out_features, self.group_size = K // input_repeat, N, group_size
        self.kernel = kernel
        if self.kernel == "dense":
            w = dequantize_int4(q, scale, zero, group_size).to(device=device, dtype=dtype)
            self.register_buffer("weight", w)
        elif self.kernel in NATIVE_KERNELS:
            if group_size != 32 or dtype != torch.bfloat16 or device.type != "cpu":
                raise ValueError("the native int4 kernel takes 32-wide groups and bf16 on CPU")
            self.padded_out = 0
            codes, sz = pack_native(q, scale, zero, dtype, self.kernel)
            self.register_buffer("codes", codes)
            self.register_buffer("scales_and_zeros", sz)
        else:
            if self.padded_out:
                pad = self.padded_out
                q = torch.cat([q, q.new_full((pad, K), 8)])
                scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
                zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
            self.register_buffer("packed", pack_int4(q, device, self.kernel, inner_k_tiles))
            sz = torch.stack([scale.t(), zero.t()], dim=-1)  # [K/gs, N(+pad), 2]
            self.register_buffer("scales_and_zeros", sz.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel in NATIVE_KERNELS:
            from edge_rt.models.native_kernels import int4_matmul

            y = int4_matmul(x, self.codes, self.scales_and_zeros, self.out_features, self.input_repeat, self.kernel)
            return y if self.bias is None else y + self.bias
        if self.input_repeat > 1:
            x = torch.cat([x] * self.input_repeat, dim=-1)
        if self.kernel == "dense":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features * self.input_repeat)
        if self.kernel == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.padded_out:
            y = y[:, : self.out_features]
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group_size}, "
                f"kernel={self.kernel}, input_repeat={self.input_repeat}")


class Int8Linear(nn.Module):
    """Linear layer with int8 weights and a scale per 32-wide group (GGUF Q8_0), w = d * q, on
    edge-rt's AVX-512 kernels (models/int4_matmul.c): `kernel` "native_bf16" (q is exact in bf16,
    half the products of the same weights as two 4-bit halves in Int4Linear) or "native_vnni"
    (activations rounded to int8 per group, as llama.cpp's Q8_0 dot product rounds them, then exact
    integer products). d is rounded to `dtype` (bf16), as Int4Linear rounds its scales."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device, kernel: str = "native_bf16"):
        super().__init__()
        N, K = q.shape
        if K % 32 or dtype != torch.bfloat16 or device.type != "cpu":
            raise ValueError("the int8 kernel takes inputs in 32-wide groups and bf16 on CPU")
        if kernel not in ("native_bf16", "native_vnni"):
            raise ValueError(f"int8 kernel must be native_bf16 or native_vnni, got {kernel!r}")
        self.in_features, self.out_features, self.group_size, self.kernel = K, N, 32, kernel
        pad = -N % 16
        q = q.view(torch.int8)
        if pad:
            q = torch.cat([q, q.new_zeros(pad, K)])
            d = torch.cat([d, d.new_zeros(pad, d.shape[1])])
        U = (N + pad) // 16
        if kernel == "native_vnni":  # [U, K / 4, 64]: q + 128 as unsigned bytes, 4 inputs per output
            codes = (q.to(torch.int16) + 128).to(torch.uint8).view(U, 16, K // 4, 4).permute(0, 2, 1, 3)
            codes = codes.reshape(U, K // 4, 64)
        else:  # [U, K / 2, 32]: 2 inputs per output
            codes = q.view(U, 16, K // 2, 2).permute(0, 2, 1, 3).contiguous().view(U, K // 2, 32)
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", d.to(dtype).view(U, 16, K // 32).permute(0, 2, 1).contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from edge_rt.models.native_kernels import int8_matmul

        y = int8_matmul(x, self.codes, self.scales, self.out_features, self.kernel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group=32, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """Embedding table kept as int8 codes with a scale per 32-wide group (GGUF Q8_0).

    Looked-up rows are dequantized in fp32 (bit-exact), then cast to the compute dtype.
    """

    def __init__(self, q: torch.Tensor, d: torch.Tensor, group_size: int, dtype: torch.dtype, device):
        super().__init__()
        # q: [V, D] int8; d: [V, D / group_size]
        self.group_size, self.dtype = group_size, dtype
        self.register_buffer("q", q.to(device))
        self.register_buffer("d", d.float().to(device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q = self.q[ids].float()  # [..., D]
        d = self.d[ids].repeat_interleave(self.group_size, dim=-1)
        return (q * d).to(self.dtype)


PACK_ROWS = 4096  # rows packed at a time: bounds the int32 copy the packing op needs


def pack_int4(q: torch.Tensor, device: torch.device, kernel: str, inner_k_tiles: int = 8) -> torch.Tensor:
    """Pack [N, K] codes 0..15 (any integer dtype, N % 16 == 0) into the int4 kernel's layout."""
    if kernel == "cpu":
        # rows are packed independently, so packing in row blocks gives the same bytes
        return torch.cat([
            torch.ops.aten._convert_weight_to_int4pack_for_cpu(q[i : i + PACK_ROWS].to(torch.int32).contiguous(), 1)
            for i in range(0, q.shape[0], PACK_ROWS)
        ])
    # CUDA tinygemm layout: two codes per byte (even index in the high nibble), then tiled.
    q = q.to(torch.int32)
    q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).to(device)
    return torch.ops.aten._convert_weight_to_int4pack(q8.contiguous(), inner_k_tiles)


def pack_native(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype,
                variant: str = "native") -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] codes 0..15 and [N, K / 32] scales and zeros -> models/int4_matmul.c's layout:
    codes [N / 16, K, 8] bytes for "native" (byte j of a 16-output unit: output j's code in the
    low nibble, output 8 + j's in the high one), [N / 16, K / 2, 16] for "native_bf16" (byte j:
    output j's codes at inputs 2p and 2p + 1), [N / 16, K / 8, 64] for "native_vnni" (byte 4j + i:
    output j's codes at inputs 8o + i and 8o + 4 + i), and [N / 16, K / 32, 2, 16] scales and
    zeros in `dtype`; N is padded to a multiple of 16 with zero weights."""
    N, K = q.shape
    pad = -N % 16
    if pad:
        q = torch.cat([q, q.new_full((pad, K), 8)])
        scale, zero = (torch.cat([t, t.new_zeros(pad, t.shape[1])]) for t in (scale, zero))
    U, G = (N + pad) // 16, K // 32
    if variant == "native_vnni":
        g = q.to(torch.uint8).view(U, 16, K // 8, 2, 4)
        codes = (g[..., 0, :] | (g[..., 1, :] << 4)).permute(0, 2, 1, 3).reshape(U, K // 8, 64)  # [U, K / 8, 64]
    elif variant == "native_bf16":
        g = q.to(torch.uint8).view(U, 16, K // 2, 2)
        codes = (g[..., 0] | (g[..., 1] << 4)).permute(0, 2, 1).contiguous()  # [U, K / 2, 16]
    else:
        g = q.to(torch.uint8).view(U, 2, 8, K)
        codes = (g[:, 0] | (g[:, 1] << 4)).permute(0, 2, 1).contiguous()  # [U, K, 8]
    sz = torch.stack([t.to(dtype).view(U, 16, G).permute(0, 2, 1) for t in (scale, zero)], dim=2)  # [U, G, 2, 16]
    return codes, sz.contiguous()


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Reference dequantization in fp32: [N, K]."""
    s = scale.float().repeat_interleave(group_size, dim=1)
    z = zero.float().repeat_interleave(group_size, dim=1)
    return (q.float() - 8.0) * s + z
