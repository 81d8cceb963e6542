"""Offload design probes: the measurements behind three choices of the Endor/streaming path.

  decode    ns per weight of `offload.endor.decode_rows` on one core, native kernel vs numpy, for
            a bf16 matrix at 50% (same width, and widened to fp32); alternating, medians.
  reads     cold decoding from a store (O_DIRECT), the reader's GIL switch interval at Python's
            default (5 ms) vs offload.streamer.SWITCH_INTERVAL_S: tok/s and the GB/s of the reads
            themselves (timed around Store.read_range). One fresh process per sample, alternating.
  workers   linear workers 1 vs 2 (EDGE_RT_LINEAR_WORKERS), warm (page cache) and cold, Endor and
            dense stores. One fresh process per sample, alternating.

The stores are scripts/bench_offload.py's (--work; run it once first). Budget: 30% of the dense
weights, n_ctx 64, bf16 compute, 2 torch threads, as there.

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_offload_probes.py decode reads workers --reps 3 --out bench_results/offload_probes.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _bench_common import emit, invoked_command, log, machine_info, summarize

PROMPT = "The history of"


def probe_decode(reps: int) -> dict:
    import numpy as np
    import torch

    from offload import endor, native

    torch.set_num_threads(1)
    R, K = 1536, 576  # SmolLM2's w13 rows by its input width
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal((R, K)).astype(np.float32)).to(torch.bfloat16)
    w[torch.from_numpy(rng.random((R, K)) < 0.5)] = 0
    e = endor.encode(w)
    parts = {k: torch.from_numpy(v) for k, v in e.records().items()}
    res = {}
    for out_dtype in (torch.bfloat16, torch.float32):
        out = torch.empty(R, K, dtype=out_dtype)
        samples = {"native": [], "numpy": []}
        for _ in range(reps):
            for path in samples:
                os.environ["EDGE_RT_NATIVE"] = "1" if path == "native" else "0"
                native.endor_kernel.cache_clear()
                ts = []
                for _ in range(20):
                    t0 = time.perf_counter()
                    endor.decode_rows(parts, e.spec(), 0, R, out)
                    ts.append(time.perf_counter() - t0)
                assert torch.equal(out, w.to(out_dtype)), path
                samples[path].append(statistics.median(ts) / (R * K) * 1e9)
        res[str(out_dtype).removeprefix("torch.")] = {p: summarize(s) for p, s in samples.items()}
    os.environ.pop("EDGE_RT_NATIVE", None)
    native.endor_kernel.cache_clear()
    return {"ns_per_weight": res, "shape": [R, K], "density": 0.5}


def _child(args) -> None:
    """One sample in a fresh process: prints a JSON line."""
    import torch

    torch.set_num_threads(2)
    if args.switch_interval:
        from offload import streamer

        streamer.SWITCH_INTERVAL_S = args.switch_interval
    import edge_rt
    from offload.store import Store

    dense = Store.open(Path(args.work) / "smollm2-dense.ews").nbytes()
    llm = edge_rt.load(args.child, device="cpu", budget=int(0.30 * dense), n_ctx=64, dtype="bfloat16")
    s = llm.backend.model.feed.streamer
    s.direct = not args.warm
    reads = []
    orig = s.store.read_range

    def timed(start, nbytes, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(start, nbytes, *a, **k)
        finally:
            reads.append((time.perf_counter() - t0, nbytes))

    s.store.read_range = timed
    llm.generate(PROMPT, max_tokens=2, ignore_eos=True)
    llm.reset()
    if not args.warm:
        s.store.evict()
    reads.clear()
    out = llm.generate(PROMPT, max_tokens=args.tokens, ignore_eos=True)
    read_s = sum(t for t, _ in reads)
    print(json.dumps({"tok_s": out.stats.decode_tps, "read_gb_s": sum(n for _, n in reads) / read_s / 1e9 if read_s else None,
                      "workers": llm.backend.model.linear_pool.workers}))


def _sample(args, store: Path, warm: bool, env: dict, switch: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(store), "--work", args.work, "--tokens", str(args.tokens)]
    if warm:
        cmd.append("--warm")
    if switch:
        cmd += ["--switch-interval", str(switch)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _collect(args, configs: dict) -> dict:
    samples: dict[str, list] = {k: [] for k in configs}
    for rep in range(args.reps):
        for name, run in configs.items():
            samples[name].append(run())
            log(f"round {rep} {name}: {samples[name][-1]}")
    return {name: {key: summarize([x[key] for x in xs if x[key] is not None])
                   for key in ("tok_s", "read_gb_s") if any(x[key] is not None for x in xs)}
            | {"workers": xs[-1]["workers"]} for name, xs in samples.items()}


def probe_reads(args) -> dict:
    from offload.streamer import SWITCH_INTERVAL_S

    endor_store = Path(args.work) / "smollm2-endor.ews"
    env = {"EDGE_RT_LINEAR_WORKERS": "1"}
    return {"switch_interval_s": SWITCH_INTERVAL_S, "sides": _collect(args, {
        "endor_cold_default_5ms": lambda: _sample(args, endor_store, False, env, switch=0.005),
        f"endor_cold_{SWITCH_INTERVAL_S * 1e3:g}ms": lambda: _sample(args, endor_store, False, env)})}


def probe_workers(args) -> dict:
    configs = {}
    for kind in ("endor", "pruned_dense"):
        store = Path(args.work) / f"smollm2-{kind}.ews"
        for warm in (True, False):
            for w in (1, 2):
                configs[f"{kind}_{'warm' if warm else 'cold'}_workers{w}"] = \
                    (lambda store=store, warm=warm, w=w: _sample(args, store, warm, {"EDGE_RT_LINEAR_WORKERS": str(w)}))
    return {"sides": _collect(args, configs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="*", help="decode | reads | workers (default: decode)")
    ap.add_argument("--work", default="bench_results/offload", help="scripts/bench_offload.py's stores")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--switch-interval", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args)
    bad = set(args.probes) - {"decode", "reads", "workers"}
    if bad:
        ap.error(f"unknown probe(s) {', '.join(sorted(bad))}: choose from decode, reads, workers")
    out = {"benchmark": "offload_probes", "command": invoked_command(), "machine": machine_info(),
           "reps": args.reps, "tokens": args.tokens}
    for p in args.probes or ["decode"]:
        out[p] = probe_decode(args.reps) if p == "decode" else probe_reads(args) if p == "reads" else probe_workers(args)
    emit(out, args.out)


if __name__ == "__main__":
    main()
