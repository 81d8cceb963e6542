"""BitStack: live resize time, perplexity against memory (with RTN and GGUF peers), proxy vs loss.

One run, one process, the same held-out text for every point:
  1. compress: the default model (SmolLM2-135M-Instruct Q4_1, dequantized) into a BitStack store
     (--iters, --rank; reused when --store exists and --reuse is given);
  2. resize: an open chat session (one turn sent), then resize by -10 MB and +10 MB in
     alternation, --reps times each, for reconstruct=keep and reconstruct=rebuild. Timed: the
     LLM.resize call (reading the extra blocks / freeing blocks, and for keep adding / subtracting
     the changed blocks' terms in the kept weights). Reported apart: the next turn's prefill, which recomputes the
     cached history with the new weights (kv="refresh"); the medians of each;
  3. perplexity vs memory: held-out pydoc text (topics held out of calibration), --eval-tokens
     tokens in windows of 512, fp32 compute for every point so only the weights differ:
       - BitStack at --points budgets from its minimum to its full size (x: stored weight bytes =
         embedding + norms + scales + the loaded blocks);
       - GGUF Q4_1: the default file's weights as stored;
       - GGUF Q8_0: the dequantized Q4_1 weights quantized with gguf.quants to Q8_0 and
         dequantized again (exactly the weights a Q8_0 file would hold; no file is written);
       - RTN int8 / int4: round-to-nearest, asymmetric min-max, groups of 64 inputs, fp16 scale
         and zero per group, applied to the same dequantized weights.
     The embedding (Q8_0 in the file) is the same for every point; x counts it for all;
  4. importance: for two levels (every matrix at b blocks, give one matrix b+1), the measured
     calibration-loss drop of a sample of matrices against the proxy used for ordering (Spearman);
  5. decode speed (tok/s, greedy) at the full size for keep and rebuild.

Run (JSON on stdout, progress on stderr; writes docs/bitstack_ppl.png with --plot):
    .venv/bin/python scripts/bench_bitstack.py --store bench_results/smollm2.bitstack \
        --out bench_results/bitstack.json --plot docs/bitstack_ppl.png
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from _bench_common import emit, invoked_command, log, machine_info, summarize

STAGES = ("curve", "resize", "decode", "importance")
MB = 10**6  # the bars are in MB; 10**6 is the stricter reading
WINDOW = 512
RTN_GROUP = 64  # 576 and 1536 inputs are multiples of 64, not of 128


def _heldout(tok, n):
    from offload.bitstack_compress import calibration_split

    return tok.encode(calibration_split()[1])[:n]


def _ppl(llm, ids) -> float:
    return llm.perplexity(ids, window=WINDOW)


def bench_resize(store, reps, keep) -> dict:
    import edge_rt

    llm = edge_rt.load(str(store), device="cpu", n_ctx=1024, reconstruct="keep" if keep else "rebuild")
    st = llm.bitstack
    llm.resize(st.full_bytes - 25 * MB)
    chat = llm.session(system="You are terse.")
    chat.send("Name a colour.", max_tokens=4)
    times = {"-10MB": [], "+10MB": []}
    blocks = {"-10MB": [], "+10MB": []}
    refresh = []
    for r in range(reps):
        for label, delta in (("-10MB", -10), ("+10MB", 10)):
            target = st.footprint().total + delta * MB
            t0 = time.perf_counter()
            info = llm.resize(target)
            times[label].append(time.perf_counter() - t0)
            blocks[label].append(info["changed_blocks"])
        if r == 0:
            history = len(llm.chat_ids(chat.messages + [{"role": "user", "content": "And an animal?"}]))
            t0 = time.perf_counter()
            chat.send("And an animal?", max_tokens=1)
            refresh.append(time.perf_counter() - t0)
    return {"reconstruct": "keep" if keep else "rebuild",
            "resize_s": {k: summarize(v) for k, v in times.items()},
            "changed_blocks": {k: summarize(v) for k, v in blocks.items()},
            "next_turn_with_refresh_s": refresh, "history_tokens": history}


def bitstack_curve(store, ids, points) -> list[dict]:
    import edge_rt

    llm = edge_rt.load(str(store), device="cpu", dtype="float32", n_ctx=WINDOW, reconstruct="keep")
    st = llm.bitstack
    rec = st.store.records
    base_stored = sum(r.nbytes for n, r in rec.items() if ".block" not in n)
    out = []
    for b in np.linspace(st.min_bytes, st.full_bytes, points).astype(int).tolist():
        llm.resize(b)
        p = _ppl(llm, ids)
        stored = base_stored + st.cum[st.loaded]
        out.append({"budget": b, "blocks": st.loaded, "stored_weight_bytes": stored, "ppl": p})
        log(f"bitstack {stored / 1e6:.1f} MB: ppl {p:.3f}")
    return out


def _rtn(w: torch.Tensor, bits: int) -> torch.Tensor:
    g = w.reshape(w.shape[0], -1, RTN_GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).half().float().clamp_min(1e-12)
    zero = lo.half().float()
    q = ((g - zero) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + zero).reshape(w.shape)


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType as QT
    from gguf import quants as gq

    a = w.numpy().astype(np.float32)
    return torch.from_numpy(gq.dequantize(gq.quantize(a, QT.Q8_0), QT.Q8_0).reshape(a.shape).copy())


def peer_points(model, ids) -> list[dict]:
    """GGUF Q4_1 as stored, Q8_0 via gguf.quants, RTN int8/int4 g64: fp32 compute, same text."""
    import edge_rt

    llm = edge_rt.load(model, device="cpu", dtype="float32", quantized=False, n_ctx=WINDOW)
    src = llm.source
    linears = {n: m for n, m in llm.backend.model.named_modules()
               if n.startswith("layers.") and isinstance(m, torch.nn.Linear)}
    orig = {n: m.weight.detach().clone() for n, m in linears.items()}
    nonlin = sum(_stored_bytes(s) for t, parts in src.tensors.items() for _, s in parts
                 if not any(t.startswith(n + ".") for n in linears))
    n_lin = sum(w.numel() for w in orig.values())
    lin_q41 = sum(_stored_bytes(s) for t, parts in src.tensors.items() for _, s in parts
                  if any(t.startswith(n + ".") for n in linears))
    formats = {
        "GGUF Q4_1": (None, lin_q41),
        "GGUF Q8_0": (_q8_0, n_lin * 34 // 32),
        "RTN int8 g64": (lambda w: _rtn(w, 8), n_lin + n_lin // RTN_GROUP * 4),
        "RTN int4 g64": (lambda w: _rtn(w, 4), n_lin // 2 + n_lin // RTN_GROUP * 4),
    }
    out = []
    for name, (fn, lin_bytes) in formats.items():
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(orig[n] if fn is None else fn(orig[n]))
        p = _ppl(llm, ids)
        out.append({"format": name, "stored_weight_bytes": nonlin + lin_bytes, "ppl": p})
        log(f"{name} {(nonlin + lin_bytes) / 1e6:.1f} MB: ppl {p:.3f}")
    return out


def _stored_bytes(s) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[s.qtype]
    return int(np.prod(s.shape)) // block * size


def importance_check(model, store, levels, sample_layers) -> list[dict]:
    """Spearman correlation of proxy gains and measured loss gains over sampled matrices."""
    from edge_rt.api import _tokenizer_for, open_model
    from offload.bitstack import block_from_bytes, block_nbytes
    from offload.bitstack_compress import (DenseProbe, MatrixSpec, block_name, calibration_split, dense_model,
                                           forward_loss, input_stats, proxy_gains, taylor_level, token_windows,
                                           _residual_energies, part_weight)
    from offload.store import Store

    src = open_model(model)
    st = Store.open(store)
    meta = st.meta["bitstack"]
    specs = [MatrixSpec(**m) for m in meta["matrices"]]
    k = meta["rank"]
    blocks = [[block_from_bytes(st.read(block_name(s, i)), s.rows, s.cols, k) for i in range(meta["iters"])]
              for s in specs]
    scales = {n.removesuffix(".scale"): torch.from_numpy(st.read(n).copy()) for n in st.records if n.endswith(".scale")}
    tok = _tokenizer_for(src)
    cw = meta["calibration"]
    windows = token_windows(tok.encode(calibration_split()[0]), cw["windows"], cw["tokens"])
    ref = dense_model(src, 256)
    _, resid = input_stats(ref, windows)
    energies = [_residual_energies(part_weight(src, s) * scales[s.module], blocks[j]) for j, s in enumerate(specs)]
    proxy = proxy_gains(specs, energies, resid, k)
    probe = DenseProbe(ref, specs, blocks, scales)
    sample = [j for j, s in enumerate(specs) if int(s.module.split(".")[1]) in sample_layers]
    evalw = token_windows(tok.encode(calibration_split()[0]), 2, 128)
    out = []
    for b in levels:
        for j in range(len(specs)):
            probe.set(j, b)
        base = forward_loss(ref, evalw)
        measured = []
        for j in sample:
            probe.set(j, b + 1)
            s = specs[j]
            measured.append((base - forward_loss(ref, evalw)) / block_nbytes(s.rows, s.cols, k))  # per byte, like the proxy
            probe.set(j, b)
        taylor = taylor_level(probe, windows[:4], b, k)
        variants = {  # the proxy used for ordering, and other estimates for comparison
            "proxy (energy drop / layer residual energy / bytes)": [proxy[j][b] for j in sample],
            "taylor (first-order loss, one backward pass)": [taylor[j] for j in sample],
            "energy drop / bytes": [(energies[j][b] - energies[j][b + 1]) / block_nbytes(specs[j].rows, specs[j].cols, k)
                                    for j in sample],
            "relative energy drop / bytes": [(energies[j][b] - energies[j][b + 1]) / energies[j][0]
                                             / block_nbytes(specs[j].rows, specs[j].cols, k) for j in sample],
        }
        rhos = {name: _spearman(measured, v) for name, v in variants.items()}
        out.append({"level": b + 1, "matrices": len(sample), "spearman": rhos, "base_loss": base,
                    "measured": measured, "variants": variants, "sample": [specs[j].key for j in sample]})
        log(f"level {b + 1}: spearman with the measured loss drop over {len(sample)} matrices: {rhos}")
    return out


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def decode_speed(store, tokens) -> list[dict]:
    import edge_rt

    out = []
    for mode in ("keep", "rebuild"):
        llm = edge_rt.load(str(store), device="cpu", n_ctx=512, reconstruct=mode)
        c = llm.generate("The capital of France is", max_tokens=tokens, ignore_eos=True)
        out.append({"reconstruct": mode, "decode_tokens_per_s": c.stats.decode_tps,
                    "footprint_bytes": llm.bitstack.footprint().total})
        log(f"decode {mode}: {c.stats.decode_tps:.2f} tok/s")
    return out


def plot(curves: dict[str, list[dict]], peers, path) -> None:
    """Perplexity against stored weight bytes: one line per BitStack ordering, one marker per peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot([c["stored_weight_bytes"] / 1e6 for c in curve], [c["ppl"] for c in curve], "o-", label=label)
    for p, m in zip(peers, "s^Dv"):
        label = f"{p['format']} ({p['ppl']:.2f})"
        ax.plot(p["stored_weight_bytes"] / 1e6, p["ppl"], m, markersize=8, alpha=0.8, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("stored weight bytes (MB)")
    ax.set_ylabel("held-out perplexity (pydoc text)")
    ax.set_title("SmolLM2-135M-Instruct: perplexity against memory")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_from(results: list[str], path: str) -> None:
    """Plot the curves of earlier result files together (the peers of the first that has them)."""
    curves, peers = {}, []
    for r in results:
        d = json.loads(Path(r).read_text())
        if "bitstack_curve" in d:
            imp = d.get("importance_order", "proxy")
            curves[f"BitStack ({imp} order)"] = d["bitstack_curve"]
        peers = peers or d.get("peers", [])
    plot(curves, peers, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--store", default="bench_results/smollm2.bitstack")
    ap.add_argument("--reuse", action="store_true", help="reuse --store if it exists")
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--points", type=int, default=12)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--skip-importance", action="store_true")
    ap.add_argument("--only", choices=STAGES, nargs="+", default=list(STAGES), help="stages to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--skip-peers", action="store_true", help="curve stage: BitStack points only")
    ap.add_argument("--plot-from", nargs="+", default=None, help="only plot these result files into --plot")
    a = ap.parse_args()
    if a.plot_from:
        plot_from(a.plot_from, a.plot)
        return
    torch.set_num_threads(a.threads)
    from edge_rt.loading.resolve import default_model_path
    from offload.bitstack_compress import compress

    model = a.model or str(default_model_path())
    result = {"command": invoked_command(), "machine": machine_info(), "threads": a.threads}
    if not (a.reuse and Path(a.store).exists()):
        last = [0.0]

        def prog(stage, done, total):
            if time.time() - last[0] > 10 or done == total:
                log(f"compress: {stage} {done}/{total}")
                last[0] = time.time()

        result["compress"] = compress(model, a.store, iters=a.iters, rank=a.rank, progress=prog)
    from offload.store import Store

    with Store.open(a.store) as st:
        result["importance_order"] = st.meta["bitstack"]["importance"]

    def save():  # partial results survive an interrupted run
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(result, indent=2) + "\n")

    import edge_rt

    if "curve" in a.only:
        ids = _heldout(edge_rt.load(a.store, device="cpu", n_ctx=64).tokenizer, a.eval_tokens)
        result["eval_tokens"] = len(ids)
        result["bitstack_curve"] = bitstack_curve(a.store, ids, a.points)
        save()
        result["peers"] = [] if a.skip_peers else peer_points(model, ids)
        if a.plot:
            plot({f"BitStack ({result['importance_order']} order)": result["bitstack_curve"]}, result["peers"], a.plot)
        save()
    if "resize" in a.only:
        result["resize"] = [bench_resize(a.store, a.reps, keep) for keep in (False, True)]
        save()
    if "decode" in a.only:
        result["decode"] = decode_speed(a.store, a.decode_tokens)
        save()
    if "importance" in a.only and not a.skip_importance:
        result["importance"] = importance_check(model, a.store, levels=[1, 7], sample_layers={0, 7, 14, 21, 29})
    emit(result, a.out)


if __name__ == "__main__":
    main()
