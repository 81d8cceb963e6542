"""`edge-rt compress --format bitstack`: calibrate, decompose, order the blocks, write the store.

Steps:
1. Calibration text: Python's pydoc topics (offline everywhere), split by topic into a calibration
   part and a held-out part (every HELDOUT_EVERY-th topic) used only for evaluation.
2. Activation statistics on the dense, dequantized fp32 model: per linear input channel j,
   s_j = mean over calibration windows of ||X[:, j]||_2 + 1e-3; and the mean squared norm of the
   residual stream entering each layer (for the importance proxy).
3. Decompose every weight matrix (each part of a fused projection on its own: q, k, v, gate, up)
   into `iters` blocks of sign bits + rank-`rank` fp16 factors (offload/bitstack.py).
4. Order: first block of every matrix (the minimum model), then the rest with block i+1 of a
   matrix never before block i. Two choices (docs/BITSTACK.md):
   - importance, the gain of block b of matrix j, measured with every matrix at b blocks:
     "taylor" (default): -<dL/dW_j, block b's term> per byte, one backward pass per level;
     "loss" (the paper's): the calibration cross-entropy drop when matrix j alone gets block b,
     per byte, one forward per matrix per level, each rerunning only the layers from matrix j's
     on (PrefixLoss keeps the hidden states entering each layer; bit-identical to a full forward);
     "kl": the same with KL(dense model || model) instead of the cross-entropy;
     "proxy": the drop of activation-scaled residual energy / the layer's residual-stream energy
     / bytes (no forward at all);
   - merge: "levels" (default, the paper's): level by level, each level sorted by gain; or
     "greedy": by gain per byte across levels (a heap holds each matrix's next block).
   `reorder` writes an existing store's blocks in a new order (no recompression).
5. Store (offload/store.py, kind "bitstack"): base records (int8 embedding codes and scales,
   norms, input scales, biases) then the blocks in order; meta["bitstack"] holds the matrix table,
   the order, each block's bytes and the cumulative size index.
"""

from __future__ import annotations

import copy
import heapq
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from edge_rt.errors import InvalidOptionError
from offload.bitstack import (SCALE_EPS, Block, add_term, block_from_bytes, block_nbytes, block_to_bytes, decompose,
                              reconstruct)

FORMAT_VERSION = 1
HELDOUT_EVERY = 5  # every 5th pydoc topic (sorted by name) is held out for evaluation
CALIB_WINDOWS, CALIB_LEN = 16, 256  # calibration: windows of tokens from the calibration text
TAYLOR_WINDOWS = 4  # importance="taylor": the first 4 calibration windows (1,020 predicted tokens)
# importance="loss"/"kl": the calibration loss is measured on 4 windows of 96 tokens, spread over the
# calibration text (380 predicted tokens: 56 min of one core for SmolLM2-135M, docs/BENCHMARKS.md)
LOSS_WINDOWS, LOSS_LEN = 4, 96
EMBED_GROUP = 32  # int8 embedding codes, one fp32 scale per 32 (GGUF Q8_0 layout)
IMPORTANCE = ("proxy", "taylor", "loss", "kl")
# How gains become a load order: "levels", the paper's level by level (order_by_levels), or
# "greedy" by gain per byte across levels (order_by_proxy). Both keep block i+1 after block i.
# "levels" gives the far better held-out curve with every importance measured (docs/BENCHMARKS.md).
MERGES = ("levels", "greedy")
DEFAULT_IMPORTANCE = "taylor"  # as good a curve as the measured loss, in minutes (docs/BENCHMARKS.md)
DEFAULT_MERGE = "levels"
# Linear modules of a llama block that are decomposed (model target names, edge_rt/models/llama.py).
LINEARS = ("attn.wqkv", "attn.wo", "ffn.w13", "ffn.w2")

Progress = Callable[[str, int, int], None]  # progress(stage, done, total)


@dataclass(frozen=True)
class MatrixSpec:
    """One decomposed matrix: part `part` of linear module `module`, rows x cols."""

    module: str
    part: int
    rows: int
    cols: int

    @property
    def key(self) -> str:
        return f"{self.module}.{self.part}"

    @property
    def layer(self) -> int:
        """The decoder layer the matrix belongs to (module names are "layers.<n>.<linear>")."""
        return int(self.module.split(".")[1])

    def to_json(self) -> dict:
        return {"module": self.module, "part": self.part, "rows": self.rows, "cols": self.cols}


def block_name(spec: MatrixSpec, i: int) -> str:
    return f"{spec.key}.block{i}"


# --- calibration text ---------------------------------------------------------------------


def calibration_split() -> tuple[str, str]:
    """(calibration text, held-out text) from Python's pydoc topics, split by topic."""
    import pydoc_data.topics as t

    keys = sorted(t.topics)
    calib = [t.topics[k] for i, k in enumerate(keys) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    held = [t.topics[k] for i, k in enumerate(keys) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return "\n\n".join(calib), "\n\n".join(held)


def loss_windows(tok, n: int = LOSS_WINDOWS, length: int = LOSS_LEN) -> list[list[int]]:
    """The windows importance="loss" measures on: n windows of `length` spread over the calibration text."""
    return token_windows(tok.encode(calibration_split()[0]), n, length)


def token_windows(ids: list[int], n: int, length: int) -> list[list[int]]:
    """Up to n windows of `length` tokens spread evenly over ids."""
    if len(ids) < length:
        return [ids]
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    return [ids[s : s + length] for s in dict.fromkeys(starts.tolist())]


# --- the source model -----------------------------------------------------------------------


def matrices_of(src) -> list[MatrixSpec]:
    """Every weight matrix to decompose, layer by layer, in model order."""
    specs = []
    for layer in range(src.args.num_hidden_layers):
        for lin in LINEARS:
            module = f"layers.{layer}.{lin}"
            parts = sorted(src.tensors[module + ".weight"], key=lambda p: p[0])
            for i, (_, t) in enumerate(parts):
                specs.append(MatrixSpec(module, i, int(t.shape[0]), int(t.shape[1])))
    return specs


def dense_model(src, n_ctx: int):
    """The source model dequantized to fp32 on CPU: the reference the blocks approximate."""
    from edge_rt.loading.weights import build_model

    return build_model(src.args, src.tensors, torch.float32, torch.device("cpu"), n_ctx, quantized=False)


def part_weight(src, spec: MatrixSpec) -> torch.Tensor:
    """The dequantized fp32 weight of one matrix: [rows, cols]."""
    parts = sorted(src.tensors[spec.module + ".weight"], key=lambda p: p[0])
    return parts[spec.part][1].dense().float()


@torch.inference_mode()
def forward_loss(model, windows: list[list[int]]) -> float:
    """Mean next-token cross-entropy of the model over token windows (fresh cache per window)."""
    from edge_rt.kv.cache import make_caches

    a = model.args
    nll, count = 0.0, 0
    for w in windows:
        caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, len(w), torch.float32, "cpu")
        ids = torch.tensor(w)[None]
        logits = model(ids, caches, 0)[0, :-1]
        nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += len(w) - 1
    return nll / count


@torch.inference_mode()
def input_stats(model, windows: list[list[int]]) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Activation scales s per linear module ([in]) and the residual energy entering each layer."""
    from edge_rt.kv.cache import make_caches

    a = model.args
    norms: dict[str, list[torch.Tensor]] = {}
    resid = [0.0] * a.num_hidden_layers
    hooks = []
    for layer in range(a.num_hidden_layers):
        blk = model.layers[layer]
        for lin in LINEARS:
            name = f"layers.{layer}.{lin}"

            def grab(mod, inp, name=name):
                x = inp[0].float().reshape(-1, inp[0].shape[-1])  # [T, in]
                norms.setdefault(name, []).append(x.norm(dim=0))

            hooks.append(blk.get_submodule(lin).register_forward_pre_hook(grab))

        def energy(mod, inp, layer=layer):
            resid[layer] += inp[0].float().pow(2).sum(-1).mean().item() / len(windows)

        hooks.append(blk.register_forward_pre_hook(energy))
    try:
        for w in windows:
            caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, len(w), torch.float32, "cpu")
            model(torch.tensor(w)[None], caches, 0, last_only=True)
    finally:
        for h in hooks:
            h.remove()
    scales = {name: torch.stack(v).mean(0) + SCALE_EPS for name, v in norms.items()}
    return scales, resid


def embedding_int8(src) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding as int8 codes [V, D] and fp32 scales [V, D/32]: the file's own Q8_0 codes when it
    has them, else round-to-nearest with one scale per 32 values (Q8_0's rule)."""
    (_, t), = src.tensors["embed.weight"]
    got = t.int8()
    if got is not None:
        q, d = got
        return q.to(torch.int8), d.float()
    w = t.dense().float()
    g = w.reshape(w.shape[0], -1, EMBED_GROUP)
    d = g.abs().amax(-1) / 127.0
    q = torch.where(d[..., None] > 0, g / d[..., None].clamp_min(1e-30), torch.zeros_like(g)).round()
    return q.to(torch.int8).reshape(w.shape), d


# --- ordering -------------------------------------------------------------------------------


def order_by_proxy(specs: list[MatrixSpec], gains: list[list[float]], min_level: int = 1) -> list[tuple[int, int]]:
    """Blocks (matrix, i) in load order: all blocks below min_level first (model order), then the
    rest by gain per byte, greedily; a heap holds each matrix's next block, so i+1 never precedes i.

    gains[j][i]: importance of block i of matrix j (larger = load earlier).
    """
    order = [(j, i) for i in range(min_level) for j in range(len(specs))]
    heap = []
    for j, g in enumerate(gains):
        if len(g) > min_level:
            heapq.heappush(heap, (-g[min_level], j, min_level))
    while heap:
        _, j, i = heapq.heappop(heap)
        order.append((j, i))
        if i + 1 < len(gains[j]):
            heapq.heappush(heap, (-gains[j][i + 1], j, i + 1))
    return order


def proxy_gains(specs, energies: list[list[float]], resid: list[float], rank: int) -> list[list[float]]:
    """gain[j][i] = (||R_i||^2 - ||R_{i+1}||^2) / residual energy of the layer / block bytes.

    energies[j][i] = ||R_i||^2 of matrix j in the activation-scaled space (R_0 = W * s).
    """
    gains = []
    for spec, e in zip(specs, energies):
        layer = int(spec.module.split(".")[1])
        nb = block_nbytes(spec.rows, spec.cols, rank)
        gains.append([(e[i] - e[i + 1]) / max(resid[layer], 1e-12) / nb for i in range(len(e) - 1)])
    return gains


class DenseProbe:
    """The fp32 dense model with each matrix set to a chosen number of its blocks (measured loss).

    Each matrix's unscaled sum of its first counts[j] blocks is kept, built term by term from zero
    (the bits `reconstruct` gives), so one block more costs one term.
    """

    def __init__(self, model, specs, blocks, scales):
        self.model, self.specs, self.blocks, self.scales = model, specs, blocks, scales
        self.offsets = {}
        row = {}
        for j, s in enumerate(specs):
            self.offsets[j] = row.get(s.module, 0)
            row[s.module] = self.offsets[j] + s.rows
        self.counts = [0] * len(specs)
        self.sums: list[torch.Tensor | None] = [None] * len(specs)  # [rows, cols] fp32, unscaled

    def _rows(self, j: int) -> torch.Tensor:
        s = self.specs[j]
        return self.model.get_submodule(s.module).weight[self.offsets[j] : self.offsets[j] + s.rows]

    @torch.no_grad()
    def set(self, j: int, count: int) -> None:
        s = self.specs[j]
        if self.sums[j] is None or count < self.counts[j]:
            self.sums[j], self.counts[j] = torch.zeros(s.rows, s.cols), 0
        for i in range(self.counts[j], count):
            add_term(self.sums[j], self.blocks[j][i])
        self.counts[j] = count
        self._rows(j).copy_(self.sums[j] / self.scales[s.module])

    @contextmanager
    def trial(self, j: int):
        """Inside the `with`: matrix j with its next block added (as set(j, counts[j] + 1) would
        give, bit for bit); after it, the matrix as it was."""
        s = self.specs[j]
        with torch.no_grad():
            rows = self._rows(j)
            saved = rows.clone()
            rows.copy_(add_term(self.sums[j].clone(), self.blocks[j][self.counts[j]]) / self.scales[s.module])
        try:
            yield
        finally:
            with torch.no_grad():
                rows.copy_(saved)


@torch.inference_mode()
def window_losses(model, window: list[int], first: int = 0, state: torch.Tensor | None = None,
                  keep: list[torch.Tensor] | None = None, ref: KLRef | None = None) -> tuple[float, float]:
    """(summed next-token cross-entropy, summed KL(reference || model)) of one window (fresh cache).

    first > 0: layers before `first` are skipped and layer `first` gets `state` (the hidden state
    that entered it in an earlier run) as its input. keep: receives the input of every layer.
    ref: the reference's distribution at the window's positions (kl_reference); without it the
    KL is 0.0.
    """
    from edge_rt.kv.cache import make_caches

    a = model.args
    caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, len(window), torch.float32, "cpu")
    hooks = []
    if keep is not None:
        hooks += [layer.register_forward_pre_hook(lambda mod, args: keep.append(args[0])) for layer in model.layers]
    if first:
        hooks.append(model.layers[first].register_forward_pre_hook(lambda mod, args: (state, *args[1:])))
    try:
        ids = torch.tensor(window)[None]
        logits = model(ids, caches, 0, skip=frozenset(range(first)))[0, :-1]  # [T - 1, V]
    finally:
        for h in hooks:
            h.remove()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    if ref is None:
        return nll, 0.0
    return nll, ref.plogp - torch.sum(ref.p * torch.log_softmax(logits, -1)).item()


@dataclass
class KLRef:
    """A reference distribution over one window's positions: p [T - 1, V] and sum(p log p)."""

    p: torch.Tensor
    plogp: float


@torch.inference_mode()
def kl_reference(model, window: list[int]) -> KLRef:
    """A model's next-token distribution at a window's positions, as the reference of a KL."""
    from edge_rt.kv.cache import make_caches

    a = model.args
    caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, len(window), torch.float32, "cpu")
    logp = torch.log_softmax(model(torch.tensor(window)[None], caches, 0)[0, :-1], -1)
    p = logp.exp()
    return KLRef(p, torch.sum(p * logp).item())


class PrefixLoss:
    """Calibration loss of a model changed in one layer at a time, rerunning only what changed.

    rebase() runs every window through the model and keeps the hidden state entering each layer
    (layers x windows x [1, T, D] fp32); run(first) then reruns layers first.. and the head from
    the kept states. While the layers before `first` are as they were at rebase(), the losses
    equal a full forward's bit for bit: the same modules run on the same inputs (tested).
    With a reference distribution per window (kl_reference) it also gives KL(reference || model).
    """

    def __init__(self, model, windows: list[list[int]], refs: list[KLRef] | None = None):
        self.model, self.windows = model, windows
        self.ref = refs or [None] * len(windows)
        self.tokens = sum(len(w) - 1 for w in windows)  # predicted tokens
        self.states: list[list[torch.Tensor]] = []
        self.base: list[tuple[float, float]] = []

    def rebase(self) -> float:
        """Run the model as it is now; keep the states and per-window losses; return its mean loss."""
        self.states, self.base = [], []
        for w, r in zip(self.windows, self.ref):
            keep: list[torch.Tensor] = []
            self.base.append(window_losses(self.model, w, keep=keep, ref=r))
            self.states.append(keep)
        return self.mean(self.base)

    def run(self, first: int) -> list[tuple[float, float]]:
        """Per window (summed nll, summed KL) with the layers from `first` on as they are now."""
        return [window_losses(self.model, w, first, st[first], ref=r)
                for w, st, r in zip(self.windows, self.states, self.ref)]

    def mean(self, losses: list[tuple[float, float]]) -> float:
        """Mean cross-entropy per predicted token (forward_loss's sum, in the same order)."""
        return sum(nll for nll, _ in losses) / self.tokens

    def mean_kl(self, losses: list[tuple[float, float]]) -> float:
        """Mean KL(reference || model) per predicted token."""
        return sum(kl for _, kl in losses) / self.tokens


def loss_gains(probe: DenseProbe, windows, levels: int, rank: int, progress: Progress | None = None,
               matrices: list[int] | None = None, at_levels: list[int] | None = None,
               record: dict | None = None, refs: list[KLRef] | None = None, kl: bool = False) -> list[list[float]]:
    """Measured gains, level by level (the paper's): with every matrix at b blocks,
    gain[j][b] = (loss with all at b) - (loss with j at b + 1), per byte of the block. Level 0 is
    not measured (the minimum model holds every first block; gain inf). The loss is the mean
    next-token cross-entropy of the windows, or with kl=True the mean KL(reference || model)
    at their positions (refs: kl_reference of the reference model, one per window).

    The loss of each trial reruns only the layers from matrix j's on (PrefixLoss): levels - 1
    full forwards plus, per matrix and level, a forward of the layers from its own on.
    matrices, at_levels: measure only these (the others' gains stay 0; for samples).
    record, when given, gets "base_loss" [level] and "window_deltas" [level][matrix][window]
    (summed nll drop of each window, for reliability checks; None where not measured); with
    refs (kl_reference of a reference model, per window) also "base_kl" and "window_kl_deltas".
    """
    specs = probe.specs
    if kl and refs is None:
        raise ValueError("kl=True needs the reference distributions (refs)")
    todo = list(range(len(specs))) if matrices is None else matrices
    gains = [[math.inf] + [0.0] * (levels - 1) for _ in specs]
    for j in range(len(specs)):
        probe.set(j, 1)
    pl = PrefixLoss(probe.model, windows, refs)
    if record is not None:
        record.update(base_loss=[None] * levels, window_deltas=[None] * levels, tokens=pl.tokens)
        if refs is not None:
            record.update(base_kl=[None] * levels, window_kl_deltas=[None] * levels)
    for b in range(1, levels):
        if at_levels is not None and b not in at_levels:
            for j in range(len(specs)):
                probe.set(j, b + 1)
            continue
        base = pl.rebase()
        base_kl = pl.mean_kl(pl.base)
        deltas, kl_deltas = [], []
        for n, j in enumerate(todo):
            with probe.trial(j):
                got = pl.run(specs[j].layer)
            drop = base_kl - pl.mean_kl(got) if kl else base - pl.mean(got)
            gains[j][b] = drop / block_nbytes(specs[j].rows, specs[j].cols, rank)
            deltas.append([b0[0] - b1[0] for b0, b1 in zip(pl.base, got)])
            kl_deltas.append([b0[1] - b1[1] for b0, b1 in zip(pl.base, got)])
            if progress:
                progress(f"importance level {b + 1}", n + 1, len(todo))
        if record is not None:
            record["base_loss"][b], record["window_deltas"][b] = base, deltas
            if refs is not None:
                record["base_kl"][b] = base_kl
                record["window_kl_deltas"][b] = kl_deltas
        for j in range(len(specs)):
            probe.set(j, b + 1)
    return gains


def taylor_gains(probe: DenseProbe, windows, levels: int, rank: int, progress: Progress | None = None) -> list[list[float]]:
    """First-order loss estimate, level by level: with every matrix at b blocks, one backward pass
    gives dL/dW for all matrices; block b of matrix j is worth -<dL/dW_j, its term / s> per byte.
    One forward and backward per level instead of one forward per matrix per level."""
    specs = probe.specs
    gains = [[math.inf] + [0.0] * (levels - 1) for _ in specs]
    for j in range(len(specs)):
        probe.set(j, 1)
    for b in range(1, levels):
        for j, g in enumerate(taylor_level(probe, windows, b, rank)):
            gains[j][b] = g
        for j in range(len(specs)):
            probe.set(j, b + 1)
        if progress:
            progress("importance (taylor)", b, levels - 1)
    return gains


def taylor_level(probe: DenseProbe, windows, b: int, rank: int) -> list[float]:
    """Per matrix, -<dL/dW, block b's term> per byte, with the probe's model at b blocks everywhere."""
    from edge_rt.kv.cache import make_caches

    specs, model = probe.specs, probe.model
    a = model.args
    weights = {s.module: model.get_submodule(s.module).weight for s in specs}
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    try:
        for win in windows:
            caches = make_caches(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, len(win), torch.float32, "cpu")
            ids = torch.tensor(win)[None]
            loss = torch.nn.functional.cross_entropy(model(ids, caches, 0)[0, :-1], ids[0, 1:])
            (loss / len(windows)).backward()
        out = []
        for j, s in enumerate(specs):
            g = weights[s.module].grad[probe.offsets[j] : probe.offsets[j] + s.rows]
            term = reconstruct(probe.blocks[j][b : b + 1], s.cols) / probe.scales[s.module]
            out.append(-(g * term).sum().item() / block_nbytes(s.rows, s.cols, rank))
        return out
    finally:
        for w in weights.values():
            w.requires_grad_(False)
            w.grad = None


def order_by_levels(gains: list[list[float]], levels: int) -> list[tuple[int, int]]:
    """The paper's order: level by level, each level sorted by gain (descending)."""
    order = [(j, 0) for j in range(len(gains))]
    for b in range(1, levels):
        order += [(j, b) for j in sorted(range(len(gains)), key=lambda j: -gains[j][b])]
    return order


def order_blocks(gains: list[list[float]], levels: int, merge: str) -> list[tuple[int, int]]:
    """Load order of every block from gains[j][i] (larger = earlier) by a merge rule of MERGES."""
    if merge == "greedy":
        return order_by_proxy([None] * len(gains), gains)
    if merge == "levels":
        return order_by_levels(gains, levels)
    raise InvalidOptionError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")


# --- compress -------------------------------------------------------------------------------


def compress(model: str | os.PathLike | None, out: str | os.PathLike, *, iters: int = 16, rank: int = 16,
             importance: str = DEFAULT_IMPORTANCE, merge: str | None = None, calib_windows: int = CALIB_WINDOWS,
             calib_len: int = CALIB_LEN, progress: Progress | None = None) -> dict:
    """Compress a model into a BitStack store.

    Args:
        model: GGUF file or HF folder (None: the default model).
        out: store path to write (atomically).
        iters: blocks per matrix (1..64).
        rank: rank of each block's magnitude factors (1..256).
        importance: how much each block lowers the loss (IMPORTANCE): "taylor" (default: first-order
            estimate from one backward pass per level), "loss" (the paper's: measured calibration
            cross-entropy, per matrix and level a forward of the layers from the matrix's on; about
            an hour of one core for SmolLM2-135M), "kl" (measured like "loss", KL to the dense
            model instead of the cross-entropy) or "proxy" (weight-space residual energy, no forward).
        merge: "levels" (the paper's: level by level, each level sorted by gain) or "greedy"
            (gain per byte across levels); None: DEFAULT_MERGE ("levels").
        calib_windows, calib_len: calibration windows and their length in tokens (activation
            scales; "loss" measures on LOSS_WINDOWS windows of LOSS_LEN tokens).
        progress: progress(stage, done, total).
    Returns:
        A summary dict: path, matrices, blocks, iters, rank, importance, merge, blocks_bytes (all
        blocks), min_blocks_bytes (the first block of every matrix), decompose_s, importance_s,
        total_s, file_bytes.
    """
    from edge_rt.api import _tokenizer_for, open_model
    from offload.store import StoreWriter, model_meta

    if not isinstance(iters, int) or not 1 <= iters <= 64:
        raise InvalidOptionError(f"iters must be an integer in [1, 64], got {iters!r}")
    if not isinstance(rank, int) or not 1 <= rank <= 256:
        raise InvalidOptionError(f"rank must be an integer in [1, 256], got {rank!r}")
    if importance not in IMPORTANCE:
        raise InvalidOptionError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    merge = DEFAULT_MERGE if merge is None else merge
    if merge not in MERGES:
        raise InvalidOptionError(f"merge must be one of {', '.join(MERGES)}, got {merge!r}")
    t0 = time.perf_counter()
    src = open_model(model)
    tok = _tokenizer_for(src)
    calib_text, _ = calibration_split()
    windows = token_windows(tok.encode(calib_text), calib_windows, calib_len)
    ref = dense_model(src, max(calib_len, LOSS_LEN, 16))
    scales, resid = input_stats(ref, windows)
    specs = matrices_of(src)
    blocks, energies = [], []
    for j, spec in enumerate(specs):
        w = part_weight(src, spec) * scales[spec.module]
        bl = decompose(w, iters, rank, seed=j)
        blocks.append(bl)
        energies.append(_residual_energies(w, bl))
        if progress:
            progress("decompose", j + 1, len(specs))
    t_dec = time.perf_counter() - t0
    if importance == "proxy":
        gains, used = proxy_gains(specs, energies, resid, rank), windows
    elif importance == "taylor":
        used = windows[:TAYLOR_WINDOWS]
        gains = taylor_gains(DenseProbe(ref, specs, blocks, scales), used, iters, rank, progress)
    else:  # measured: "loss" (cross-entropy) or "kl" (to the dense model, measured before the probe changes it)
        used = loss_windows(tok)
        refs = [kl_reference(ref, w) for w in used] if importance == "kl" else None
        gains = loss_gains(DenseProbe(ref, specs, blocks, scales), used, iters, rank, progress, refs=refs,
                           kl=importance == "kl")
    order = order_blocks(gains, iters, merge)
    t_imp = time.perf_counter() - t0 - t_dec
    meta = {"model": model_meta(src), "bitstack": _bitstack_meta(specs, order, iters, rank, importance, merge,
                                                                 calib_windows, calib_len, src)}
    meta["bitstack"]["importance_windows"] = {"windows": len(used), "tokens": max(len(w) for w in used)}
    with StoreWriter(out, "bitstack", meta) as wr:
        _write_base(wr, src, ref, scales)
        for n, (j, i) in enumerate(order):
            wr.add(block_name(specs[j], i), block_to_bytes(blocks[j][i]), meta={"m": j, "i": i})
            if progress and ((n + 1) % 64 == 0 or n + 1 == len(order)):
                progress("write", n + 1, len(order))
    bs = meta["bitstack"]
    return {"path": str(out), "matrices": len(specs), "blocks": len(order), "iters": iters, "rank": rank,
            "importance": importance, "merge": merge, "blocks_bytes": bs["cum_bytes"][-1],
            "min_blocks_bytes": bs["cum_bytes"][bs["min_blocks"] - 1], "decompose_s": t_dec,
            "importance_s": t_imp, "total_s": time.perf_counter() - t0, "file_bytes": os.path.getsize(out)}


def _residual_energies(w: torch.Tensor, blocks: list[Block]) -> list[float]:
    """||R_i||^2 for i = 0..len(blocks): the scaled residual energy after i blocks."""
    r = w.float().clone()
    out = [r.pow(2).sum().item()]
    for b in blocks:
        r -= reconstruct([b], w.shape[1])
        out.append(r.pow(2).sum().item())
    return out


def _bitstack_meta(specs, order, iters, rank, importance, merge, calib_windows, calib_len, src) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "iters": iters, "rank": rank, "scale_eps": SCALE_EPS,
        "calibration": {"text": "pydoc_data.topics", "heldout_every": HELDOUT_EVERY,
                        "windows": calib_windows, "tokens": calib_len},
        "embed_group": EMBED_GROUP,
        "tied_embeddings": "lm_head.weight" not in src.tensors,
        "matrices": [s.to_json() for s in specs],
        "min_blocks": len(specs),  # the first block of every matrix
        **_order_meta(specs, order, rank, importance, merge),
    }


def _order_meta(specs, order, rank, importance, merge) -> dict:
    """The meta entries that follow from the order: the order itself, its sizes and how it was made
    (importance_windows: the calibration windows the gains came from, when compress measured them)."""
    sizes = [block_nbytes(specs[j].rows, specs[j].cols, rank) for j, _ in order]
    return {"importance": importance, "merge": merge, "importance_windows": None,
            "order": [[j, i] for j, i in order], "block_bytes": sizes, "cum_bytes": np.cumsum(sizes).tolist()}


def _write_base(wr, src, ref, scales) -> None:
    """Everything that is always resident: embedding (int8 + scales), head, norms, scales, biases."""
    q, d = embedding_int8(src)
    wr.add("embed.q", q.numpy())
    wr.add("embed.d", d.numpy().astype(np.float32))
    if "lm_head.weight" in src.tensors:
        wr.add("lm_head.weight", ref.lm_head.weight.detach().half().numpy())
    for name, p in ref.named_parameters():
        if "norm" in name:
            wr.add(name, p.detach().float().numpy())
    for name, m in ref.named_modules():
        if getattr(m, "bias", None) is not None and name.split(".")[-1] in ("wqkv", "wo", "w13", "w2"):
            wr.add(name + ".bias", m.bias.detach().float().numpy())
    for name, s in scales.items():
        wr.add(name + ".scale", s.float().numpy())


# --- re-ordering a store --------------------------------------------------------------------


def read_stack(store) -> tuple[list[MatrixSpec], list[list[Block]], dict[str, torch.Tensor]]:
    """(matrices, blocks [matrix][i], input scales by module) of an open BitStack store (checksums verified)."""
    meta = store.meta["bitstack"]
    specs = [MatrixSpec(**m) for m in meta["matrices"]]
    k = int(meta["rank"])
    blocks = [[block_from_bytes(store.read(block_name(s, i)), s.rows, s.cols, k) for i in range(meta["iters"])]
              for s in specs]
    scales = {n.removesuffix(".scale"): torch.from_numpy(store.read(n).copy())
              for n in store.records if n.endswith(".scale")}
    return specs, blocks, scales


def reorder(store_path: str | os.PathLike, out: str | os.PathLike, gains: list[list[float]], *,
            importance: str, merge: str, progress: Progress | None = None) -> dict:
    """Write a copy of a BitStack store with its blocks in a new order (no recompression).

    Every record is read back (checksums verified) and written again by the same StoreWriter:
    the base records as they are, then the blocks in order_blocks(gains, iters, merge).

    Args:
        store_path: the store to read.
        out: the store to write (atomically; not store_path).
        gains: gains[j][i] of block i of matrix j (the store's matrix table), larger = earlier.
        importance: what the gains are (recorded in the meta: IMPORTANCE).
        merge: "greedy" or "levels" (MERGES).
        progress: progress(stage, done, total).
    Returns:
        A summary dict: path, blocks, importance, merge, total_s, file_bytes.
    """
    from offload.store import Store, StoreWriter

    if importance not in IMPORTANCE:
        raise InvalidOptionError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    if os.path.abspath(store_path) == os.path.abspath(out):
        raise InvalidOptionError("reorder writes a new store: out must differ from the store read")
    t0 = time.perf_counter()
    with Store.open(store_path) as st:
        meta = copy.deepcopy(st.meta)
        bs = meta["bitstack"]
        specs = [MatrixSpec(**m) for m in bs["matrices"]]
        if len(gains) != len(specs) or any(len(g) != bs["iters"] for g in gains):
            raise InvalidOptionError(f"gains must be {len(specs)} lists of {bs['iters']} values (the store's matrices)")
        order = order_blocks(gains, bs["iters"], merge)
        bs.update(_order_meta(specs, order, int(bs["rank"]), importance, merge))
        blocks = {block_name(s, i) for s in specs for i in range(bs["iters"])}
        with StoreWriter(out, "bitstack", meta) as wr:
            for name, r in st.records.items():
                if name not in blocks:  # base records, in the store's order
                    wr.add(name, st.read_tensor(name), meta=r.meta)
            for n, (j, i) in enumerate(order):
                name = block_name(specs[j], i)
                wr.add(name, st.read(name), meta=st.records[name].meta)
                if progress and ((n + 1) % 64 == 0 or n + 1 == len(order)):
                    progress("write", n + 1, len(order))
    return {"path": str(out), "blocks": len(order), "importance": importance, "merge": merge,
            "total_s": time.perf_counter() - t0, "file_bytes": os.path.getsize(out)}
