"""The llama.cpp backend (backends/llamacpp.py) against llama-cpp-python's own loop and itself.

References: llama_cpp.Llama's greedy loop (eval one token at a time, argmax of its logits) for
the tokens; the backend's own one-token forwards for verify chunks; a fresh forward for trim and
reset. Run with -s to see the batch-invariance figures (docs/NOTES.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edge_rt.errors import ContextOverflowError, InvalidOptionError, ModelFormatError, ModelNotFoundError
from edge_rt.generation.engine import Engine, GenerationConfig

pytestmark = pytest.mark.llamacpp

N_CTX = 512
THREADS = 2
CODE = 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
STORY = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
FACTS = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    from edge_rt.loading.gguf import open_gguf
    from edge_rt.loading.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(open_gguf(smollm2_path).metadata)


@pytest.fixture(scope="module")
def backends(smollm2_path, llama_cpp_module):
    """{"exact": exact-mode backend (the default), "raw": one-row decodes left alone}."""
    from backends.llamacpp import LlamaCppBackend

    made = {mode: LlamaCppBackend(smollm2_path, N_CTX, threads=THREADS, exact=mode == "exact")
            for mode in ("exact", "raw")}
    yield made
    for b in made.values():
        b.close()


@pytest.fixture(scope="module")
def ref_llama(smollm2_path, llama_cpp_module):
    """llama-cpp-python's high-level Llama on the same file, same context, threads and batch."""
    return llama_cpp_module.Llama(smollm2_path, n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS,
                                  n_batch=512, logits_all=True, verbose=False)


@pytest.fixture(scope="module")
def prompts(tokenizer, pydoc_text):
    chat = tokenizer.encode("<|im_start|>user\nName three colors of the rainbow.<|im_end|>\n<|im_start|>assistant\n",
                            parse_special=True)
    return {"code": tokenizer.encode(CODE), "story": tokenizer.encode(STORY), "facts": tokenizer.encode(FACTS),
            "chat": chat, "pydoc": tokenizer.encode(pydoc_text[:3000])[:300]}


def llama_greedy(llama, prompt: list[int], n: int, widen: bool) -> list[int]:
    """llama_cpp.Llama's own greedy loop: eval the prompt, then one token at a time + argmax.

    widen: eval each new token together with the previous one (Llama.eval first removes every
    KV entry from n_tokens on, so stepping n_tokens back recomputes it) -- what the exact mode does.
    """
    llama.reset()
    llama.eval(prompt)
    out = [int(np.argmax(llama.scores[llama.n_tokens - 1]))]
    while len(out) < n:
        if widen:
            llama.n_tokens -= 1
            llama.eval([llama.input_ids[llama.n_tokens], out[-1]])
        else:
            llama.eval([out[-1]])
        out.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
    return out


def engine_greedy(backend, tokenizer, prompt: list[int], n: int) -> list[int]:
    backend.reset()
    engine = Engine(backend, tokenizer)
    pieces = engine.generate(prompt, GenerationConfig(max_tokens=n, ignore_eos=True))
    return [p.token_id for p in pieces if p.token_id is not None]


@pytest.mark.parametrize("mode", ["raw", "exact"])
def test_greedy_through_engine_matches_llama_cpp_loop(mode, backends, ref_llama, tokenizer, prompts):
    n = 32
    for name, ids in prompts.items():
        ours = engine_greedy(backends[mode], tokenizer, ids, n)
        theirs = llama_greedy(ref_llama, ids, n, widen=mode == "exact")
        assert ours == theirs, f"{mode} backend, prompt {name!r}: diverges at {_first_diff(ours, theirs)}"


def _first_diff(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _verify_vs_singles(backend, ids: list[int], prefix: int, T: int) -> tuple[float, int]:
    """(max |verify row - one-token forward|, number of rows whose argmax agrees)."""
    backend.reset()
    backend.forward(ids[:prefix])
    draft = ids[prefix : prefix + T]
    rows = backend.verify(draft)  # [T, V]
    assert rows.shape == (T, backend.vocab_size) and rows.dtype == torch.float32
    assert backend.trim(T) == T
    singles = torch.cat([backend.forward([t]) for t in draft])  # [T, V]
    assert backend.position == prefix + T
    return (rows - singles).abs().max().item(), int((rows.argmax(-1) == singles.argmax(-1)).sum())


@pytest.mark.parametrize("T", [2, 4, 8, 16])
def test_verify_chunk_vs_one_token_forwards(T, backends, prompts):
    """Exact mode: a T-token verify is bit-identical to T one-token forwards. Raw mode: measured."""
    ids = prompts["pydoc"]
    report = {}
    for mode in ("exact", "raw"):
        diffs = [_verify_vs_singles(backends[mode], ids, prefix, T) for prefix in (6, 100, 250)]
        report[mode] = {"max_abs_diff": max(d for d, _ in diffs), "argmax_agree": sum(a for _, a in diffs),
                        "rows": 3 * T}
    print(f"\nverify T={T}: {json.dumps(report)}")
    assert report["exact"]["max_abs_diff"] == 0.0
    assert backends["exact"].exact_verify and not backends["raw"].exact_verify


def test_batched_rows_do_not_depend_on_chunk_length(backends, prompts):
    """What exact mode rests on: a row of a multi-row decode is the same in chunks of 2..16 rows."""
    b, ids = backends["raw"], prompts["pydoc"]
    for prefix in (6, 250):
        b.reset()
        b.forward(ids[:prefix])
        full = b.forward(ids[prefix : prefix + 16], all_logits=True)
        for T in (2, 3, 8):
            b.trim(16 if T == 2 else b.position - prefix)
            got = b.forward(ids[prefix : prefix + T], all_logits=True)
            assert torch.equal(got, full[:T]), (prefix, T)


def test_long_forward_is_split_into_batches(smollm2_path, llama_cpp_module, backends, prompts):
    """n_batch=8: a 37-token forward runs as 5 decodes and gives the same logits as one decode."""
    from backends.llamacpp import LlamaCppBackend

    small = LlamaCppBackend(smollm2_path, N_CTX, threads=THREADS, n_batch=8)
    try:
        ids = prompts["pydoc"][:37]
        want = backends["exact"]
        want.reset()
        ref = want.forward(ids, all_logits=True)
        got = small.forward(ids, all_logits=True)
        assert got.shape == ref.shape == (37, want.vocab_size) and torch.equal(got, ref)
        small.reset()
        last = small.forward(ids)  # last row only
        assert last.shape == (1, want.vocab_size) and torch.equal(last[0], ref[-1])
    finally:
        small.close()


def test_trim_then_reforward_reproduces_logits(backends, prompts):
    for b in backends.values():
        ids = prompts["story"]
        b.reset()
        b.forward(ids[:5])
        first = b.forward(ids[5:], all_logits=True)
        n = len(ids) - 5
        assert b.trim(3) == 3 and b.position == len(ids) - 3
        assert torch.equal(b.forward(ids[-3:], all_logits=True), first[-3:])
        assert b.trim(n) == n and b.position == 5
        assert torch.equal(b.forward(ids[5:], all_logits=True), first)
        assert b.trim(0) == 0 and b.trim(10_000) == len(ids) and b.position == 0


def test_reset_and_kv_bytes(smollm2_path, backends, prompts):
    from edge_rt.loading.gguf import open_gguf

    a = open_gguf(smollm2_path).args
    b = backends["exact"]
    b.reset()
    fresh = b.forward(prompts["facts"])
    b.forward(prompts["code"])
    assert b.position == len(prompts["facts"]) + len(prompts["code"])
    b.reset()
    assert b.position == 0
    assert torch.equal(b.forward(prompts["facts"]), fresh)
    # f16 K and V for every layer and position of the context (llama.cpp allocates them up front)
    assert b.kv_bytes() == 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * N_CTX * 2


@pytest.mark.parametrize("bad, err, match", [
    ([-1], InvalidOptionError, "outside the vocabulary"),
    ([49152], InvalidOptionError, "outside the vocabulary"),
    ([5, 2**40], InvalidOptionError, "outside the vocabulary"),
    ([], InvalidOptionError, "at least one token"),
    ([1.5], InvalidOptionError, "not an integer"),
    (["a"], InvalidOptionError, "not an integer"),
    ([True], InvalidOptionError, "not an integer"),
    ([7] * (N_CTX + 1), ContextOverflowError, "exceed the context"),
])
def test_bad_ids_raise_before_reaching_c(bad, err, match, backends, prompts):
    b = backends["exact"]
    b.reset()
    before = b.forward(prompts["facts"])
    pos = b.position
    with pytest.raises(err, match=match):
        b.forward(bad)
    assert b.position == pos  # nothing reached llama.cpp: the cache is as it was
    b.trim(1)
    assert torch.equal(b.forward(prompts["facts"][-1:]), before)


def test_context_fills_exactly_then_overflows(backends):
    b = backends["raw"]
    b.reset()
    b.forward([7] * (N_CTX - 1))
    b.forward([8])
    assert b.position == N_CTX
    with pytest.raises(ContextOverflowError):
        b.forward([9])


def test_bad_files_are_one_line_errors(tmp_path, llama_cpp_module):
    from backends.llamacpp import LlamaCppBackend

    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    cases = [(text, ModelFormatError, "not a GGUF file"),
             (tmp_path / "missing.gguf", ModelNotFoundError, "no such file"),
             (tmp_path, ModelFormatError, "not a folder"), (corrupt, ModelFormatError, "could not load")]
    for path, err, match in cases:
        with pytest.raises(err, match=match) as e:
            LlamaCppBackend(path, 64)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidOptionError):
        LlamaCppBackend(text, 64, threads=0)


def test_api_load_with_llamacpp_backend(smollm2_path, backends, tokenizer):
    import edge_rt

    llm = edge_rt.load(smollm2_path, backend="llamacpp", n_ctx=N_CTX, threads=THREADS)
    assert llm.backend.name == "llamacpp" and llm.n_ctx == N_CTX
    out = llm.generate(FACTS, max_tokens=12, ignore_eos=True)
    assert out.token_ids == engine_greedy(backends["exact"], tokenizer, tokenizer.encode(FACTS), 12)
    info = llm.info()
    assert info["backend"] == "llamacpp" and info["memory"]["kv_cache_bytes"] == llm.backend.kv_bytes()
    assert 80e6 < info["memory"]["weights_bytes"] < 110e6  # the Q4_1 file's tensors as llama.cpp holds them
    chat = llm.session()  # second turn reuses the cached prefix through trim
    chat.send("Name a color.", max_tokens=8)
    chat.send("And another one?", max_tokens=8)
    assert llm.last_stats.cached_tokens > 0


@pytest.mark.parametrize("kwargs, err", [
    (dict(backend="bogus"), InvalidOptionError), (dict(backend="llamacpp", dtype="float32"), InvalidOptionError),
    (dict(backend="llamacpp", quantized=False), InvalidOptionError),
    (dict(backend="llamacpp", n_ctx=8), InvalidOptionError),
    (dict(backend="llamacpp", budget="1GB"), InvalidOptionError),
])
def test_api_load_rejects_bad_options(kwargs, err, smollm2_path):
    import edge_rt

    with pytest.raises(err):
        edge_rt.load(smollm2_path, **kwargs)


def test_api_load_rejects_non_gguf(tmp_path, llama_cpp_module):
    import edge_rt

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelFormatError, match="needs a GGUF file"):
        edge_rt.load(tmp_path, backend="llamacpp")


def test_cli_backend_option(smollm2_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "edge_rt", *args], capture_output=True, text=True,
                              timeout=300, env=os.environ)

    r = cli("run", FACTS, "--model", smollm2_path, "--backend", "llamacpp", "--max-tokens", "6", "--json",
            "--n-ctx", str(N_CTX), "--threads", str(THREADS))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "llamacpp" and out["generated_tokens"] == 6
    for args in (["--backend", "bogus"], ["--backend", "llamacpp", "--model", os.devnull]):
        r = cli("run", "hi", *args)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
