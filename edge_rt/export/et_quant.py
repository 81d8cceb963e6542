"""ExecuTorch quantization on grids that contain the source weights, for XNNPACK's int8 x int4 kernels.

XNNPACK's dynamically quantized linear multiplies int8 activations (asymmetric, one scale and zero
point per token, chosen by the kernel from the row's min/max) with symmetric weights: 4-bit codes
in -8..7 with one bf16 scale per 32 inputs (qb4w), or 8-bit codes with one fp32 scale per output
channel (qc8w). It has no weight zero points. The default GGUF's layers are Q4_1 (w = d*q + m per
32 inputs, q in 0..15) and its tied embedding / output projection Q8_0 (w = d*q, q in -127..127):
re-quantizing them symmetrically with int8 activations (torchao's own 8da4w) lost ~29 points of top-1.

Weights: each matrix becomes w = scale * codes + offset, codes symmetric, one scale and one
offset per group of 32 inputs (the group along the input dimension, as the file stores it):
    Q4_1   codes q - 8, scale d, offset m + 8d                     exact
    Q4_0   codes q - 8, scale d, no offset                         exact
    Q8_0   q = 16*hi + lo (hi in -8..7, lo in 0..15): w = 16d*hi + d*(lo - 8) + 8d, i.e. 4-bit codes
           [hi | lo - 8] over the input repeated twice, scales [16d | d], offset 8d     exact
    other  (F32/F16/BF16, K-quants, Hugging Face folders; Q8_0 where at most 4 bits are allowed)
           round to nearest: at 4 bits asymmetric per group (min/max, written as above), at 8 bits
           symmetric per output channel
Bits allowed (quantize_model): int8 8 everywhere; 8da4w 4 for the layers, 8 for the output projection.
The codes go into torchao's IntxUnpackedToInt8Tensor as they are (nothing is re-quantized);
torch.export writes it as dequantize_affine -> linear, which XnnpackPartitioner lowers to XNNPACK's
kernel (one partitioner for the whole graph, so the ops building the activation rows below share
the linear's delegate). The offsets add groupsum(x) @ O^T, groupsum summing x over each group of
32 inputs: an fp32 nn.Linear 32 times smaller than the layer. The only weight rounding left is
XNNPACK's: it stores the 4-bit group scales as bf16 (relative error <= 2^-9).

Activations ("hi/lo" rows): int8 per token alone gives 92% top-1 on SmolLM2 (outliers in the down
projections' inputs; scripts/sim_export_quant.py). So each product runs on two rows per
token: x_hi, x rounded to the int8 grid the kernel would pick for x (asymmetric, range including 0:
XNNPACK's xnn_f32_qd8_asymmetric_quantization_params), whose values the kernel's own quantization
then reproduces exactly (x_hi spans that grid from code -128 to 127), and x_lo = x - x_hi, whose own
grid is 255 times finer. y = W x_hi + W x_lo: the same weights, one kernel call on 2T rows (a decode
step reads the weights once either way), activations good to ~16 bits.

The embedding table keeps its codes too (int8 storage, a scale and offset per group, gathered per
token and multiplied out in fp32: exact for Q8_0 / Q4_x); other sources get symmetric 8-bit groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GROUP = 32  # inputs per scale (GGUF's block size)


@dataclass
class Grid:
    """A weight matrix as w = scale * codes + offset, per group of `group` inputs.

    codes [N, K] int8 (-8..7 at 4 bits, -127..127 at 8); scale, offset [N, K / group] fp32 (offset
    None: zero). `repeat` > 1: the codes cover the input repeated that many times (K = repeat * in),
    so the matrix holds bits * repeat bits per weight (Q8_0 as two 4-bit halves).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    bits: int
    group: int
    kind: str  # for the manifest: how the grid was obtained
    repeat: int = 1

    def dense(self) -> torch.Tensor:
        """The weight the grid represents, [N, K / repeat] fp32 (copies summed)."""
        w = self.codes.float().unflatten(1, (-1, self.group)) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        w = w.flatten(1)
        return w.unflatten(1, (self.repeat, -1)).sum(1)


# ---- grids from the file's codes (explicit: the tensor's GGML type says which) ----------------

def source_grid(parts) -> Grid | None:
    """The exact grid of a weight stored as Q4_0 / Q4_1 / Q8_0 (all its parts), else None.

    Args:
        parts: the SourceTensors of one model target, in part order (fused matrices have several).
    """
    from gguf import GGMLQuantizationType as QT

    types = {p.qtype for p in parts}
    if not types:
        return None
    if types <= {QT.Q4_0, QT.Q4_1}:
        q, d, zero = (torch.cat(x) for x in zip(*(p.int4() for p in parts)))
        offset = None if types == {QT.Q4_0} else zero  # Q4_0: w = d*(q-8), split_int4 gives zero 0
        return Grid(q.to(torch.int8) - 8, d, offset, 4, GROUP, "Q4_1/Q4_0 codes (exact)")
    if types == {QT.Q8_0}:
        q, d = (torch.cat(x) for x in zip(*(p.int8() for p in parts)))
        return split_int8(q, d)
    return None


def split_int8(q: torch.Tensor, d: torch.Tensor) -> Grid:
    """Q8_0 (q int8 [N, K], d [N, K/32]) as two exact 4-bit halves over the input repeated twice."""
    qi = q.to(torch.int16)
    hi = torch.div(qi, 16, rounding_mode="floor")  # -8..7
    lo = qi - 16 * hi  # 0..15
    codes = torch.cat([hi, lo - 8], dim=1).to(torch.int8)
    scale = torch.cat([16.0 * d, d], dim=1)
    offset = torch.cat([torch.zeros_like(d), 8.0 * d], dim=1)
    return Grid(codes, scale, offset, 4, GROUP, "Q8_0 codes as two 4-bit halves (exact)", repeat=2)


# ---- grids for weights that were not quantized (round to nearest) ----------------------------

def asym4_grid(w: torch.Tensor) -> Grid:
    """Asymmetric 4-bit per group of 32 (min/max), w [N, K] -> codes q - 8, scale, offset min + 8*scale."""
    g = w.float().unflatten(1, (-1, GROUP))
    lo, hi = g.amin(-1), g.amax(-1)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round((g - lo[..., None]) / s[..., None]), 0, 15)
    return Grid((q - 8).to(torch.int8).flatten(1), s, lo + 8 * s, 4, GROUP, "asymmetric 4-bit round-to-nearest")


def sym8_grid(w: torch.Tensor, group: int) -> Grid:
    """Symmetric 8-bit, one scale per `group` inputs (group = K: per output channel)."""
    g = w.float().unflatten(1, (-1, group))
    s = g.abs().amax(-1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.clamp(torch.round(g / s[..., None]), -127, 127)
    kind = "symmetric 8-bit per channel round-to-nearest" if group == w.shape[1] else \
        f"symmetric 8-bit per {group} round-to-nearest"
    return Grid(q.to(torch.int8).flatten(1), s, None, 8, group, kind)


def weight_grid(parts, w: torch.Tensor, max_bits: int) -> Grid:
    """The grid of one linear weight of at most `max_bits` bits per weight.

    The file's codes where they fit (Q4_x at 4 bits, Q8_0 at 8), else round to nearest: asymmetric
    4-bit groups at 4 bits, symmetric 8-bit per output channel at 8 (or where K is not a multiple of 32).
    """
    grid = source_grid(parts)
    if grid is not None and grid.bits * grid.repeat <= max_bits:
        return grid
    if max_bits == 4 and w.shape[1] % GROUP == 0:
        return asym4_grid(w)
    return sym8_grid(w, w.shape[1])


def embedding_grid(parts, w: torch.Tensor) -> Grid:
    """The embedding table's grid: the file's codes (int8 storage) where exact, else 8-bit groups."""
    from gguf import GGMLQuantizationType as QT

    types = {p.qtype for p in parts}
    if types == {QT.Q8_0}:
        q, d = (torch.cat(x) for x in zip(*(p.int8() for p in parts)))
        return Grid(q, d, None, 8, GROUP, "Q8_0 codes (exact)")
    grid = source_grid(parts) if types <= {QT.Q4_0, QT.Q4_1} else None
    if grid is not None:
        return grid
    return sym8_grid(w, GROUP if w.shape[1] % GROUP == 0 else w.shape[1])


# ---- modules -----------------------------------------------------------------------------------

def int8_grid_part(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the asymmetric per-token int8 grid XNNPACK picks for it ([1, B, T, K] -> same).

    The kernel's grid for a row spans [min(0, min x), max(0, max x)] in 255 steps of
    s = (max - min) / 255, with 0 on it: it is s * (integers). x_hi = s * round(x / s) takes the
    row's lowest and highest grid points at its own min and max (they are 255 steps apart), so the
    kernel, choosing its grid from x_hi, lands on the same one and represents x_hi exactly.
    Written with ops XNNPACK runs itself (max over dim 3 of a 4-D tensor, floor), so the
    partitioner keeps it in the quantized linear's delegate.
    """
    hi = torch.max(x, 3, keepdim=True).values.clamp(min=0)  # XNNPACK's max takes dim 2 or 3 (not -1)
    neg_lo = torch.max(-x, 3, keepdim=True).values.clamp(min=0)
    s = ((hi + neg_lo) * (1.0 / 255.0)).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.floor(x / s + 0.5) * s


def groupsum_weight(k: int, group: int) -> torch.Tensor:
    """[k / group, k] fp32: row g has ones on inputs g*group .. (g+1)*group - 1 (x @ it^T sums groups)."""
    return torch.eye(k // group).repeat_interleave(group, dim=1)


class GridLinear(nn.Module):
    """y = W x + b on XNNPACK's int8 x int4/int8 kernel: hi/lo activation rows, offsets in fp32.

    Args:
        grid: the weight.
        bias: [N] or None.
        groupsum: the shared [K / group, K] ones matrix (groupsum_weight), when grid has offsets.
    """

    def __init__(self, grid: Grid, bias: torch.Tensor | None, groupsum: nn.Parameter | None = None):
        from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
            IntxUnpackedToInt8Tensor,
        )

        super().__init__()
        N, K = grid.codes.shape
        self.repeat = grid.repeat
        scale = grid.scale.float()
        if grid.bits == 4:  # XNNPACK stores 4-bit group scales as bf16: round here, so eager == .pte
            scale = scale.to(torch.bfloat16).float()
        weight = IntxUnpackedToInt8Tensor(
            qdata=grid.codes.to(torch.int8).contiguous(), scale=scale.contiguous(),
            zero_point=torch.zeros(scale.shape, dtype=torch.int8), target_dtype=torch.int4 if grid.bits == 4
            else torch.int8, block_size=(1, grid.group), dtype=torch.float32,
            activation_quantization="int8_asym_per_token")
        self.core = nn.Linear(K, N, bias=False)
        self.core.weight = nn.Parameter(weight, requires_grad=False)
        self.groupsum = self.offset = None
        if grid.offset is not None:  # copies of a repeated input share their group sums
            o = grid.offset.float().unflatten(1, (grid.repeat, -1)).sum(1)  # [N, K / repeat / group]
            self.groupsum = nn.Linear(K // grid.repeat, o.shape[1], bias=False)
            self.groupsum.weight = groupsum
            self.offset = nn.Linear(o.shape[1], N, bias=False)
            self.offset.weight = nn.Parameter(o.contiguous(), requires_grad=False)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, T, K / repeat] fp32
        xr = torch.cat([x] * self.repeat, dim=-1) if self.repeat > 1 else x
        x4 = xr.unsqueeze(0)  # [1, B, T, K]
        hi = int8_grid_part(x4)
        y = self.core(torch.cat([hi, x4 - hi]))  # [2, B, T, N]: both rows in one kernel call
        y = y[0] + y[1]
        if self.offset is not None:
            y = y + self.offset(self.groupsum(x))
        if self.bias is not None:
            y = y + self.bias
        return y


class GridEmbedding(nn.Module):
    """Embedding rows from int8 codes: (codes * scale + offset) per group, gathered per token."""

    def __init__(self, grid: Grid):
        super().__init__()
        self.group = grid.group
        self.register_buffer("codes", grid.codes.to(torch.int8).contiguous())  # [V, D]
        self.register_buffer("scale", grid.scale.float().contiguous())  # [V, D / group]
        self.register_buffer("offset", None if grid.offset is None else grid.offset.float().contiguous())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [B, T] -> [B, T, D] fp32
        ids = tokens.flatten()
        rows = self.codes.index_select(0, ids).float().unflatten(-1, (-1, self.group))  # [BT, D/g, g]
        rows = rows * self.scale.index_select(0, ids)[..., None]
        if self.offset is not None:
            rows = rows + self.offset.index_select(0, ids)[..., None]
        return rows.flatten(1).unflatten(0, tokens.shape)


# ---- the model transform -----------------------------------------------------------------------

def _parts(src, target: str):
    return [s for _, s in sorted(src.tensors.get(target, []), key=lambda p: p[0])]


def quantize_model(model: nn.Module, src, quant: str) -> dict:
    """Swap every nn.Linear and the token embedding of edge-rt's Transformer for grid modules.

    Args:
        model: the Transformer built with dense fp32 weights from `src` (loading.weights.build_model).
        src: its ModelSource (the file's tensors say which weights keep their codes).
        quant: "int8" (weights of at most 8 bits) or "8da4w" (layers at most 4 bits, the output
            projection at most 8: 4 bits there cost ~16 points of top-1 on SmolLM2).
    Returns:
        Counts for the manifest: {"layers": n, "head": 1, "<grid kind>": n, "embedding": kind}.
    """
    from edge_rt.models.linear import swap_linear

    counts: dict = {"layers": 0, "head": 0}
    tied = "lm_head.weight" not in src.tensors
    sums: dict[int, nn.Parameter] = {}  # one groupsum matrix per input width, shared by all layers
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear):
            continue
        target = "embed.weight" if name == "lm_head" and tied else name + ".weight"
        head = name == "lm_head"
        grid = weight_grid(_parts(src, target), mod.weight.detach(), 8 if quant == "int8" or head else 4)
        k = mod.in_features
        if grid.offset is not None and k not in sums:
            sums[k] = nn.Parameter(groupsum_weight(k, grid.group), requires_grad=False)
        swap_linear(model, name, GridLinear(grid, mod.bias, sums.get(k) if grid.offset is not None else None))
        counts["head" if head else "layers"] += 1
        counts[grid.kind] = counts.get(grid.kind, 0) + 1
    grid = embedding_grid(_parts(src, "embed.weight"), model.embed.weight.detach())
    model.embed = GridEmbedding(grid)
    counts["embedding"] = grid.kind
    return counts
