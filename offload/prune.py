"""Unstructured pruning (Wanda, magnitude) and `compress_model`: a model file -> a weight store.

Wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): the score of weight
W[i, j] is |W[i, j]| * ||X_j||_2, where ||X_j|| is the L2 norm of input channel j over the
calibration tokens; within each output row (Wanda's comparison group) the lowest-scoring
`sparsity` fraction is set to zero. Magnitude pruning is the same with ||X_j|| = 1 (the fallback
when no calibration text is given). The input norms come from one pass of the dense model over
the calibration text (not Wanda's layer-by-layer pass over already-pruned layers).

Calibration and held-out text are the two halves of Python's pydoc topics (offline on every
machine): `calibration_text()` and `heldout_text()` never overlap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edge_rt.errors import InvalidOptionError

METHODS = ("wanda", "magnitude")
FORMATS = ("dense", "endor")
CALIB_TOKENS = 2048  # tokens of calibration text (windows of CALIB_WINDOW)
CALIB_WINDOW = 512
# Linear layers that are pruned (model target prefixes inside each block); the embedding and the
# output head stay dense, as in Wanda.
PRUNED = ("attn.wqkv", "attn.wo", "ffn.w13", "ffn.w2")


def _pydoc_topics() -> list[str]:
    import pydoc_data.topics as t

    return [t.topics[k] for k in sorted(t.topics)]


def calibration_text() -> str:
    """The first half of the pydoc topics (sorted by name)."""
    topics = _pydoc_topics()
    return "\n\n".join(topics[: len(topics) // 2])


def heldout_text() -> str:
    """The second half of the pydoc topics: never seen by calibration."""
    topics = _pydoc_topics()
    return "\n\n".join(topics[len(topics) // 2 :])


def prune_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask [N, K]: in each row, the floor(sparsity * K) lowest scores are dropped.

    Ties are broken by column index (stable sort), so the mask is deterministic.
    """
    N, K = score.shape
    drop = int(sparsity * K)
    if not drop:
        return torch.ones(N, K, dtype=torch.bool)
    score = score.float()
    thr = torch.kthvalue(score, drop, dim=1, keepdim=True).values  # the drop-th smallest per row
    below = score < thr
    tied = score == thr
    need = drop - below.sum(1, keepdim=True)  # how many of the ties to drop, lowest index first
    return ~(below | (tied & (tied.cumsum(1) <= need)))


def prune_weight(w: torch.Tensor, sparsity: float, input_norm: torch.Tensor | None = None) -> torch.Tensor:
    """The pruned copy of w [N, K] (same dtype; pruned entries +0.0).

    Args:
        w: weight [N, K].
        sparsity: fraction of each row to remove, in [0, 1).
        input_norm: ||X_j||_2 per input channel [K] (Wanda); None for magnitude pruning.
    """
    score = w.float().abs()
    if input_norm is not None:
        score = score * input_norm.float()[None, :]
    return torch.where(prune_mask(score, sparsity), w, torch.zeros((), dtype=w.dtype))


@torch.inference_mode()
def input_norms(llm, text: str, max_tokens: int = CALIB_TOKENS) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every pruned linear layer's input over `text` (dense model forward).

    Returns:
        module name (e.g. "layers.0.attn.wqkv") -> [K] fp32 norms.
    """
    model = llm.backend.model
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name.count(".") >= 2 and name.startswith("layers.") and name.split(".", 2)[2] in PRUNED:
            def hook(mod, args, name=name):
                x = args[0].float().reshape(-1, args[0].shape[-1])
                sums[name] = sums.get(name, 0) + (x * x).sum(0)
            hooks.append(module.register_forward_pre_hook(hook))
    try:
        ids = llm.tokenizer.encode(text)[:max_tokens]
        window = min(CALIB_WINDOW, llm.n_ctx)
        for start in range(0, len(ids), window):
            llm.backend.reset()
            llm.backend.forward(ids[start : start + window])
        llm.backend.reset()
    finally:
        for h in hooks:
            h.remove()
    return {k: v.sqrt() for k, v in sums.items()}


def check_options(sparsity: float, fmt: str, method: str, values: str) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise InvalidOptionError(f"--prune must be a fraction in [0, 1), got {sparsity}")
    if fmt not in FORMATS:
        raise InvalidOptionError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if method not in METHODS:
        raise InvalidOptionError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if values not in ("native", "int8") or (values == "int8" and fmt != "endor"):
        raise InvalidOptionError(f"--values must be native, or int8 with --format endor; got {values!r}")


def compress_model(model: str | os.PathLike | None, out: str | os.PathLike, *, sparsity: float = 0.5,
                   fmt: str = "endor", method: str = "wanda", values: str = "native", dtype: str = "bfloat16",
                   calibration: str | None = None, tile_rows: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Path:
    """Prune a model and write it as a weight store ("dense" or "endor" kind).

    Args:
        model: GGUF file or HF folder (None: the default model).
        out: store path (written atomically).
        sparsity: fraction of each pruned row set to zero (0 keeps the weights as they are).
        fmt: "endor" (bitmap + nonzeros) or "dense".
        method: "wanda" (needs calibration text; default pydoc topics) or "magnitude".
        values: Endor value type: "native" (the dtype's bits) or "int8" (codes + row scales).
        dtype: the dtype weights are stored in ("bfloat16", "float16", "float32").
        calibration: calibration text for Wanda (default: `calibration_text()`).
        tile_rows: Endor tile height (default endor.DEFAULT_TILE_ROWS).
        progress: called as progress(done, total) per tensor written.
    Returns:
        The store path.
    """
    check_options(sparsity, fmt, method, values)
    import edge_rt
    from offload.store import StoreWriter, model_meta

    llm = edge_rt.load(model, device="cpu", dtype=dtype, quantized=False)
    norms = {}
    if sparsity > 0 and method == "wanda":
        norms = input_norms(llm, calibration if calibration is not None else calibration_text())
    net = llm.backend.model
    tensors = _model_tensors(net)
    meta = {"model": model_meta(llm.source), "dtype": dtype, "tensors": {},
            "prune": {"method": method if sparsity > 0 else "none", "sparsity": sparsity, "granularity": "row",
                      "calibration_tokens": CALIB_TOKENS if norms else 0}}
    with StoreWriter(out, fmt, meta) as w:
        for i, (target, t) in enumerate(tensors.items()):
            if progress:
                progress(i, len(tensors))
            meta["tensors"][target] = _write_tensor(w, target, t, sparsity, norms, fmt, values, tile_rows)
        if progress:
            progress(len(tensors), len(tensors))
        w.meta = meta  # the tensor table is complete only now; the header is written on exit
    return Path(out)


def _model_tensors(net) -> dict[str, torch.Tensor]:
    """Model target -> tensor, the tied output head left out (it is the embedding)."""
    out = {}
    for name, p in list(net.named_parameters()) + [(n, b) for n, b in net.named_buffers() if n != "rope"]:
        if p is None or name in out:
            continue
        if name == "lm_head.weight" and p is net.embed.weight:
            continue
        out[name] = p.detach()
    return out


def _write_tensor(w, target: str, t: torch.Tensor, sparsity: float, norms: dict, fmt: str, values: str,
                  tile_rows: int | None) -> dict:
    """Write one tensor's records; return its tensor-table entry."""
    from offload import endor

    module = target.rpartition(".")[0]
    layer = int(target.split(".")[1]) if target.startswith("layers.") else None
    pruned = layer is not None and target.endswith(".weight") and module.split(".", 2)[-1] in PRUNED
    if pruned and sparsity > 0:
        t = prune_weight(t, sparsity, norms.get(module))
    if pruned and fmt == "endor":
        e = endor.encode(t, tile_rows=tile_rows or endor.DEFAULT_TILE_ROWS, values=values)
        for suffix, arr in e.records().items():
            w.add(f"{target}.{suffix}", arr)
        return e.spec() | {"layer": layer}
    w.add(target, t)
    return {"format": "dense", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "layer": layer if pruned else None}
