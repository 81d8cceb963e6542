"""Lossless speculative decoding: the tokens equal plain decoding of the same backend and weights.

Reference everywhere: plain decoding (one forward per token) of the same model in the same
process. Tiny random GGUF models (Q8_0, which runs on the packed int4 kernels as two exact
halves) cover the mechanics; tests/test_speculative_real.py runs the prompt suite on SmolLM2.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from gguf_fixtures import write_tiny_gguf

import edge_rt
from edge_rt.errors import InvalidOptionError
from edge_rt.generation.drafters import Draft, NgramDrafter, NgramIndex
from edge_rt.generation.sampling import Sampler, SamplingParams
from edge_rt.generation.speculative import DraftController, SpeculativeConfig, _walk


@pytest.fixture(scope="module", params=["pytorch", "native", "native_bf16", "native_vnni"])
def tiny(request, tmp_path_factory):
    """A tiny quantized model on each CPU int4 kernel: PyTorch's, and edge-rt's own three
    (models/int4_matmul.c; each skipped where this CPU cannot run it). Q8_0 (two 4-bit halves, or
    Int8Linear), or for native_vnni Q4_1 with a Q8_0 output layer."""
    from edge_rt.models import native_kernels

    if request.param != "pytorch" and not native_kernels.int4_available(request.param):
        pytest.skip(f"the {request.param} int4 kernel cannot run here (AVX2 + FMA, AVX-512 BF16 or VNNI, a C compiler)")
    # native_vnni: Q4_1 projections and a Q8_0 embedding (the tied output layer), as SmolLM2's GGUF
    kw = dict(qtype="Q4_1", tensor_types={"token_embd.weight": "Q8_0"}) if request.param == "native_vnni" else {}
    path = write_tiny_gguf(tmp_path_factory.mktemp("spec") / "tiny.gguf", **kw)
    old = os.environ.get("EDGE_RT_INT4_KERNEL")
    os.environ["EDGE_RT_INT4_KERNEL"] = request.param
    try:
        llm = edge_rt.load(path, device="cpu", n_ctx=256)
    finally:
        if old is None:
            del os.environ["EDGE_RT_INT4_KERNEL"]
        else:
            os.environ["EDGE_RT_INT4_KERNEL"] = old
    assert llm.backend.model.layers[0].attn.wqkv.kernel == {"pytorch": "cpu"}.get(request.param, request.param)
    return llm


def _prompts(n=12, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(3, 512) for _ in range(rng.randrange(2, 40))]
        out.append(ids + ids[: len(ids) // 2])  # a repeat, so lookups find matches
    return out


class OracleDrafter:
    """Proposes the plain-decoding continuation with every `every`-th token corrupted.

    Real numerics, controlled acceptance: exercises long accepted runs, rejections at every
    position of a chunk, the bonus token and the rollback of rejected KV entries.
    """

    name = "oracle"

    def __init__(self, prompt, plain, every=5):
        self.full = list(prompt) + list(plain)
        self.every = every

    def begin(self, context):
        pass

    def observe(self, context):
        pass

    def propose(self, context, k):
        n = len(context)
        toks = self.full[n : n + k]
        toks = [(t + 1) % 512 if (n + i) % self.every == 0 else t for i, t in enumerate(toks)]
        return Draft(toks, level=1)


def _run(llm, ids, spec=None, **opts):
    from edge_rt.generation.engine import GenerationConfig

    cfg = llm._config(**opts)
    pieces = list(llm.engine.generate(ids, cfg, spec))
    return [p.token_id for p in pieces if p.token_id is not None], pieces[-1].finish_reason


def test_int4_backend_is_marked_exact_and_dense_is_not(tiny, tmp_path):
    assert tiny.backend.exact_verify
    dense = edge_rt.load(tiny.source.path, device="cpu", n_ctx=64, quantized=False, dtype="float32")
    assert not dense.backend.exact_verify


@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_verify_rows_equal_one_token_forwards_bit_for_bit(tiny, attention, monkeypatch):
    """Both attention paths: the C kernel (one call per layer) and PyTorch's SDPA one query at a time."""
    from edge_rt.models import native_kernels

    if attention == "sdpa":
        monkeypatch.setattr(native_kernels, "available", lambda: False)
    elif not native_kernels.available():
        pytest.skip("native attention not built (no C compiler)")
    be = tiny.backend
    ids = _prompts(1)[0]
    be.reset()
    be.forward(ids[:5])
    singles = torch.stack([be.forward([t])[0] for t in ids[5:21]])
    be.trim(16)
    rows = be.verify(ids[5:21])
    assert torch.equal(rows, singles)
    be.reset()


def test_lazy_verify_rows_equal_the_full_chunk_and_skip_the_second_block(tiny):
    """verify_rows computes logits head_block rows at a time, only when read; every row equals
    the full verify's, and a walk that stops in the first block never runs the second."""
    be = tiny.backend
    # PyTorch's int4 CPU kernel reads the weights once per 4 rows; the native one once per call
    block = 4 if be.model.lm_head.kernel == "cpu" else None
    assert be.head_block == block
    ids = _prompts(1)[0]
    be.reset()
    be.forward(ids[:5])
    full = be.verify(ids[5:13])
    be.trim(8)
    rows = be.verify_rows(ids[5:13])
    assert len(rows) == 8 and not rows.done
    first = [4] if block else [8]
    assert torch.equal(rows[2], full[2]) and [p.shape[0] for _, p in rows.done] == first
    assert torch.equal(rows[5], full[5]) and [p.shape[0] for _, p in rows.done] == ([4, 4] if block else [8])
    assert torch.equal(rows.logits(8), full)
    with pytest.raises(IndexError):
        rows[8]
    be.reset()


def test_verify_costs_expect_the_second_block_only_when_reached():
    from edge_rt.generation.speculative import VerifyCosts

    full = [0.0, 1.0, 1.1, 1.2, 1.3, 2.6, 2.7, 2.8, 2.9]
    first = [0.0, 1.0, 1.1, 1.2, 1.3, 2.0, 2.1, 2.2, 2.3]
    c = VerifyCosts(full, first, block=4)
    assert c.expected(3, 0.5) == 1.2  # inside the first block: one output-layer call
    assert c.expected(8, 0.0) == 2.3 and c.expected(8, 1.0) == 2.9
    assert c.expected(8, 0.5) == pytest.approx(2.3 + 0.5 ** 4 * 0.6)
    assert VerifyCosts(full).expected(8, 0.5) == 2.9  # no lazy rows: the full chunk
    # the controller drafts longer when the rows past a rejection cost nothing
    assert DraftController(c, 7).length(1, 7) >= DraftController(VerifyCosts(full), 7).length(1, 7)


@pytest.mark.parametrize("opts", [
    dict(),  # greedy
    dict(temperature=0.9, seed=7),
    dict(temperature=0.7, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.3, seed=3),
])
def test_ngram_speculation_reproduces_plain_decoding(tiny, opts):
    for ids in _prompts():
        plain = tiny.generate(ids, max_tokens=48, ignore_eos=True, **opts)
        fast = tiny.generate(ids, max_tokens=48, ignore_eos=True, speculative="ngram", **opts)
        assert fast.token_ids == plain.token_ids
        assert fast.stats.speculative.method == "ngram"


@pytest.mark.parametrize("every", [2, 3, 7, 1000])
@pytest.mark.parametrize("opts", [dict(), dict(temperature=0.8, seed=11, repetition_penalty=1.2)])
def test_long_accepted_runs_and_rejections_reproduce_plain_decoding(tiny, every, opts):
    from edge_rt.generation.speculative import Speculation

    for ids in _prompts(4, seed=every):
        plain, finish = _run(tiny, ids, max_tokens=40, ignore_eos=True, **opts)
        spec = Speculation(OracleDrafter(ids, plain, every), SpeculativeConfig("ngram", max_draft=8, adaptive=False))
        fast, finish2 = _run(tiny, ids, spec, max_tokens=40, ignore_eos=True, **opts)
        assert (fast, finish2) == (plain, finish)
        st = spec.stats
        assert st.accepted > 0 and (every > 40 or st.accepted < st.drafted)
        # the engine's mirror of the cache is what the backend holds: prefix reuse stays correct
        assert tiny.backend.position == len(tiny.engine.tokens)
        again, _ = _run(tiny, ids, max_tokens=40, ignore_eos=True, **opts)
        assert again == plain


def test_reference_copy_reproduces_plain_and_copies(tiny):
    ids = _prompts(1, seed=5)[0]
    plain = tiny.generate(ids, max_tokens=40, ignore_eos=True)
    # a document that holds part of the answer (as ids: the random model's bytes are not text)
    reference = [300, 301] + plain.token_ids[4:24] + [302]
    # fixed draft length: the adaptive controller follows measured costs, which a loaded machine skews
    cfg = SpeculativeConfig("reference", max_draft=8, adaptive=False)
    fast = tiny.generate(ids, max_tokens=40, ignore_eos=True, speculative=cfg, references=[reference])
    assert fast.token_ids == plain.token_ids
    assert fast.stats.speculative.method == "reference"
    assert fast.stats.speculative.accepted >= 8
    auto = tiny.generate(ids, max_tokens=40, ignore_eos=True, speculative="reference", references=[reference])
    assert auto.token_ids == plain.token_ids


def test_stop_strings_max_tokens_and_context_end_like_plain(tiny):
    ids = _prompts(1, seed=9)[0]
    plain = tiny.generate(ids, max_tokens=30, ignore_eos=True)
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 3]
    for opts in (dict(stop=[stop]), dict(max_tokens=1), dict(max_tokens=2), dict(max_tokens=17)):
        opts = dict(dict(max_tokens=30, ignore_eos=True), **opts)
        a, b = tiny.generate(ids, **opts), tiny.generate(ids, speculative="ngram", **opts)
        assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    # the context fills up inside a draft: the same tokens, finish "context"
    long = (ids * 40)[: tiny.n_ctx - 20]
    a = tiny.generate(long, max_tokens=64, ignore_eos=True)
    b = tiny.generate(long, max_tokens=64, ignore_eos=True, speculative="ngram")
    assert a.finish_reason == b.finish_reason == "context"
    assert a.token_ids == b.token_ids


def test_chat_session_with_speculation_matches_plain_session(tiny):
    turns = ["hello there", "say that again", "and once more"]
    plain, fast = tiny.session("sys"), tiny.session("sys")
    for t in turns:
        a = plain.send(t, max_tokens=24)
        b = fast.send(t, max_tokens=24, speculative="ngram")
        assert a == b


def test_draft_model_greedy_reproduces_plain(tiny, tmp_path, monkeypatch):
    # draft models load on the target's int4 kernel, so the target as its own draft agrees exactly
    kernel = tiny.backend.model.layers[0].attn.wqkv.kernel
    monkeypatch.setenv("EDGE_RT_INT4_KERNEL", {"cpu": "pytorch"}.get(kernel, kernel))
    draft = write_tiny_gguf(tmp_path / "draft.gguf", qtype="Q4_0", num_hidden_layers=1)
    for ids in _prompts(5, seed=2):
        plain = tiny.generate(ids, max_tokens=32, ignore_eos=True)
        fast = tiny.generate(ids, max_tokens=32, ignore_eos=True, speculative=f"draft:{draft}")
        assert fast.token_ids == plain.token_ids
        assert fast.stats.speculative.method == "draft"
    # a draft model that is the target itself is always right
    same = tiny.generate(ids, max_tokens=32, ignore_eos=True, speculative=f"draft:{tiny.source.path}",
                         max_draft=4)
    assert same.token_ids == plain.token_ids
    assert same.stats.speculative.acceptance_rate == 1.0


def test_layerskip_search_saves_a_set_and_reproduces_plain(tiny, tmp_path, monkeypatch, pydoc_text):
    from edge_rt.generation.layerskip import load_skip_set, search_skip_set

    monkeypatch.setenv("EDGE_RT_HOME", str(tmp_path))
    with pytest.raises(InvalidOptionError, match="layerskip-search"):
        tiny.generate([5, 6, 7], speculative="layerskip")
    record = search_skip_set(tiny, pydoc_text[:3000], tokens=64)
    assert set(record["skip"]) == set(load_skip_set(tiny))
    if not record["skip"]:  # nothing paid off: force one skipped layer to exercise the drafter
        import json
        from pathlib import Path

        data = json.loads(Path(record["path"]).read_text())
        data["skip"] = [1]
        Path(record["path"]).write_text(json.dumps(data))
    for ids in _prompts(4, seed=4):
        plain = tiny.generate(ids, max_tokens=32, ignore_eos=True)
        fast = tiny.generate(ids, max_tokens=32, ignore_eos=True, speculative="layerskip", max_draft=4)
        assert fast.token_ids == plain.token_ids
        assert fast.stats.speculative.method == "layerskip"
        assert tiny.backend.position == len(tiny.engine.tokens)
        assert len({c.offset for c in tiny.backend.caches}) == 1  # every layer rolled back to one length


# --- speculative sampling keeps the distribution ------------------------------------------------


def _chi2_ok(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> bool:
    """Pearson chi-square goodness of fit at significance 0.001 (bins with small expectation pooled)."""
    n = counts.sum()
    exp = probs * n
    big = exp >= min_expected
    obs_b = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_b = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_b > 0
    stat = float(((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]).sum())
    dof = int(keep.sum()) - 1
    # Wilson-Hilferty approximation of the chi-square quantile at 0.999
    z = 3.090
    crit = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    return stat < crit


@pytest.mark.parametrize("case", ["close", "far", "disjoint"])
def test_rejection_rule_keeps_the_target_distribution(case):
    """Leviathan/Chen: the first emitted token is distributed as p, whatever q proposed."""
    V, N = 12, 30000
    g = torch.Generator().manual_seed(0)
    p_logits = torch.randn(2, V, generator=g) * 1.5
    q = torch.softmax(p_logits[0] + {"close": 0.3, "far": 2.0, "disjoint": 0.0}[case] * torch.randn(V, generator=g), -1)
    if case == "disjoint":  # q proposes only tokens p rarely wants
        q = torch.zeros(V)
        q[torch.argsort(p_logits[0])[:3]] = 1 / 3
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1))
    p = torch.softmax(p_logits[0], -1)
    counts = torch.zeros(V)
    for _ in range(N):
        d = int(torch.multinomial(q, 1, generator=g))
        out, _ = _walk(p_logits, Draft([d], q[None], 0), sampler, [])
        counts[out[0]] += 1
    assert _chi2_ok(counts, p)


def test_speculative_sampling_with_a_draft_model_keeps_the_distribution(tiny, tmp_path):
    """On the tiny model: a sampling draft model proposes, the target verifies; the token the step
    emits first follows the target's own sampling distribution (chi-square over many draws)."""
    from edge_rt.generation.drafters import ModelDrafter

    draft_path = write_tiny_gguf(tmp_path / "d.gguf", qtype="Q4_0", seed=3, num_hidden_layers=1)
    draft = edge_rt.load(draft_path, device="cpu", n_ctx=256)
    params = SamplingParams(temperature=1.0, top_k=8, seed=5)
    context = [5, 17, 33, 5, 17, 40]
    be = tiny.backend
    be.reset()
    tiny.engine.tokens = []
    be.forward(context[:-1])
    p = Sampler(params).probs(be.verify([context[-1]])[0])  # the target's next-token distribution
    be.trim(1)
    drafter = ModelDrafter(draft.backend, Sampler(SamplingParams(temperature=1.0, top_k=8, seed=9)))
    sampler = Sampler(params)
    counts = torch.zeros(p.shape[0])
    for _ in range(1500):
        d = drafter.propose(context, 2)
        assert d.probs is not None and d.probs.shape == (2, p.shape[0])
        rows = be.verify([context[-1]] + d.tokens)
        be.trim(1 + len(d.tokens))
        out, _ = _walk(rows, d, sampler, list(context))
        counts[out[0]] += 1
    be.reset()
    assert _chi2_ok(counts, p)


# --- pieces -------------------------------------------------------------------------------------


def test_ngram_index_finds_the_longest_earlier_match_and_copies_through_the_end():
    idx = NgramIndex(3, [1, 2, 3, 4, 1, 2, 3])
    n, start = idx.match([1, 2, 3])
    assert (n, start) == (3, 3)  # "1 2 3" was followed by 4
    assert idx.copy(start, 6, wrap=True) == [4, 1, 2, 3, 4, 1]  # the context: runs into its end, repeats the cycle
    assert idx.copy(start, 6, wrap=False) == [4, 1, 2, 3]  # a reference just ends
    assert idx.match([9]) == (0, -1)
    d = NgramDrafter(max_n=3, references=[[7, 8, 9, 10, 11]])
    d.begin([5, 6, 8, 9])
    assert d.propose([5, 6, 8, 9], 3).tokens == [10, 11]  # copied from the reference
    assert d.propose([5, 6, 8, 9], 3).level == 2


def test_controller_drafts_more_when_acceptance_is_high_and_switches_off_when_low():
    costs = [0.0] + [0.010 * (1 + 0.08 * (t - 1)) for t in range(1, 18)]  # a cheap verify
    c = DraftController(costs, max_draft=12)
    for _ in range(20):
        c.update(3, 8, 8)
    assert c.length(3, 12) >= 8
    for _ in range(30):
        c.update(1, 4, 0)
    ks = [c.length(1, 12) for _ in range(16)]
    assert ks.count(0) >= 14 and max(ks) <= 2  # off, with an occasional short probe
    expensive = [0.0] + [0.010 * t for t in range(1, 18)]  # verify costs as much as plain steps
    assert DraftController(expensive, 12).length(2, 12) == 0


@pytest.mark.parametrize("opts, match", [
    (dict(speculative="fast"), "speculative method"),
    (dict(speculative="ngram", max_draft=0), "max_draft"),
    (dict(speculative="ngram", max_draft=99), "max_draft"),
    (dict(speculative="reference"), "needs references"),
    (dict(speculative="reference", references="just a string"), "list of strings"),
    (dict(speculative="draft:"), "draft model"),
    (dict(speculative=3), "speculative must be"),
])
def test_bad_speculative_options_are_one_line_errors(tiny, opts, match):
    with pytest.raises(InvalidOptionError, match=match):
        tiny.generate([5, 6, 7], max_tokens=4, **opts)


def test_dense_weights_refuse_explicit_speculation_and_auto_falls_back_to_plain(tiny):
    dense = edge_rt.load(tiny.source.path, device="cpu", n_ctx=64, quantized=False, dtype="float32")
    with pytest.raises(InvalidOptionError, match="bit-exact"):
        dense.generate([5, 6, 7], max_tokens=4, speculative="ngram")
    out = dense.generate([5, 6, 7], max_tokens=4, speculative="auto")
    assert out.stats.speculative is None


def test_draft_model_with_another_vocabulary_is_refused(tiny, tmp_path):
    other = write_tiny_gguf(tmp_path / "other.gguf", vocab_size=600)
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        tiny.generate([5, 6, 7], max_tokens=4, speculative=f"draft:{other}")


# --- the command line ---------------------------------------------------------------------------


def test_cli_speculative_run_matches_plain_and_reports_stats(tiny, tmp_path):
    import json
    import subprocess
    import sys

    ref = tmp_path / "ref.txt"
    ref.write_text("The quick brown fox jumps over the lazy dog.")

    def run(*extra):
        r = subprocess.run([sys.executable, "-m", "edge_rt", "run", "The quick brown fox", "--model",
                            str(tiny.source.path), "-n", "24", "--json", *extra], capture_output=True, text=True,
                           timeout=300)
        return r

    plain, fast = run("--speculative", "none"), run("--speculative", "reference", "--reference", str(ref),
                                                    "--max-draft", "6")
    default = run()  # the CLI default is "auto": same tokens as plain
    assert plain.returncode == fast.returncode == default.returncode == 0, fast.stderr + default.stderr
    p, f = json.loads(plain.stdout.splitlines()[-1]), json.loads(fast.stdout.splitlines()[-1])
    d = json.loads(default.stdout.splitlines()[-1])
    assert f["token_ids"] == p["token_ids"] == d["token_ids"] and p["speculative"] is None
    assert d["speculative"]["method"] in ("ngram", "reference")  # what auto picked
    sp = f["speculative"]
    assert sp["method"] == "reference" and sp["verify_steps"] + sp["plain_steps"] >= 1
    assert {"acceptance_rate", "mean_accepted_per_verify", "draft_s", "accepted_length_histogram"} <= set(sp)
    for bad, msg in ((["--speculative", "warp"], "speculative method"), (["--max-draft", "0"], "max_draft"),
                     (["--speculative", "reference", "--reference", str(tmp_path / "none.txt")], "cannot read")):
        r = run(*bad)
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr


def test_engine_notices_a_backend_driven_directly(tiny):
    """Driving llm.backend by hand (as `edge-rt verify` does) must not let prefix reuse trust a stale mirror."""
    ids = _prompts(1, seed=8)[0]
    tiny.reset()
    want = tiny.generate(ids, max_tokens=12, ignore_eos=True).token_ids
    tiny.backend.reset()
    tiny.backend.forward([7, 8, 9])  # the engine's mirror still lists the previous prompt
    assert tiny.generate(ids, max_tokens=12, ignore_eos=True).token_ids == want
