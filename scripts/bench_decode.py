"""Decode speed and time to first token: edge-rt's torch backend vs llama-cpp-python, one GGUF.

Both engines load the same GGUF (default: the default model, SmolLM2-135M-Instruct Q4_1) on the
CPU with the same thread count and context size, and run the same prompt token ids (tokenized once
by edge-rt) with greedy decoding, one token per forward, argmax on the last logits, end-of-turn
tokens ignored so both generate exactly --gen-tokens tokens. Engines alternate in one process
(edge-rt, llama.cpp, edge-rt, llama.cpp, ... for --reps rounds, after an untimed warm-up each), and
the report gives medians and every raw sample.

Measured per engine, rep and prompt (same definitions for both, those of edge-rt's GenerationStats):
  - prefill_s: forward of the whole prompt (the KV cache is reset first, so nothing is reused);
  - ttft_s: prefill plus the argmax of the first token (reported for the 200-token prompt);
  - decode tok/s: (gen_tokens - 1) / decode_s, where decode_s runs from the end of the prefill to
    the last token (the first token comes from the prefill logits; each later one costs a forward).
The overall decode tok/s of a rep is the sum of decode steps over the sum of decode_s across prompts.
Greedy agreement: how many leading token ids (and positions) match between the engines; exact
equality is not expected, since llama.cpp quantizes activations to 8 bits in its matmuls.

Prompts: the first 200 tokens of Python's pydoc topics (also the TTFT prompt), a chat-template
prompt and a short code prompt.

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_decode.py --reps 5 --out bench_results/decode.json
Options: --model PATH, --threads 2, --gen-tokens 128, --n-ctx 2048, --warmup 1.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
from dataclasses import asdict, dataclass

from _bench_common import emit, invoked_command, log, machine_info, summarize

TTFT_PROMPT_TOKENS = 200
LLAMA_N_BATCH = 512
CHAT_MESSAGE = "Explain in a few sentences why the sky is blue, then give one everyday example."
CODE_PROMPT = 'def quicksort(items: list[int]) -> list[int]:\n    """Return the items sorted in ascending order."""\n'


@dataclass(frozen=True)
class Prompt:
    name: str
    text: str  # the text the ids were tokenized from (for the tokenizer cross-check)
    special: bool  # whether special tokens in text were parsed
    ids: tuple[int, ...]


@dataclass
class Sample:
    engine: str
    rep: int
    prompt: str
    prompt_tokens: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    decode_steps: int  # generated tokens - 1: the forwards timed by decode_s
    token_ids: list[int]

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_s


# --- prompts ----------------------------------------------------------------------------------


def pydoc_text() -> str:
    """Python's pydoc topics, concatenated in key order: plain English prose with code in it."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def build_prompts(llm) -> list[Prompt]:
    """The benchmark prompts as edge-rt token ids; the first one is the TTFT prompt."""
    doc = pydoc_text()
    doc_ids = llm.encode(doc)[:TTFT_PROMPT_TOKENS]
    if len(doc_ids) != TTFT_PROMPT_TOKENS:
        raise SystemExit(f"pydoc text gave only {len(doc_ids)} tokens, need {TTFT_PROMPT_TOKENS}")
    chat = llm.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}])
    return [
        Prompt(f"pydoc_{TTFT_PROMPT_TOKENS}", doc, False, tuple(doc_ids)),
        Prompt("chat", chat, True, tuple(llm.encode(chat, parse_special=True))),
        Prompt("code", CODE_PROMPT, False, tuple(llm.encode(CODE_PROMPT))),
    ]


def tokenizers_agree(prompt: Prompt, llama) -> bool:
    """Whether llama.cpp tokenizes the prompt text to the same ids (compared over len(ids))."""
    theirs = llama.tokenize(prompt.text.encode(), add_bos=False, special=prompt.special)
    return tuple(theirs[: len(prompt.ids)]) == prompt.ids


# --- engines ----------------------------------------------------------------------------------


class EdgeRT:
    """edge-rt through its Python API; timings from the engine's own GenerationStats."""

    name = "edge_rt"

    def __init__(self, path: str, threads: int, n_ctx: int):
        import edge_rt

        self.llm = edge_rt.load(path, device="cpu", threads=threads, n_ctx=n_ctx)

    def run(self, ids: tuple[int, ...], n: int) -> tuple[float, float, float, list[int]]:
        """Greedy-generate n tokens after ids; return (prefill_s, ttft_s, decode_s, ids)."""
        self.llm.reset()  # else the engine reuses the cached prompt prefix
        t0 = time.perf_counter()
        out, ttft = [], 0.0
        for piece in self.llm.stream_pieces(list(ids), max_tokens=n, ignore_eos=True):
            if piece.token_id is None:
                continue
            if not out:
                ttft = time.perf_counter() - t0
            out.append(piece.token_id)
        stats = self.llm.last_stats
        assert stats.generated_tokens == n and stats.cached_tokens == 0, stats
        return stats.prefill_s, ttft, stats.decode_s, out


class LlamaCpp:
    """llama-cpp-python's low-level loop: eval() a batch, argmax of the last row of logits."""

    name = "llama_cpp"

    def __init__(self, path: str, threads: int, n_ctx: int):
        import llama_cpp  # optional dependency: only this benchmark needs it

        self.lib = llama_cpp
        self.llama = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                     n_batch=LLAMA_N_BATCH, verbose=False)
        self.n_vocab = self.llama.n_vocab()

    def _argmax_last(self) -> int:
        import numpy as np

        # logits of the batch's last token (the only row computed, logits_all=False): [V] fp32
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llama.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))  # ties -> lowest id, as torch.argmax

    def run(self, ids: tuple[int, ...], n: int) -> tuple[float, float, float, list[int]]:
        """Greedy-generate n tokens after ids; return (prefill_s, ttft_s, decode_s, ids)."""
        self.llama.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        t0 = time.perf_counter()
        self.llama.eval(list(ids))
        t_dec = time.perf_counter()
        out = [self._argmax_last()]
        ttft = time.perf_counter() - t0
        for _ in range(n - 1):
            self.llama.eval([out[-1]])
            out.append(self._argmax_last())
        return t_dec - t0, ttft, time.perf_counter() - t_dec, out


# --- measurement and report -------------------------------------------------------------------


def measure(engine, prompt: Prompt, n: int, rep: int) -> Sample:
    prefill_s, ttft_s, decode_s, out = engine.run(prompt.ids, n)
    return Sample(engine.name, rep, prompt.name, len(prompt.ids), prefill_s, ttft_s, decode_s, n - 1, out)


def rep_decode_tps(samples: list[Sample]) -> list[float]:
    """Per rep: all decode steps over all decode time, across prompts."""
    reps = sorted({s.rep for s in samples})
    return [sum(s.decode_steps for s in samples if s.rep == r) / sum(s.decode_s for s in samples if s.rep == r)
            for r in reps]


def engine_report(samples: list[Sample], prompts: list[Prompt]) -> dict:
    ttft_prompt = prompts[0].name
    ttft = [s for s in samples if s.prompt == ttft_prompt]
    per_prompt = {
        p.name: {
            "prompt_tokens": len(p.ids),
            "decode_tps": summarize([s.decode_tps for s in samples if s.prompt == p.name]),
            "prefill_s": summarize([s.prefill_s for s in samples if s.prompt == p.name]),
            "ttft_s": summarize([s.ttft_s for s in samples if s.prompt == p.name]),
        }
        for p in prompts
    }
    raw = [{k: v for k, v in asdict(s).items() if k != "token_ids"} | {"decode_tps": s.decode_tps} for s in samples]
    return {
        "decode_tps_median": statistics.median(rep_decode_tps(samples)),
        "decode_tps_per_rep": rep_decode_tps(samples),
        "ttft_s_median": statistics.median(s.ttft_s for s in ttft),
        "prefill_tps_median": statistics.median(s.prompt_tokens / s.prefill_s for s in ttft),
        "per_prompt": per_prompt,
        "raw_samples": raw,
    }


def common_prefix(a: list[int], b: list[int]) -> int:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


def agreement(samples: list[Sample], prompts: list[Prompt], n: int) -> dict:
    """Greedy token agreement between the engines (last rep), and each engine's run-to-run stability."""
    out = {}
    for p in prompts:
        runs = {e: [s.token_ids for s in samples if s.engine == e and s.prompt == p.name]
                for e in (EdgeRT.name, LlamaCpp.name)}
        a, b = runs[EdgeRT.name][-1], runs[LlamaCpp.name][-1]
        out[p.name] = {
            "of": n,
            "prefix_match": common_prefix(a, b),
            "positional_match": sum(x == y for x, y in zip(a, b)),
            "deterministic": {e: all(r == ids[0] for r in ids) for e, ids in runs.items()},
            "edge_rt_ids": a,
            "llama_cpp_ids": b,
        }
    return out


def reproduce_command(args: argparse.Namespace) -> str:
    """The full command, every option explicit, relative to the repository root."""
    cmd = [".venv/bin/python", "scripts/bench_decode.py"]
    if args.model:
        cmd += ["--model", args.model]
    cmd += ["--threads", str(args.threads), "--reps", str(args.reps), "--gen-tokens", str(args.gen_tokens),
            "--n-ctx", str(args.n_ctx), "--warmup", str(args.warmup)]
    if args.out:
        cmd += ["--out", args.out]
    return shlex.join(cmd)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: edge-rt's default model)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for both engines")
    ap.add_argument("--reps", type=int, default=5, help="timed rounds (each: edge-rt then llama.cpp)")
    ap.add_argument("--gen-tokens", type=int, default=128, help="greedy tokens generated per prompt")
    ap.add_argument("--n-ctx", type=int, default=2048, help="context size of both engines")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    if args.reps < 1 or args.gen_tokens < 2 or args.threads < 1 or args.warmup < 0:
        ap.error("need --reps >= 1, --gen-tokens >= 2, --threads >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    from edge_rt.loading.resolve import resolve_model_path

    path = str(resolve_model_path(args.model))
    log(f"loading {path} (threads={args.threads}, n_ctx={args.n_ctx})")
    edge, llama = EdgeRT(path, args.threads, args.n_ctx), LlamaCpp(path, args.threads, args.n_ctx)
    prompts = build_prompts(edge.llm)
    longest = max(len(p.ids) for p in prompts) + args.gen_tokens
    if longest > args.n_ctx:
        raise SystemExit(f"prompt plus --gen-tokens needs {longest} positions; --n-ctx is {args.n_ctx}")
    engines = (edge, llama)

    for _ in range(args.warmup):
        for engine in engines:
            for p in prompts:
                engine.run(p.ids, min(args.gen_tokens, 16))
    samples: list[Sample] = []
    for rep in range(args.reps):
        for engine in engines:
            batch = [measure(engine, p, args.gen_tokens, rep) for p in prompts]
            samples += batch
            log(f"rep {rep} {engine.name:9s} decode {rep_decode_tps(batch)[0]:7.1f} tok/s  "
                f"ttft {batch[0].ttft_s * 1e3:7.1f} ms")

    import llama_cpp

    reports = {e.name: engine_report([s for s in samples if s.engine == e.name], prompts) for e in engines}
    ours, theirs = reports[EdgeRT.name], reports[LlamaCpp.name]
    result = {
        "benchmark": "decode",
        "machine": machine_info() | {"llama_cpp_version": llama_cpp.__version__},
        "config": {
            "model": path,
            "threads": args.threads,
            "reps": args.reps,
            "warmup": args.warmup,
            "gen_tokens": args.gen_tokens,
            "n_ctx": args.n_ctx,
            "llama_n_batch": LLAMA_N_BATCH,
            "sampling": "greedy (argmax), ignore_eos",
            "order": "per rep: edge_rt then llama_cpp, each over all prompts",
            "ttft_prompt": prompts[0].name,
            "prompts": [{"name": p.name, "tokens": len(p.ids),
                         "llama_tokenizer_agrees": tokenizers_agree(p, llama.llama)} for p in prompts],
        },
        "summary": {
            "edge_rt_decode_tps": ours["decode_tps_median"],
            "llama_cpp_decode_tps": theirs["decode_tps_median"],
            "edge_rt_ttft_ms": ours["ttft_s_median"] * 1e3,
            "llama_cpp_ttft_ms": theirs["ttft_s_median"] * 1e3,
            # > 1: edge-rt decodes faster; TTFT ratio > 1: edge-rt answers later
            "ratio_decode_tps_edge_rt_over_llama_cpp": ours["decode_tps_median"] / theirs["decode_tps_median"],
            "ratio_ttft_edge_rt_over_llama_cpp": ours["ttft_s_median"] / theirs["ttft_s_median"],
        },
        "engines": reports,
        "greedy_agreement": agreement(samples, prompts, args.gen_tokens),
        "command": invoked_command(),
        "reproduce": reproduce_command(args),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
