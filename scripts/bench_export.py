"""Export bundles: decode speed of the .pte (XNNPACK) and .onnx bundles vs the torch backend,
bundle size on disk per quantization, and quality (logits vs fp32 torch, perplexity).

One process, one model (default: SmolLM2-135M-Instruct). Bundles are exported first (or reused
from --bundles-dir when their manifest matches format, quant and max_seq; --reexport forces it),
each with its export time. Then every engine runs the same greedy decode (prompt: the first
--prompt-tokens tokens of Python's pydoc topics, --gen-tokens new tokens, end-of-turn ignored),
engines alternating in each of --reps rounds after one untimed warm-up; decode tok/s is edge-rt's
GenerationStats definition ((generated - 1) / decode_s), and the report gives medians and samples.

Engines: "torch-fp32" (the reference the bundles are exported from: dense fp32 weights),
"torch-default" (edge-rt's default CPU load: bf16 activations, packed int4 weights), and one per
bundle, "<format>-<quant>".

Quality per bundle: max |logit diff| and top-1 agreement against torch-fp32 on the `edge-rt
verify` prompt set, and perplexity on the first --ppl-tokens tokens of the pydoc text in windows
of max_seq, with its ratio to torch-fp32's.

Run (JSON on stdout, progress on stderr):
    .venv/bin/python scripts/bench_export.py --reps 5 --out bench_results/export.json
Options: --model PATH, --formats executorch,onnx, --quants none,int8,8da4w, --max-seq 512,
--threads 2, --gen-tokens 64, --prompt-tokens 64, --ppl-tokens 2048, --bundles-dir DIR,
--skip executorch-int8 (pairs to leave out), --reexport.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _bench_common import emit, invoked_command, log, machine_info, summarize


def _bundle(model, root: Path, fmt: str, quant: str, max_seq: int, reexport: bool) -> tuple[Path, float | None]:
    from edge_rt.export.exporter import QUANT_METHODS, export_bundle

    path = root / f"{fmt}-{quant}-{max_seq}"
    mpath = path / "manifest.json"
    if mpath.is_file() and not reexport:
        m = json.loads(mpath.read_text())
        method = QUANT_METHODS.get((fmt, quant), "none")  # a bundle from an older quantizer is re-exported
        if (m["format"], m["quantization"]["mode"], m["max_seq"], m["quantization"]["method"]) == \
                (fmt, quant, max_seq, method):
            log(f"reusing {path}")
            return path, None
    t0 = time.perf_counter()
    export_bundle(model, path, format=fmt, quant=quant, max_seq=max_seq, log=lambda m: log(f"  {fmt}/{quant} {m}"))
    return path, time.perf_counter() - t0


def _sizes(path: Path) -> dict:
    m = json.loads((path / "manifest.json").read_text())
    return {"model_file_bytes": m["files"][m["model_file"]]["bytes"],
            "bundle_bytes": sum(f["bytes"] for f in m["files"].values()) + (path / "manifest.json").stat().st_size}


def _decode(llm, ids: list[int], gen: int) -> float:
    llm.reset()
    out = llm.generate(ids, max_tokens=gen, ignore_eos=True)
    assert len(out.token_ids) == gen
    return out.stats.decode_tps, out.token_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--formats", default="executorch,onnx")
    ap.add_argument("--quants", default="none,int8,8da4w")
    ap.add_argument("--max-seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--bundles-dir", default="bench_results/bundles")
    ap.add_argument("--skip", default="", help="format-quant pairs to leave out, e.g. executorch-int8")
    ap.add_argument("--reexport", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import pydoc_data.topics as topics
    import torch

    import edge_rt
    from edge_rt.export.runtime import VERIFY_PROMPTS, compare_logits, load_bundle

    torch.set_num_threads(args.threads)
    root = Path(args.bundles_dir)
    bundles, export_s = {}, {}
    for fmt in args.formats.split(","):
        for quant in args.quants.split(","):
            name = f"{fmt}-{quant}"
            if name in args.skip.split(","):
                continue
            bundles[name], export_s[name] = _bundle(args.model, root, fmt, quant, args.max_seq, args.reexport)

    engines = {
        "torch-fp32": edge_rt.load(args.model, device="cpu", dtype="float32", quantized=False,
                                   n_ctx=args.max_seq, threads=args.threads),
        "torch-default": edge_rt.load(args.model, device="cpu", n_ctx=args.max_seq, threads=args.threads),
    }
    for name, path in bundles.items():
        engines[name] = load_bundle(path, threads=args.threads)
    ref = engines["torch-fp32"]
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    all_ids = ref.tokenizer.encode(text)
    prompt = all_ids[: args.prompt_tokens]

    log("quality: logits vs torch-fp32 on the verify prompts, perplexity")
    verify_ids = [ref.tokenizer.encode(p, parse_special=True) for p in VERIFY_PROMPTS]
    ppl_ids = all_ids[: args.ppl_tokens]
    ppl_ref = ref.perplexity(ppl_ids, window=args.max_seq)
    quality = {"torch-fp32": {"perplexity": ppl_ref}}
    for name in bundles:
        llm = engines[name]
        q = compare_logits(ref.backend, llm.backend, verify_ids)
        q["perplexity"] = llm.perplexity(ppl_ids, window=args.max_seq)
        q["perplexity_ratio"] = q["perplexity"] / ppl_ref
        quality[name] = q
        log(f"  {name}: {q}")

    log("decode: engines alternate each round")
    tps = {name: [] for name in engines}
    tokens = {}
    for rep in range(-1, args.reps):  # rep -1: untimed warm-up
        for name, llm in engines.items():
            t, ids = _decode(llm, prompt, args.gen_tokens)
            tokens[name] = ids
            if rep >= 0:
                tps[name].append(t)
        if rep >= 0:
            log(f"  rep {rep}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in tps.items()))

    same = {name: ids == tokens["torch-fp32"] for name, ids in tokens.items()}
    result = {
        "benchmark": "bench_export",
        "command": invoked_command(),
        "machine": machine_info(),
        "config": vars(args) | {"model": str(ref.source.path)},
        "decode_tokens_per_s": {name: summarize(v) for name, v in tps.items()},
        "greedy_tokens_equal_torch_fp32": same,
        "sizes": {name: _sizes(p) for name, p in bundles.items()},
        "export_s": export_s,
        "quality": quality,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
