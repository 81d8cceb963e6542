"""Lossless speculative decoding vs plain decoding: edge-rt (plain, speculative) and llama-cpp-python.

One process loads the same GGUF (default: SmolLM2-135M-Instruct Q4_1) in edge-rt's torch backend
and in llama-cpp-python (CPU, same threads, same context). For each prompt of the suite in
tests/spec_prompts.py (the first --per-category prompts of each category, rendered with the chat
template and tokenized once by edge-rt), three engines run greedy decoding of up to --gen-tokens
tokens, stopping at end-of-turn, alternating engine by engine and rep by rep:

  - edge_rt_plain: one forward per token (`speculative="none"`);
  - edge_rt_spec: `speculative=--method` (default auto: reference copy from the prompt's
    references where the suite gives them, else n-gram lookup), adaptive draft length;
  - llama_cpp: llama-cpp-python's raw loop, eval([token]) + argmax of the logits.

Decode tokens/s = (generated - 1) / decode time (the first token comes from the prefill; for
edge-rt, decode_s of GenerationStats, which counts drafting and verifying but not the one-time
verify-cost calibration, done in an untimed warm-up). Per rep and prompt group, all decode steps
over all decode time; the report gives the median over reps, the ratios, whether the speculative
tokens equal the plain tokens (they must), and the distribution of accepted draft lengths.

Groups: "grounded" = code_edit, summary, doc_qa, multi_turn; "open" = story.

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_speculative.py --reps 3 --out bench_results/speculative.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _bench_common import REPO_ROOT, emit, invoked_command, log, machine_info, summarize

sys.path.insert(0, str(REPO_ROOT / "tests"))

GROUPS = {"grounded": ("code_edit", "summary", "doc_qa", "multi_turn"), "open": ("story",)}


class EdgeRT:
    def __init__(self, path, threads, n_ctx, speculative, max_draft):
        import edge_rt

        self.llm = edge_rt.load(path, device="cpu", threads=threads, n_ctx=n_ctx)
        self.speculative = speculative
        self.max_draft = max_draft
        self.name = "edge_rt_plain" if speculative == "none" else "edge_rt_spec"

    def run(self, ids, refs, n):
        self.llm.reset()
        opts = dict(max_tokens=n, speculative=self.speculative, max_draft=self.max_draft)
        if self.speculative != "none" and refs:
            opts["references"] = refs
        out = [p.token_id for p in self.llm.stream_pieces(list(ids), **opts) if p.token_id is not None]
        st = self.llm.last_stats
        return st.decode_s, out, st.speculative


class LlamaCpp:
    name = "llama_cpp"

    def __init__(self, path, threads, n_ctx, stop_ids):
        import llama_cpp
        import numpy as np

        self.np, self.lib = np, llama_cpp
        self.llama = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                                     verbose=False)
        self.n_vocab = self.llama.n_vocab()
        self.stop_ids = set(stop_ids)

    def _argmax(self):
        logits = self.np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llama.ctx, -1), shape=(self.n_vocab,))
        return int(self.np.argmax(logits))

    def run(self, ids, refs, n):
        self.llama.reset()
        self.llama.eval(list(ids))
        t0 = time.perf_counter()
        tok = self._argmax()
        out = []
        while tok not in self.stop_ids:
            out.append(tok)
            if len(out) >= n:
                break
            self.llama.eval([tok])
            tok = self._argmax()
        return time.perf_counter() - t0, out, None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--max-draft", type=int, default=10)
    ap.add_argument("--no-llama", action="store_true", help="skip llama-cpp-python")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from edge_rt.loading.resolve import resolve_model_path
    from spec_prompts import PROMPTS

    path = str(resolve_model_path(args.model))
    plain = EdgeRT(path, args.threads, args.n_ctx, "none", args.max_draft)
    spec = EdgeRT(path, args.threads, args.n_ctx, args.method, args.max_draft)
    engines = [plain, spec]
    if not args.no_llama:
        engines.append(LlamaCpp(path, args.threads, args.n_ctx, plain.llm.tokenizer.stop_ids))
    cats = [c for g in GROUPS.values() for c in g]
    prompts = [p for c in cats for p in [q for q in PROMPTS if q["category"] == c][: args.per_category]]
    items = [(p, plain.llm.chat_ids(p["messages"]), p.get("references") or []) for p in prompts]

    log(f"warm-up ({len(engines)} engines)")
    for e in engines:
        e.run(items[0][1], items[0][2], 8)
    samples = []
    for rep in range(args.reps):
        for p, ids, refs in items:
            for e in engines:
                dt, out, sp = e.run(ids, refs, args.gen_tokens)
                samples.append({"engine": e.name, "rep": rep, "prompt": p["id"], "category": p["category"],
                                "prompt_tokens": len(ids), "generated": len(out), "decode_s": dt, "tokens": out,
                                "spec": sp.to_dict() if sp is not None else None})
            log(f"rep {rep} {p['id']}: " + ", ".join(
                f"{s['engine']} {max(s['generated'] - 1, 0) / s['decode_s']:.1f} tok/s" for s in samples[-len(engines):]))

    def rate(engine, cat_set, rep):
        ss = [s for s in samples if s["engine"] == engine and s["rep"] == rep and s["category"] in cat_set]
        return sum(max(s["generated"] - 1, 0) for s in ss) / sum(s["decode_s"] for s in ss)

    report = {}
    for group, cat_set in GROUPS.items():
        g = {e.name: summarize([rate(e.name, cat_set, r) for r in range(args.reps)]) for e in engines}
        med = {k: v["median"] for k, v in g.items()}
        g["spec_over_plain"] = med["edge_rt_spec"] / med["edge_rt_plain"]
        if "llama_cpp" in med:
            g["spec_over_llama_cpp"] = med["edge_rt_spec"] / med["llama_cpp"]
            g["plain_over_llama_cpp"] = med["edge_rt_plain"] / med["llama_cpp"]
        hist: dict[str, int] = {}
        acc = drafted = steps = verify_steps = 0
        for s in samples:
            if s["engine"] == "edge_rt_spec" and s["category"] in cat_set and s["rep"] == 0:
                sp = s["spec"]
                for k, v in sp["accepted_length_histogram"].items():
                    hist[k] = hist.get(k, 0) + v
                acc += sp["accepted_tokens"]
                drafted += sp["drafted_tokens"]
                verify_steps += sp["verify_steps"]
                steps += sp["verify_steps"] + sp["plain_steps"]
        g["accepted_length_histogram"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        g["acceptance_rate"] = acc / drafted if drafted else 0.0
        g["tokens_per_forward"] = (acc + steps) / steps if steps else 0.0
        g["per_category"] = {
            c: {e.name: statistics.median(rate(e.name, (c,), r) for r in range(args.reps)) for e in engines}
            for c in cat_set
        }
        report[group] = g
    mismatches = []
    for s in samples:
        if s["engine"] == "edge_rt_spec":
            ref = next(t for t in samples if t["engine"] == "edge_rt_plain" and t["rep"] == s["rep"]
                       and t["prompt"] == s["prompt"])
            if ref["tokens"] != s["tokens"]:
                mismatches.append(s["prompt"])
    for s in samples:
        del s["tokens"]
    emit({
        "benchmark": "speculative",
        "command": invoked_command(),
        "machine": machine_info(),
        "model": path,
        "settings": vars(args),
        "prompts": [p["id"] for p in prompts],
        "speculative_equals_plain": not mismatches,
        "mismatched_prompts": mismatches,
        "groups": report,
        "raw_samples": samples,
    }, args.out)


if __name__ == "__main__":
    main()
