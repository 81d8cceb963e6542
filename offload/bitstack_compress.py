"""`edge-rt compress --format bitstack`: calibrate, decompose, order the blocks, write the store.

Steps:
1. Calibration text: Python's pydoc topics (offline everywhere), split by topic into a calibration
   part and a held-out part (every HELDOUT_EVERY-th topic) used only for evaluation.
2. Activation statistics on the dense, dequantized fp32 model: per linear input channel j,
   s_j = mean over calibration windows of ||X[:, j]||_2 + 1e-3; and the mean squared norm of the
   residual stream entering each layer (for the importance proxy).
3. Decompose every weight matrix (each part of a fused projection on its own: q, k, v, gate, up)
   into `iters` blocks of sign bits + rank-`rank` fp16 factors (offload/bitstack.py).
4. Order: first block of every matrix (the minimum model), then the rest by importance with
   block i+1 of a matrix never before block i. Importance "proxy" (default): the drop of the
   activation-scaled residual energy ||R_i||^2 - ||R_{i+1}||^2 that block i brings, divided by the
   residual-stream energy at its layer and by the block's bytes, merged greedily (a heap keeps
   the per-matrix order). Importance "loss": measured calibration loss, level by level as in the
   paper (with every matrix at b blocks, give one matrix b+1; sort each level by loss drop per
   byte) - exact but one forward per matrix per level.
5. Store (offload/store.py, kind "bitstack"): base records (int8 embedding codes and scales,
   norms, input scales, biases) then the blocks in order; meta["bitstack"] holds the matrix table,
   the order, each block's bytes and the cumulative size index.
"""

from __future__ import annotations

import heapq
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from edge_rt.errors import InvalidOptionError
from offload.bitstack import SCALE_EPS, Block, block_nbytes, block_to_bytes, decompose, reconstruct

FORMAT_VERSION = 1
HELDOUT_EVERY = 5  # every 5th pydoc topic (sorted by name) is held out for evaluation
CALIB_WINDOWS, CALIB_LEN = 16, 256  # calibration: windows of tokens from the calibration text
EMBED_GROUP = 32  # int8 embedding codes, one fp32 scale per 32 (GGUF Q8_0 layout)
IMPORTANCE = ("proxy", "taylor", "loss")
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
    """The fp32 dense model with each matrix set to a chosen number of its blocks (measured loss)."""

    def __init__(self, model, specs, blocks, scales):
        self.model, self.specs, self.blocks, self.scales = model, specs, blocks, scales
        self.offsets = {}
        row = {}
        for j, s in enumerate(specs):
            self.offsets[j] = row.get(s.module, 0)
            row[s.module] = self.offsets[j] + s.rows

    @torch.no_grad()
    def set(self, j: int, count: int) -> None:
        s = self.specs[j]
        w = reconstruct(self.blocks[j][:count], s.cols) if count else torch.zeros(s.rows, s.cols)
        lin = self.model.get_submodule(s.module)
        lin.weight[self.offsets[j] : self.offsets[j] + s.rows] = w / self.scales[s.module]


def loss_gains(probe: DenseProbe, windows, levels: int, rank: int, progress: Progress | None = None,
               matrices: list[int] | None = None) -> list[list[float]]:
    """Measured gains, level by level: gain[j][b] = (loss with all at b) - (loss with j at b+1),
    per byte. Level 0 is not measured (the minimum model holds every first block)."""
    specs = probe.specs
    todo = list(range(len(specs))) if matrices is None else matrices
    gains = [[math.inf] + [0.0] * (levels - 1) for _ in specs]
    for j in range(len(specs)):
        probe.set(j, 1)
    for b in range(1, levels):
        base = forward_loss(probe.model, windows)
        for n, j in enumerate(todo):
            probe.set(j, b + 1)
            gains[j][b] = (base - forward_loss(probe.model, windows)) / block_nbytes(specs[j].rows, specs[j].cols, rank)
            probe.set(j, b)
            if progress:
                progress(f"importance level {b + 1}", n + 1, len(todo))
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


# --- compress -------------------------------------------------------------------------------


def compress(model: str | os.PathLike | None, out: str | os.PathLike, *, iters: int = 16, rank: int = 16,
             importance: str = "proxy", calib_windows: int = CALIB_WINDOWS, calib_len: int = CALIB_LEN,
             progress: Progress | None = None) -> dict:
    """Compress a model into a BitStack store.

    Args:
        model: GGUF file or HF folder (None: the default model).
        out: store path to write (atomically).
        iters: blocks per matrix (1..64).
        rank: rank of each block's magnitude factors (1..256).
        importance: "proxy" (weight-space, fast, default), "taylor" (first-order loss estimate from
            one backward pass per level) or "loss" (measured, one forward per matrix per level).
        calib_windows, calib_len: calibration windows and their length in tokens.
        progress: progress(stage, done, total).
    Returns:
        A summary dict: path, matrices, blocks, iters, rank, importance, blocks_bytes (all blocks),
        min_blocks_bytes (the first block of every matrix), decompose_s, total_s, file_bytes.
    """
    from edge_rt.api import _tokenizer_for, open_model
    from offload.store import StoreWriter, model_meta

    if not isinstance(iters, int) or not 1 <= iters <= 64:
        raise InvalidOptionError(f"iters must be an integer in [1, 64], got {iters!r}")
    if not isinstance(rank, int) or not 1 <= rank <= 256:
        raise InvalidOptionError(f"rank must be an integer in [1, 256], got {rank!r}")
    if importance not in IMPORTANCE:
        raise InvalidOptionError(f"importance must be one of {', '.join(IMPORTANCE)}, got {importance!r}")
    t0 = time.perf_counter()
    src = open_model(model)
    tok = _tokenizer_for(src)
    calib_text, _ = calibration_split()
    windows = token_windows(tok.encode(calib_text), calib_windows, calib_len)
    ref = dense_model(src, max(calib_len, 16))
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
        order = order_by_proxy(specs, proxy_gains(specs, energies, resid, rank))
    elif importance == "taylor":
        probe = DenseProbe(ref, specs, blocks, scales)
        order = order_by_proxy(specs, taylor_gains(probe, windows[:4], iters, rank, progress))
    else:
        probe = DenseProbe(ref, specs, blocks, scales)
        order = order_by_levels(loss_gains(probe, windows[:2], iters, rank, progress), iters)
    meta = {"model": model_meta(src), "bitstack": _bitstack_meta(specs, order, iters, rank, importance,
                                                                 calib_windows, calib_len, src)}
    with StoreWriter(out, "bitstack", meta) as wr:
        _write_base(wr, src, ref, scales)
        for n, (j, i) in enumerate(order):
            wr.add(block_name(specs[j], i), block_to_bytes(blocks[j][i]), meta={"m": j, "i": i})
            if progress and ((n + 1) % 64 == 0 or n + 1 == len(order)):
                progress("write", n + 1, len(order))
    bs = meta["bitstack"]
    return {"path": str(out), "matrices": len(specs), "blocks": len(order), "iters": iters, "rank": rank,
            "importance": importance, "blocks_bytes": bs["cum_bytes"][-1],
            "min_blocks_bytes": bs["cum_bytes"][bs["min_blocks"] - 1],
            "decompose_s": t_dec, "total_s": time.perf_counter() - t0, "file_bytes": os.path.getsize(out)}


def _residual_energies(w: torch.Tensor, blocks: list[Block]) -> list[float]:
    """||R_i||^2 for i = 0..len(blocks): the scaled residual energy after i blocks."""
    r = w.float().clone()
    out = [r.pow(2).sum().item()]
    for b in blocks:
        r -= reconstruct([b], w.shape[1])
        out.append(r.pow(2).sum().item())
    return out


def _bitstack_meta(specs, order, iters, rank, importance, calib_windows, calib_len, src) -> dict:
    sizes = [block_nbytes(specs[j].rows, specs[j].cols, rank) for j, _ in order]
    return {
        "format_version": FORMAT_VERSION,
        "iters": iters, "rank": rank, "scale_eps": SCALE_EPS, "importance": importance,
        "calibration": {"text": "pydoc_data.topics", "heldout_every": HELDOUT_EVERY,
                        "windows": calib_windows, "tokens": calib_len},
        "embed_group": EMBED_GROUP,
        "tied_embeddings": "lm_head.weight" not in src.tensors,
        "matrices": [s.to_json() for s in specs],
        "order": [[j, i] for j, i in order],
        "min_blocks": len(specs),  # the first block of every matrix
        "block_bytes": sizes,
        "cum_bytes": np.cumsum(sizes).tolist(),
    }


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
