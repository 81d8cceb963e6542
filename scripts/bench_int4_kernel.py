"""edge-rt's native int4 kernel against PyTorch's packed int4 CPU kernel, inside the real model.

Both kernels serve Int4Linear on CPU (loading.weights.int4_kernel_for picks one): PyTorch's
`_weight_int4pack_mm_for_cpu` ("pytorch") and models/int4_matmul.c ("native": AVX2 + FMA;
"native_bf16": AVX-512 BF16; "native_vnni": AVX-512 VNNI; each where the CPU has it). This loads the GGUF once per kernel
(EDGE_RT_INT4_KERNEL), fills the cache with a --prefix-token prompt,
and times, round-robin over kernels and chunk sizes after a warm-up:
  - T = 1: `backend.forward([t])`, a plain decode step (last logits);
  - T > 1: `backend.verify(T tokens)`, a speculative verify chunk (all T rows);
each followed by `trim(T)`. A sample is the median of --inner steps; the report gives medians over
--reps rounds, every raw sample, and ratios (T-step / 1-step per kernel; each kernel / pytorch per T).

PyTorch picks its CPU kernels by the CPU's level (AVX2 or AVX-512); set ATEN_CPU_CAPABILITY=avx2
to measure what an AVX2-only CPU gets (recorded in the JSON).

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_int4_kernel.py --reps 5 --out bench_results/int4_kernel.json
Options: --model PATH, --threads 2, --prefix 300, --inner 5, --chunks 1,2,4,8,16.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from _bench_common import emit, invoked_command, log, machine_info, summarize

KERNELS = ("pytorch", "native", "native_bf16", "native_vnni")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunks", default="1,2,4,8,16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    chunks = sorted({int(c) for c in a.chunks.split(",")} | {1})

    import torch

    import edge_rt
    from bench_verify_cost import pydoc_ids

    from edge_rt.models.native_kernels import int4_available

    kernels = [k for k in KERNELS if k == "pytorch" or int4_available(k)]
    log(f"kernels: {kernels}")
    llms = {}
    for k in kernels:
        os.environ["EDGE_RT_INT4_KERNEL"] = k
        llms[k] = edge_rt.load(a.model, device="cpu", threads=a.threads, n_ctx=a.prefix + 64)
        got = llms[k].backend.model.layers[0].attn.wqkv.kernel
        if got != {"pytorch": "cpu"}.get(k, k):
            raise SystemExit(f"kernel {k!r} did not load (the first layer runs {got!r})")
    ids = pydoc_ids(llms["native"].tokenizer, a.prefix)
    for llm in llms.values():
        llm.backend.reset()
        llm.backend.forward(ids)

    def step(backend, T: int) -> float:
        t0 = time.perf_counter()
        if T == 1:
            backend.forward(ids[:1])
        else:
            backend.verify(ids[:T])
        dt = time.perf_counter() - t0
        backend.trim(T)
        return dt

    for llm in llms.values():  # warm-up
        for T in chunks:
            step(llm.backend, T)
    raw = {k: {T: [] for T in chunks} for k in kernels}
    for r in range(a.reps):
        for k, llm in llms.items():
            for T in chunks:
                raw[k][T].append(statistics.median(step(llm.backend, T) for _ in range(a.inner)))
        log(f"round {r + 1}/{a.reps}: " + ", ".join(f"{k} T1 {raw[k][1][-1] * 1e3:.2f} ms" for k in kernels))
    med = {k: {T: statistics.median(v) for T, v in raw[k].items()} for k in kernels}
    emit({
        "benchmark": "int4_kernel",
        "command": invoked_command(),
        "machine": machine_info(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability_env": os.environ.get("ATEN_CPU_CAPABILITY"),
        "load_avg": os.getloadavg(),
        "threads": a.threads, "prefix": a.prefix, "inner": a.inner, "reps": a.reps,
        "ms": {k: {T: summarize([s * 1e3 for s in raw[k][T]]) for T in chunks} for k in kernels},
        "table": [[T] + [round(med[k][T] * 1e3, 2) for k in kernels]
                  + [round(med[k][T] / med[k][1], 2) for k in kernels]
                  + [round(med[k][T] / med["pytorch"][T], 3) for k in kernels[1:]] for T in chunks],
        "table_columns": ["T"] + [f"{k}_ms" for k in kernels] + [f"{k}_ratio_to_T1" for k in kernels]
                         + [f"{k}_over_pytorch" for k in kernels[1:]],
    }, a.out)


if __name__ == "__main__":
    main()
