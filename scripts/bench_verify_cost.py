"""Cost of a T-token verify forward relative to a 1-token forward: llama.cpp backend vs torch backend.

Speculative decoding pays off when checking T drafted tokens in one forward costs little more than
one token. This measures that ratio on each backend, one GGUF, same CPU threads, same context:

  - torch: edge-rt's default backend (`edge_rt.load(path, device="cpu")`: bf16 + packed int4 on
    CPUs with bf16, its exact per-query verify path `TorchBackend.verify`);
  - llamacpp: backends/llamacpp.py in its default exact mode (a one-token forward runs as a
    two-row decode, see that module);
  - llamacpp_raw: the same backend with exact=False (llama.cpp's own one-row decode).

For each backend and T in --chunks: the cache holds a --prefix-token prompt (pydoc text); a step is
`forward([t])` (T = 1, last logits, as plain decoding does) or `verify(T tokens)` (all T rows, as a
speculative verifier does), then `trim(T)`. Each sample is the median of --inner steps; backends
and chunk sizes alternate in every round (round-robin, after an untimed warm-up); the report gives
the median over --reps rounds and every raw sample, and cost ratios relative to T = 1 of the same
backend (and of the torch backend's T = 1, for the cross-backend view). The 1- and 5-minute load
averages are recorded: on a shared machine the figures are only as good as the quiet.

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_verify_cost.py --reps 5 --out bench_results/verify_cost.json
Options: --model PATH, --threads 2, --n-ctx 1024, --prefix 128, --inner 5, --chunks 1,2,4,8,16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _bench_common import emit, invoked_command, log, machine_info, summarize


def pydoc_ids(tokenizer, n: int) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer.encode(text[: 40 * n])
    if len(ids) < n:
        raise SystemExit(f"pydoc text gave only {len(ids)} tokens, need {n}")
    return ids[:n]


def make_backends(path: str, threads: int, n_ctx: int) -> tuple[dict, object]:
    import edge_rt
    from backends.llamacpp import LlamaCppBackend

    llm = edge_rt.load(path, device="cpu", threads=threads, n_ctx=n_ctx)
    return {
        "torch": llm.backend,
        "llamacpp": LlamaCppBackend(path, n_ctx, threads=threads, exact=True),
        "llamacpp_raw": LlamaCppBackend(path, n_ctx, threads=threads, exact=False),
    }, llm


def step_seconds(backend, chunk: list[int]) -> float:
    """One forward of len(chunk) tokens at the current position, rolled back afterwards."""
    t0 = time.perf_counter()
    if len(chunk) == 1:
        backend.forward(chunk)
    else:
        verify = getattr(backend, "verify", None)
        verify(chunk) if verify else backend.forward(chunk, all_logits=True)
    dt = time.perf_counter() - t0
    backend.trim(len(chunk))
    return dt


def sample(backend, prompt: list[int], chunk: list[int], inner: int) -> float:
    backend.reset()
    backend.forward(prompt)
    return statistics.median(step_seconds(backend, chunk) for _ in range(inner))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--prefix", type=int, default=128)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", default="1,2,4,8,16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from edge_rt.loading.resolve import resolve_model_path

    path = str(resolve_model_path(a.model))
    chunks = [int(c) for c in a.chunks.split(",")]
    backends, llm = make_backends(path, a.threads, a.n_ctx)
    ids = pydoc_ids(llm.tokenizer, a.prefix + max(chunks))
    prompt, rest = ids[: a.prefix], ids[a.prefix :]
    load_before = os.getloadavg()
    log(f"warm-up; backends {list(backends)}, chunks {chunks}")
    for b in backends.values():
        for T in chunks:
            sample(b, prompt, rest[:T], 1)
    raw: dict[str, dict[int, list[float]]] = {name: {T: [] for T in chunks} for name in backends}
    for rep in range(a.reps):
        for name, b in backends.items():
            for T in chunks:
                raw[name][T].append(sample(b, prompt, rest[:T], a.inner))
        log(f"round {rep + 1}/{a.reps}: " + ", ".join(
            f"{n} T1 {raw[n][chunks[0]][-1] * 1e3:.1f} ms" for n in backends))
    med = {n: {T: statistics.median(v) for T, v in per.items()} for n, per in raw.items()}
    base = chunks[0]
    result = {
        "benchmark": "verify_cost",
        "command": invoked_command(),
        "machine": machine_info(),
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg(),
        "model": path,
        "threads": a.threads,
        "n_ctx": a.n_ctx,
        "prefix_tokens": a.prefix,
        "inner": a.inner,
        "reps": a.reps,
        "llamacpp_exact_verify": backends["llamacpp"].exact_verify,
        "torch_exact_verify": getattr(backends["torch"], "exact_verify", None),
        "torch_dtype": str(llm.dtype).removeprefix("torch."),
        "per_backend": {
            n: {str(T): {"seconds": summarize(raw[n][T]), "ratio_to_own_T1": med[n][T] / med[n][base],
                         "ratio_to_torch_T1": med[n][T] / med["torch"][base]} for T in chunks}
            for n in backends
        },
        "table": [[T] + [round(med[n][T] * 1e3, 2) for n in backends]
                  + [round(med[n][T] / med[n][base], 2) for n in backends] for T in chunks],
        "table_columns": ["T"] + [f"{n}_ms" for n in backends] + [f"{n}_ratio" for n in backends],
    }
    emit(result, a.out)


if __name__ == "__main__":
    main()
