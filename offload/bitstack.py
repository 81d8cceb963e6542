"""BitStack: weight matrices as stacks of ~1-bit residual blocks, loadable at any memory budget.

Math (BitStack, github.com/xinghaow99/BitStack; see PAPERS.md). A weight W [m, n] is first scaled
per input channel by activation statistics, W' = W * s (s_j: mean over calibration samples of the
L2 norm of input column j, + 1e-3); the layer then computes W' (x / s). From R_0 = W':

    S_i = sign(R_i) (0 -> +1);  |R_i| ~ U Sigma V^T (rank k);  u_i = U sqrt(Sigma), v_i = sqrt(Sigma) V^T
    R_{i+1} = R_i - S_i * (u_i v_i)

and block i = (S_i packed 8 per byte, MSB first, 1 = +1; u_i, v_i in fp16). With c blocks loaded,
W ~ (sum_{i<c} S_i * (u_i v_i)) / s. The residual is updated with the fp16-rounded factors, so
each block corrects exactly what the loaded blocks before it reconstruct.

Loaded, each term is rounded to an integer grid per input column (q_j, a power of two, fixed by
block 0; see grid_scale): acc = sum_{i<c} S_i * round((u_i v_i) / q) and W = acc * q / s. In fp32
those sums are exact, so a block can be added to or subtracted from a kept weight with the bits
of a fresh sum (live resize touches only the changed blocks); the grid step is about 2**-18 of
the column's largest block-0 value, far below the blocks' own error.

This file: the decomposition, block (de)serialization and `BitStackLinear`, the module that plugs
into a model with `edge_rt.models.linear.swap_linear`. Compression (calibration, ordering, the
store) is in offload/bitstack_compress.py; budgets, loading and live resize in
offload/bitstack_load.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCALE_EPS = 1e-3
SVD_OVERSAMPLE, SVD_NITER = 8, 4  # randomized SVD: extra subspace columns, power iterations

# The +-1 values of the 8 bits of every byte, MSB first: [256, 8] (the vectorized unpacking table).
_SIGN_TABLE = torch.tensor(
    np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(np.float32) * 2 - 1)


@dataclass
class Block:
    """One residual block of an m x n matrix: packed signs [m, n/8] uint8, u [m, k], v [k, n] fp16."""

    signs: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.signs, self.u, self.v))


def block_nbytes(m: int, n: int, k: int) -> int:
    """Bytes of one block of an m x n matrix at rank k (as stored and as held in memory)."""
    return m * (n // 8) + 2 * k * (m + n)


def pack_signs(r: torch.Tensor) -> torch.Tensor:
    """Signs of r [m, n] (0 counts as +1) -> [m, n/8] uint8, MSB first, 1 = +1."""
    return torch.from_numpy(np.packbits((r >= 0).numpy(), axis=1))


def unpack_signs(packed: torch.Tensor, n: int) -> torch.Tensor:
    """[m, n/8] uint8 -> [m, n] fp32 of +-1 (one table lookup, no per-bit loop)."""
    table = _SIGN_TABLE if packed.device.type == "cpu" else _SIGN_TABLE.to(packed.device)
    return table[packed.long()].reshape(packed.shape[0], -1)[:, :n]


def low_rank(a: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-k factors of a [m, n]: (U sqrt(S) [m, k], sqrt(S) V^T [k, n]) by randomized SVD.

    Seeded so that compressing the same weights twice gives the same bytes.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(a, q=min(k + SVD_OVERSAMPLE, *a.shape), niter=SVD_NITER)
    root = S[:k].sqrt()
    return U[:, :k] * root, (root[:, None] * V[:, :k].T).contiguous()


def decompose(w_scaled: torch.Tensor, iters: int, rank: int, seed: int = 0) -> list[Block]:
    """Residual sign x low-rank blocks of an (already activation-scaled) weight [m, n]."""
    m, n = w_scaled.shape
    if n % 8:
        raise ValueError(f"BitStack needs the input width to be a multiple of 8, got {n}")
    r = w_scaled.float().clone()
    blocks = []
    for i in range(iters):
        signs = pack_signs(r)
        u, v = low_rank(r.abs(), rank, seed + i)
        u, v = u.half(), v.half()
        r -= unpack_signs(signs, n) * (u.float() @ v.float())
        blocks.append(Block(signs, u, v))
    return blocks


def reconstruct(blocks: list[Block], n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i S_i * (u_i v_i) in fp32: [m, n], accumulated into `out` when given (zeros if no blocks)."""
    m = blocks[0].u.shape[0] if blocks else (out.shape[0] if out is not None else 0)
    w = torch.zeros(m, n) if out is None else out.zero_()
    for b in blocks:
        add_term(w, b)
    return w


def add_term(w: torch.Tensor, b: Block) -> torch.Tensor:
    """w [m, n] += S * (u v) in fp32, in place: the step `reconstruct` repeats (same bits)."""
    return w.addcmul_(unpack_signs(b.signs, w.shape[1]), b.u.float() @ b.v.float())


def block_to_bytes(b: Block) -> np.ndarray:
    """One block as one flat uint8 record: signs, then u, then v (fp16, little endian)."""
    return np.concatenate([b.signs.numpy().reshape(-1), b.u.numpy().view(np.uint8).reshape(-1),
                           b.v.numpy().view(np.uint8).reshape(-1)])


def block_from_bytes(raw: np.ndarray, m: int, n: int, k: int) -> Block:
    """Inverse of block_to_bytes (copies, so the record buffer may be reused)."""
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != block_nbytes(m, n, k):
        raise ValueError(f"block has {raw.size} bytes, expected {block_nbytes(m, n, k)}")
    a, b = m * (n // 8), m * (n // 8) + 2 * m * k
    signs = torch.from_numpy(raw[:a].reshape(m, n // 8).copy())
    u = torch.from_numpy(raw[a:b].copy().view(np.float16).reshape(m, k))
    v = torch.from_numpy(raw[b:].copy().view(np.float16).reshape(k, n))
    return Block(signs, u, v)


GRID_BITS = 24  # fp32 holds every integer below 2**24 exactly
GRID_HEADROOM = 64.0  # the grid leaves room for partial sums up to 64x block 0's largest magnitude


# The same table with each row's 8 signs as int8 packed into one int64 (memory order = bit order):
# one scalar gather per byte writes 8 signs at once, 3-4x faster than gathering rows of 8 floats.
_SIGN_TABLE64 = _SIGN_TABLE.to(torch.int8).contiguous().view(torch.int64).reshape(256)
_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def sign_table64(device: torch.device) -> torch.Tensor:
    """_SIGN_TABLE64 on `device` (cached per device)."""
    t = _SIGN_TABLES.get(device)
    if t is None:
        t = _SIGN_TABLES[device] = _SIGN_TABLE64.to(device)
    return t


def unpack_signs_into(packed: torch.Tensor, out: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
    """[m, n/8] uint8 -> [m, n] int8 of +-1, gathered into out (int64 [m n/8]); idx: int32 [m n/8]."""
    m, nb = packed.shape
    flat = packed.reshape(-1)
    idx = flat.to(torch.int32) if idx is None else idx.copy_(flat)
    torch.index_select(sign_table64(packed.device), 0, idx, out=out)
    return out.view(torch.int8).view(m, nb * 8)


def grid_scale(first: list[Block], n: int) -> torch.Tensor:
    """Per input column j, 1/q_j (a power of two) of the integer grid the kept sums live on.

    q_j = 2**(e_j - GRID_BITS) with 2**e_j >= GRID_HEADROOM * max over rows of |u_0 v_0|[:, j]
    (block 0 of every part: always loaded, so the grid is the same at every budget). Every term
    is rounded to the grid, so sums whose magnitude stays below 2**GRID_BITS grid steps are exact
    in fp32: adding and subtracting blocks in any order gives the same bits as a fresh sum.
    """
    bound = torch.zeros(n, device=first[0].u.device)
    for b in first:
        bound = torch.maximum(bound, (b.u.float() @ b.v.float()).abs().amax(0))
    bound = bound.clamp_min(float(bound.max()) * 2.0**-16 + 1e-30)  # no column's grid absurdly fine
    _, e = torch.frexp(bound * GRID_HEADROOM)
    return torch.ldexp(torch.ones_like(bound), GRID_BITS - e)


class TermScratch:
    """Flat buffers, shared by every layer of a model, for one block's term: the rank-k product
    (fp32), the unpacked signs (int8, held as int64 words) and the sign-table indices (int32),
    sized for the largest m x n."""

    def __init__(self):
        self.prod = self.signs = self.idx = None

    def get(self, m: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.prod is None or self.prod.numel() < m * n or self.prod.device != torch.device(device):
            self.reserve(m * n, device)
        return self.prod[: m * n].view(m, n), self.signs[: m * n // 8], self.idx[: m * n // 8]

    def reserve(self, numel: int, device) -> None:
        self.prod = torch.empty(numel, device=device)
        self.signs = torch.empty(numel // 8, dtype=torch.int64, device=device)
        self.idx = torch.empty(numel // 8, dtype=torch.int32, device=device)

    @staticmethod
    def nbytes_for(numel: int) -> int:
        return numel * 4 + numel // 8 * (8 + 4)

    def nbytes(self) -> int:
        return 0 if self.prod is None else self.nbytes_for(self.prod.numel())


def accumulate(acc: torch.Tensor, blk: Block, inv_q: torch.Tensor, sign: float = 1.0,
               scratch: TermScratch | None = None, bound: bool = False) -> float:
    """acc [m, n] += sign * S * round((u v) / q): one block's term in grid units, in place.

    (v * inv_q) scales each column by a power of two, so u @ (v * inv_q) is exactly (u @ v) / q
    rounded as fp32 rounds u @ v; round() puts it on the integer grid; the +-1 signs flip it.
    Returns (bound=True) an upper bound of the term's magnitude in grid units,
    sum_t max_r |u_rt| max_j |v'_tj| + 1/2, from the factors alone (else 0).
    """
    m, n = acc.shape
    if scratch is None:
        scratch = TermScratch()
    prod, signs, idx = scratch.get(m, n, acc.device)
    u, v = blk.u.float(), blk.v.float() * inv_q
    torch.mm(u, v, out=prod).round_()
    prod.mul_(unpack_signs_into(blk.signs, signs, idx))  # int8 +-1: an exact sign flip
    acc.add_(prod) if sign > 0 else acc.sub_(prod)
    return float((u.abs().amax(0) * v.abs().amax(1)).sum()) + 0.5 if bound else 0.0


def in_range(acc: torch.Tensor) -> bool:
    """True when every grid sum in acc is below 2**GRID_BITS (so it, and any sum before it, is exact)."""
    lo, hi = torch.aminmax(acc)
    return max(-float(lo), float(hi)) < 2.0**GRID_BITS


SHARED_SCRATCH = TermScratch()


class BitStackLinear(nn.Module):
    """A linear layer whose weight is a stack of BitStack blocks, possibly fused from parts.

    The weight is the row-wise concatenation of its parts (e.g. q, k, v of a fused wqkv); each part
    holds its own blocks. The weight is held as integer sums on a per-column grid (grid_scale):
    acc = sum_i S_i * round((u_i v_i) / q) in fp32, so W = acc * q / s and the layer computes
    F.linear(x * (q / s), acc) in fp32 (the result cast to the compute dtype). Two ways to run
    (same bits, so the same outputs):
    - keep=True: acc is kept (4 bytes per weight). Adding a block adds its term; dropping one
      subtracts it, exact on the grid (a part whose sums ever left the grid's range is rebuilt
      from its blocks instead), so a resized layer has the bits of a fresh load;
    - keep=False: only blocks are held, and every forward rebuilds acc (vectorized sign unpacking
      into a preallocated buffer plus the rank-k product of each block), then drops it.
    """

    def __init__(self, part_rows: list[int], in_features: int, scale: torch.Tensor,
                 dtype: torch.dtype, keep: bool, bias: torch.Tensor | None = None):
        super().__init__()
        self.part_rows, self.in_features = list(part_rows), in_features
        self.row0 = [sum(part_rows[:p]) for p in range(len(part_rows))]
        self.out_features = sum(part_rows)
        self.dtype, self.keep = dtype, keep
        self.register_buffer("scale", scale.float().clone())  # [in]
        self.register_buffer("inv_q", torch.ones_like(self.scale))  # [in] 1/q, powers of two
        self.register_buffer("in_factor", 1 / self.scale)  # [in] q / s
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.parts: list[list[Block]] = [[] for _ in part_rows]
        self.exact = [True] * len(part_rows)  # every grid sum of the part so far stayed in range
        self.bounds: list[list[float]] = [[] for _ in part_rows]  # keep=True: per block, its term bound
        self.weight_cache: torch.Tensor | None = None  # keep=True: acc [out, in] fp32
        self.grid_ready = False
        self.scratch = SHARED_SCRATCH  # replaced by the loader with one scratch per model

    @property
    def counts(self) -> list[int]:
        return [len(p) for p in self.parts]

    def set_blocks(self, part: int, blocks: list[Block]) -> None:
        """Replace the blocks of one part (a prefix 0..c-1 of its stack); refresh() before use."""
        self.parts[part] = list(blocks)
        self.weight_cache, self.grid_ready = None, False

    def push(self, part: int, blk: Block, update: bool = True) -> None:
        """Append the next block of a part; keep=True adds its term to the kept weight."""
        self.parts[part].append(blk)
        if self.weight_cache is None:
            return
        if not update:  # stale until refresh()
            self.weight_cache = None
            return
        rows = self._rows(part)
        self._track(part, rows, accumulate(rows, blk, self.inv_q, 1.0, self.scratch, bound=True))

    def pop(self, part: int, update: bool = True) -> bool:
        """Drop the last block of a part; keep=True subtracts its term (exact on the grid).

        Returns False when the part's sums had left the grid's range: the caller then rebuilds
        the part (rebuild_part) once its blocks are final.
        """
        blk = self.parts[part].pop()
        if self.weight_cache is None:
            return True
        if not update:  # stale until refresh()
            self.weight_cache = None
            return True
        self.bounds[part].pop()
        if not self.exact[part]:
            return False
        accumulate(self._rows(part), blk, self.inv_q, -1.0, self.scratch)
        return True

    def _track(self, part: int, rows: torch.Tensor, term_bound: float) -> None:
        # after adding a term: the part stays exact if the sum of its term bounds is in range
        # (then every partial sum is), else if the sums, checked, are
        self.bounds[part].append(term_bound)
        if sum(self.bounds[part]) >= 2.0**GRID_BITS:
            self.exact[part] = self.exact[part] and in_range(rows)

    def rebuild_part(self, part: int) -> None:
        """Recompute one part's kept rows from its blocks, summed in order (as a fresh load)."""
        if self.weight_cache is not None:
            self._sum_into(self._rows(part), part)

    def refresh(self) -> None:
        """Fix the grid from the parts' first blocks and (keep=True) rebuild the kept weight."""
        self._set_grid()
        self.weight_cache = self.build_weight() if self.keep else None

    def _set_grid(self) -> None:
        if any(not p for p in self.parts):
            raise ValueError("every part of a BitStack layer needs its first block")
        self.inv_q.copy_(grid_scale([p[0] for p in self.parts], self.in_features))
        self.in_factor.copy_(1 / (self.inv_q * self.scale))
        self.grid_ready = True

    def _rows(self, part: int) -> torch.Tensor:
        return self.weight_cache[self.row0[part] : self.row0[part] + self.part_rows[part]]

    def _sum_into(self, out: torch.Tensor, part: int) -> None:
        # out [m, in] <- sum of the part's grid terms, in block order; keep=True tracks exactness
        out.zero_()
        self.exact[part], self.bounds[part] = True, []
        for b in self.parts[part]:
            tb = accumulate(out, b, self.inv_q, 1.0, self.scratch, bound=self.keep)
            if self.keep:
                self._track(part, out, tb)

    def build_weight(self) -> torch.Tensor:
        # -> acc [out, in] fp32 on the grid: every part summed block by block into one buffer
        if not self.grid_ready:
            self._set_grid()
        w = torch.empty(self.out_features, self.in_features, device=self.scale.device)
        for p in range(len(self.parts)):
            self._sum_into(w[self.row0[p] : self.row0[p] + self.part_rows[p]], p)
        return w

    def block_bytes(self) -> int:
        return sum(b.nbytes for p in self.parts for b in p)

    def cache_bytes(self) -> int:
        w = self.weight_cache
        return 0 if w is None else w.numel() * w.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out] in the compute dtype; the product runs in fp32 on the grid sums
        w = self.weight_cache if self.weight_cache is not None else self.build_weight()
        y = F.linear(x * self.in_factor, w).to(self.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, parts={self.part_rows}, blocks={self.counts}, keep={self.keep}"
