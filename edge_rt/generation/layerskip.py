"""Self-speculative layer skip (Draft & Verify): find, save and load the skip set of a model.

The draft is the target itself with some layers left out. Which layers is found offline by a
greedy search on calibration text: starting from the full model, repeatedly drop the layer whose
removal keeps the draft's next-token agreement with the full model highest, and keep the set
with the best predicted speedup

    speedup(a, s) = max_k [(1 - a^(k+1)) / (1 - a)] / [c(k+1) + k * c(1) * (L - s) / L] * c(1)

for agreement a with s of L layers skipped and measured verify costs c(t). The result is saved
per model file (by content hash) under $EDGE_RT_HOME/layerskip/ and found again by
`load_skip_set`. The paper searches with Bayesian optimisation; the greedy search is our choice
(documented in docs/SPECULATIVE.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from edge_rt.errors import InvalidOptionError
from edge_rt.loading.resolve import edge_rt_home

FORMAT_VERSION = 1


def model_key(path: str | os.PathLike) -> str:
    """A content key for a model file or folder: sha256 over size and the first and last MiB."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return h.hexdigest()[:32]


def skip_set_path(llm) -> Path:
    dtype = str(llm.dtype).removeprefix("torch.")
    return edge_rt_home() / "layerskip" / f"{model_key(llm.source.path)}-{dtype}-{'q' if llm.quantized else 'd'}.json"


def load_skip_set(llm) -> frozenset[int]:
    """The saved skip set for this model (same file, dtype and weight format)."""
    if not hasattr(llm.backend, "forward_skipping"):
        raise InvalidOptionError(f"the {llm.backend.name} backend cannot skip layers; layerskip needs the torch backend")
    path = skip_set_path(llm)
    if not path.exists():
        raise InvalidOptionError(f"no layer-skip set saved for {llm.source.path.name}: "
                                 "run `edge-rt layerskip-search` once for this model")
    try:
        data = json.loads(path.read_text())
        skip = frozenset(int(i) for i in data["skip"])
        if data.get("version") != FORMAT_VERSION or not all(0 <= i < llm.args.num_hidden_layers for i in skip):
            raise ValueError("bad version or layer index")
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidOptionError(f"{path}: corrupt layer-skip file ({e}); run `edge-rt layerskip-search` again") from e
    return skip


def has_skip_set(llm) -> bool:
    return hasattr(llm.backend, "forward_skipping") and skip_set_path(llm).exists()


@torch.inference_mode()
def agreement(model, ids: torch.Tensor, reference: torch.Tensor, skip: frozenset[int], caches_for) -> float:
    """Fraction of positions where the model without `skip` predicts the full model's argmax."""
    caches = caches_for()
    logits = model(ids[None], caches, 0, skip=skip)[0]
    return float((logits.argmax(-1) == reference).float().mean())


def predicted_speedup(a: float, skipped: int, layers: int, costs: Sequence[float], max_draft: int) -> float:
    a = min(a, 0.999)
    d = costs[1] * (layers - skipped) / layers
    best = 1.0 / costs[1]
    for k in range(1, min(max_draft, len(costs) - 2) + 1):
        best = max(best, (1 - a ** (k + 1)) / (1 - a) / (costs[k + 1] + k * d))
    return best * costs[1]


def search_skip_set(llm, text: str, tokens: int = 256, max_draft: int = 8,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Greedy search for the skip set with the best predicted speedup; returns the saved record."""
    from edge_rt.generation.speculative import measure_verify_costs
    from edge_rt.kv.cache import make_caches

    backend = llm.backend
    if not hasattr(backend, "forward_skipping"):
        raise InvalidOptionError(f"the {backend.name} backend cannot skip layers; layerskip needs the torch backend")
    ids_list = llm.tokenizer.encode(text)[:tokens]
    if len(ids_list) < 16:
        raise InvalidOptionError("layer-skip search needs at least 16 tokens of calibration text")
    args = llm.args
    L = args.num_hidden_layers
    model = backend.model
    ids = torch.tensor(ids_list, device=backend.device)
    kv_dtype = backend.caches[0].dtype

    def caches_for():
        return make_caches(L, args.num_key_value_heads, args.head_dim, len(ids_list), kv_dtype, backend.device)

    with torch.inference_mode():
        reference = model(ids[None], caches_for(), 0)[0].argmax(-1)
    llm.reset()
    backend.forward(ids_list[:8])
    costs = measure_verify_costs(backend, max_draft + 1, reps=3)
    llm.reset()
    t0 = time.perf_counter()
    skip: frozenset[int] = frozenset()
    best = {"skip": [], "agreement": 1.0, "speedup": 1.0}
    while len(skip) < L - 1:
        scored = []
        for i in range(L):
            if i in skip:
                continue
            cand = skip | {i}
            scored.append((agreement(model, ids, reference, cand, caches_for), i))
        a, i = max(scored)
        skip = skip | {i}
        sp = predicted_speedup(a, len(skip), L, costs, max_draft)
        if progress:
            progress(f"skip {len(skip)} layers {sorted(skip)}: agreement {a:.3f}, predicted speedup {sp:.2f}x")
        if sp > best["speedup"]:
            best = {"skip": sorted(skip), "agreement": a, "speedup": sp}
        elif a < 0.3:
            break
    record = {
        "version": FORMAT_VERSION,
        "model": llm.source.path.name,
        "dtype": str(llm.dtype).removeprefix("torch."),
        "quantized": llm.quantized,
        "skip": best["skip"],
        "agreement": best["agreement"],
        "predicted_speedup": best["speedup"],
        "calibration_tokens": len(ids_list),
        "verify_costs_ms": [round(c * 1e3, 3) for c in costs],
        "search_s": time.perf_counter() - t0,
    }
    path = skip_set_path(llm)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    record["path"] = str(path)
    return record
