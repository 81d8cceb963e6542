"""BitStack: live resize time, perplexity against memory (with RTN and GGUF peers), block importance.

One run, one process, the same held-out text for every point:
  1. compress: the default model (SmolLM2-135M-Instruct Q4_1, dequantized) into a BitStack store
     (--iters, --rank, --importance, --merge; reused when --store exists and --reuse is given);
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
  4. decode speed (tok/s, greedy) at the full size for keep and rebuild;
  5. gains (only with --only gains): the measured importance of every block of --store, level by
     level as in the paper (every matrix at b blocks, give one matrix b + 1): the drop of the
     calibration cross-entropy on --gain-windows windows of --gain-len tokens (and with --gain-kl
     of KL(dense || model) in the same forwards), the proxy and taylor gains of the same blocks,
     Spearman correlations per level and pooled, the fraction of blocks that raise the loss and
     the split-half agreement of the measurement (even against odd windows);
  6. orders (only with --only orders --gains-file F): held-out perplexity of every gain of F with
     both merges, and two controls, at points inside levels (orders_inside_levels).

Other modes: --reorder-from STORE --gains-file F --importance loss|kl|proxy|taylor --merge
greedy|levels writes --store as STORE re-ordered by those gains of F (the same blocks, no
recompression); --analyse F re-computes the analysis of a gains result; --plot-from plots curves
of earlier result files together.

Run (JSON on stdout, progress on stderr; writes docs/bitstack_ppl.png with --plot):
    .venv/bin/python scripts/bench_bitstack.py --store bench_results/smollm2.bitstack \
        --out bench_results/bitstack.json --plot docs/bitstack_ppl.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from _bench_common import emit, invoked_command, log, machine_info, summarize

from offload.bitstack_compress import DEFAULT_IMPORTANCE, DEFAULT_MERGE, IMPORTANCE, MERGES

STAGES = ("curve", "resize", "decode", "gains", "orders")
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


def measure_gains(model, store, n_windows, length, layers=None, levels=None, taylor=True, kl=False) -> dict:
    """Measured calibration-loss gains of a store's blocks (importance="loss", level by level), the
    proxy and taylor gains of the same blocks, their rank correlations, and how reproducible the
    measurement is (split-half over windows).

    Args:
        n_windows, length: the loss is measured on n_windows windows of `length` tokens spread over
            the calibration text (offload.bitstack_compress.loss_windows).
        layers, levels: measure only matrices of these layers / these levels b (every matrix at b
            blocks, one given b + 1); None: all.
        kl: also measure the drop of KL(dense model || probe) in the same forwards.
    """
    from edge_rt.api import _tokenizer_for, open_model
    from offload.bitstack import block_nbytes
    from offload.bitstack_compress import (DenseProbe, dense_model, input_stats, loss_gains, loss_windows, part_weight,
                                           proxy_gains, read_stack, taylor_gains, token_windows, calibration_split,
                                           kl_reference, TAYLOR_WINDOWS, _residual_energies)
    from offload.store import Store

    src = open_model(model)
    tok = _tokenizer_for(src)
    with Store.open(store) as st:
        meta = st.meta["bitstack"]
        specs, blocks, scales = read_stack(st)
    iters, k = int(meta["iters"]), int(meta["rank"])
    cw = meta["calibration"]
    calib = token_windows(tok.encode(calibration_split()[0]), cw["windows"], cw["tokens"])
    ref = dense_model(src, max(length, cw["tokens"], 16))
    _, resid = input_stats(ref, calib)  # the dense model, before the probe changes its weights
    energies = [_residual_energies(part_weight(src, s) * scales[s.module], blocks[j]) for j, s in enumerate(specs)]
    proxy = proxy_gains(specs, energies, resid, k)
    windows = loss_windows(tok, n_windows, length)
    refs = [kl_reference(ref, w) for w in windows] if kl else None  # the dense model, as the reference
    probe = DenseProbe(ref, specs, blocks, scales)
    sample = [j for j, s in enumerate(specs) if layers is None or s.layer in layers]
    at = list(range(1, iters)) if levels is None else sorted(levels)
    total, t0, c0, last = len(sample) * len(at), time.perf_counter(), time.process_time(), [0.0]
    done_levels = []

    def prog(stage, done, n):
        if done == n:
            done_levels.append(stage)
        finished = len(done_levels) * len(sample) + (0 if done == n else done)
        now = time.perf_counter()
        if now - last[0] > 30 or finished == total:
            el = now - t0
            log(f"gains: {stage} {done}/{n}; {finished}/{total} trials, {el:.0f} s, "
                f"eta {el / max(finished, 1) * (total - finished):.0f} s")
            last[0] = now

    record: dict = {}
    measured = loss_gains(probe, windows, iters, k, prog, matrices=sample, at_levels=at, record=record,
                          refs=refs)
    loss_s, loss_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    tay = None
    if taylor:
        t1 = time.perf_counter()
        tay = taylor_gains(probe, calib[:TAYLOR_WINDOWS], iters, k)  # what compress(importance="taylor") computes
        taylor_s = time.perf_counter() - t1
    out = {"windows": len(windows), "window_tokens": length, "tokens": record["tokens"], "loss_s": loss_s,
           "loss_cpu_s": loss_cpu_s,
           "trials": total, "levels": at, "matrices": [specs[j].key for j in sample], "sample": sample,
           "base_loss": record["base_loss"], "measured": _finite(measured), "proxy": _finite(proxy),
           "window_deltas": record["window_deltas"]}
    if kl:
        mkl = [[math.inf] + [0.0] * (iters - 1) for _ in specs]
        for b in at:
            for n, j in enumerate(sample):
                s = specs[j]
                mkl[j][b] = sum(record["window_kl_deltas"][b][n]) / record["tokens"] / block_nbytes(s.rows, s.cols, k)
        out.update(measured_kl=_finite(mkl), base_kl=record["base_kl"], window_kl_deltas=record["window_kl_deltas"])
    if tay is not None:
        out["taylor"], out["taylor_s"] = _finite(tay), taylor_s
    out["analysis"] = analyse_gains(out)
    return out


def _spearman(a, b) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def _finite(gains):
    return [[g if math.isfinite(g) else None for g in row] for row in gains]


def analyse_gains(d: dict) -> dict:
    """Per level and pooled: Spearman of each estimate against the measured gains (over the
    measured matrices), the fraction of blocks that raise the loss, and the split-half reliability
    of the measurement (even vs odd windows; Spearman-Brown for all of them)."""
    sample, out = d["sample"], {"per_level": []}
    est = {name: d[name] for name in ("proxy", "taylor", "measured_kl") if name in d}
    pooled = {name: ([], []) for name in est}
    for b in d["levels"]:
        m = [d["measured"][j][b] for j in sample]
        row = {"level": b + 1, "blocks_each": b, "base_loss": d["base_loss"][b],
               "raising_fraction": float(np.mean([x < 0 for x in m]))}
        for name, g in est.items():
            e = [g[j][b] for j in sample]
            row[f"spearman_{name}"] = _spearman(m, e)
            pooled[name][0].extend(m)
            pooled[name][1].extend(e)
        for key, name in (("window_deltas", ""), ("window_kl_deltas", "_kl")):
            deltas = np.array(d[key][b]) if key in d else np.zeros((0, 0))  # [matrices, windows]
            if deltas.shape[1] >= 2:
                even, odd = deltas[:, 0::2], deltas[:, 1::2]
                half = _spearman(even.sum(1), odd.sum(1))
                row["split_half" + name] = half
                row["reliability" + name] = 2 * half / (1 + half)  # Spearman-Brown: all windows
                # the same with h windows on each side: how the agreement grows with the tokens
                row["split_half_by_windows" + name] = {h: _spearman(even[:, :h].sum(1), odd[:, :h].sum(1))
                                                       for h in range(1, odd.shape[1] + 1)}
        out["per_level"].append(row)
    out["pooled"] = {f"spearman_{name}": _spearman(*v) for name, v in pooled.items()}
    return out


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
    for (label, curve), marker in zip(curves.items(), "os^Dvx" * 4):  # greedy orders dashed
        ax.plot([c["stored_weight_bytes"] / 1e6 for c in curve], [c["ppl"] for c in curve],
                marker + ("--" if "greedy" in label else "-"), label=label, markerfacecolor="none")
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


# The merge rule of stores written before "merge" was recorded in the meta (the code of then).
MERGE_BEFORE_RECORDED = {"proxy": "greedy", "taylor": "greedy", "loss": "levels"}


def _order_kind(meta: dict) -> tuple[str, str]:
    """(importance, merge) of a store."""
    return meta["importance"], meta.get("merge") or MERGE_BEFORE_RECORDED[meta["importance"]]


def _label(result: dict) -> str:
    imp = result.get("importance_order", "proxy")
    merge = result.get("merge") or MERGE_BEFORE_RECORDED[imp]  # results from before "merge" was recorded
    return f"BitStack ({imp} gains, {merge} order)"


def plot_from(results: list[str], path: str) -> None:
    """Plot the curves of earlier result files together (the peers of the first that has them)."""
    curves, peers = {}, []
    for r in results:
        d = json.loads(Path(r).read_text())
        if "bitstack_curve" in d:
            curves[_label(d)] = d["bitstack_curve"]
        peers = peers or d.get("peers", [])
    plot(curves, peers, path)


GAIN_KEYS = {"loss": "measured", "kl": "measured_kl", "proxy": "proxy", "taylor": "taylor"}  # importance -> key


def orders_inside_levels(model, store, gains_file, ids, per_level=2, levels=7) -> dict:
    """Held-out perplexity of many orders of a store's blocks at points inside levels 2..levels+1
    (per_level points evenly inside each level), where level-by-level orders differ only by
    their within-level order. Through the dense fp32 probe (the blocks' plain fp32 sums, not the
    loaded grid sums: the same perplexity to about 4 digits), so no store is written per order.
    Orders: every gain of the file with both merges, plus two controls for the within-level
    order: model order, and the measured loss reversed."""
    from edge_rt.api import open_model
    from offload.bitstack import block_nbytes
    from offload.bitstack_compress import DenseProbe, dense_model, forward_loss, order_blocks, read_stack
    from offload.store import Store

    g = json.loads(Path(gains_file).read_text())["gains"]
    src = open_model(model)
    with Store.open(store) as st:
        specs, blocks, scales = read_stack(st)
        iters, k = int(st.meta["bitstack"]["iters"]), int(st.meta["bitstack"]["rank"])
    ref = dense_model(src, WINDOW)
    probe = DenseProbe(ref, specs, blocks, scales)
    sizes = [block_nbytes(s.rows, s.cols, k) for s in specs]
    gains = {imp: [[math.inf if x is None else x for x in row] for row in g[key]]
             for imp, key in GAIN_KEYS.items() if key in g}
    orders = {f"{imp} gains, {merge} order": order_blocks(v, iters, merge)
              for imp, v in gains.items() for merge in MERGES}
    model_order = [[math.inf] + [-j] * (iters - 1) for j in range(len(specs))]
    reversed_loss = [[math.inf] + [-x for x in r[1:]] for r in gains["loss"]]
    orders["model order inside levels"] = order_blocks(model_order, iters, "levels")
    orders["loss gains reversed inside levels"] = order_blocks(reversed_loss, iters, "levels")
    level = sum(sizes)  # one level: a block of every matrix
    targets = [int(level * (b + f / (per_level + 1))) for b in range(1, levels + 1) for f in range(1, per_level + 1)]
    windows = [ids[s : s + WINDOW] for s in range(0, len(ids) - 1, WINDOW)]
    out = {"block_bytes": targets, "curves": {}}
    for name, order in orders.items():
        cum = np.cumsum([sizes[j] for j, _ in order])
        ppl = []
        for t in targets:
            counts = [0] * len(specs)
            for j, _ in order[: int(np.searchsorted(cum, t, side="right"))]:
                counts[j] += 1
            for j, c in enumerate(counts):
                probe.set(j, c)
            ppl.append(math.exp(forward_loss(ref, windows)))
        out["curves"][name] = ppl
        log(f"{name}: {[round(p, 2) for p in ppl]}")
    return out


def reorder_store(src, out, gains_file, importance, merge) -> dict:
    """A copy of store `src` ordered by one of the gains of a `--only gains` result file."""
    from offload.bitstack_compress import reorder

    g = json.loads(Path(gains_file).read_text())["gains"]
    if len(g["sample"]) != len(g["measured"]) or len(g["levels"]) != len(g["measured"][0]) - 1:
        raise SystemExit("the gains file must measure every matrix at every level")
    gains = [[math.inf if x is None else x for x in row] for row in g[GAIN_KEYS[importance]]]
    t0 = time.perf_counter()
    summary = reorder(src, out, gains, importance=importance, merge=merge,
                      progress=lambda st, d, n: log(f"reorder: {st} {d}/{n}") if d == n else None)
    return {"command": invoked_command(), "reorder": summary, "from": str(src), "gains_file": str(gains_file),
            "seconds": time.perf_counter() - t0}


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
    ap.add_argument("--gain-windows", type=int, default=4, help="gains: windows the loss is measured on")
    ap.add_argument("--gain-len", type=int, default=256, help="gains: tokens per window")
    ap.add_argument("--gain-layers", type=int, nargs="+", default=None, help="gains: only these layers' matrices")
    ap.add_argument("--gain-levels", type=int, nargs="+", default=None,
                    help="gains: only these levels b (every matrix at b blocks, one given b + 1)")
    ap.add_argument("--skip-taylor", action="store_true", help="gains: no taylor estimate")
    ap.add_argument("--gain-kl", action="store_true", help="gains: also the KL drop to the dense model")
    ap.add_argument("--reorder-from", default=None,
                    help="write --store as this store re-ordered by --gains-file's measured gains and --merge")
    ap.add_argument("--gains-file", default=None, help="a result file of --only gains")
    ap.add_argument("--importance", choices=IMPORTANCE, default=DEFAULT_IMPORTANCE,
                    help="compress: the importance of the blocks; --reorder-from: which gains of --gains-file")
    ap.add_argument("--merge", choices=MERGES, default=None,
                    help=f"how gains become the load order (default {DEFAULT_MERGE})")
    ap.add_argument("--only", choices=STAGES, nargs="+", default=["curve", "resize", "decode"], help="stages to run")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--skip-peers", action="store_true", help="curve stage: BitStack points only")
    ap.add_argument("--plot-from", nargs="+", default=None, help="only plot these result files into --plot")
    ap.add_argument("--analyse", default=None, help="only re-analyse the gains of this result file (JSON on stdout)")
    a = ap.parse_args()
    if a.analyse:
        print(json.dumps(analyse_gains(json.loads(Path(a.analyse).read_text())["gains"]), indent=2))
        return
    if a.plot_from:
        plot_from(a.plot_from, a.plot)
        return
    torch.set_num_threads(a.threads)
    if a.reorder_from:
        a.merge = a.merge or DEFAULT_MERGE
        emit(reorder_store(a.reorder_from, a.store, a.gains_file, a.importance, a.merge), a.out)
        return
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

        result["compress"] = compress(model, a.store, iters=a.iters, rank=a.rank, importance=a.importance,
                                      merge=a.merge, progress=prog)
    from offload.store import Store

    with Store.open(a.store) as st:
        result["importance_order"], result["merge"] = _order_kind(st.meta["bitstack"])

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
            plot({_label(result): result["bitstack_curve"]}, result["peers"], a.plot)
        save()
    if "resize" in a.only:
        result["resize"] = [bench_resize(a.store, a.reps, keep) for keep in (False, True)]
        save()
    if "decode" in a.only:
        result["decode"] = decode_speed(a.store, a.decode_tokens)
        save()
    if "orders" in a.only:
        ids = _heldout(edge_rt.load(a.store, device="cpu", n_ctx=64).tokenizer, a.eval_tokens)
        result["orders"] = orders_inside_levels(model, a.store, a.gains_file, ids)
        save()
    if "gains" in a.only:
        result["gains"] = measure_gains(model, a.store, a.gain_windows, a.gain_len, layers=a.gain_layers,
                                        levels=a.gain_levels, taylor=not a.skip_taylor, kl=a.gain_kl)
        save()
    emit(result, a.out)


if __name__ == "__main__":
    main()
