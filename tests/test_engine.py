"""The engine and sampler: stop rules, streaming, prefix reuse, rollback, sampling math."""

import math

import pytest
import torch

from edge_rt.errors import ContextOverflowError, InvalidOptionError
from edge_rt.generation.engine import Engine, GenerationConfig, _stop_holdback
from edge_rt.generation.sampling import Sampler, SamplingParams

V = 32


class ScriptedBackend:
    """A backend whose next token is a fixed function of the last token: (t * 7 + 3) % V."""

    name = "scripted"
    vocab_size = V

    def __init__(self, n_ctx=64):
        self.n_ctx = n_ctx
        self.cache: list[int] = []
        self.forwarded = 0

    @property
    def position(self):
        return len(self.cache)

    def forward(self, tokens, all_logits=False):
        self.cache.extend(tokens)
        self.forwarded += len(tokens)
        rows = [torch.nn.functional.one_hot(torch.tensor((t * 7 + 3) % V), V).float() * 10 for t in tokens]
        out = torch.stack(rows)
        return out if all_logits else out[-1:]

    def trim(self, n):
        n = min(n, len(self.cache))
        del self.cache[len(self.cache) - n :]
        return n

    def reset(self):
        self.cache = []

    def kv_bytes(self):
        return len(self.cache)


class CharTokenizer:
    """Token i is the character chr(ord('a') + i); token 0 is the stop token."""

    stop_ids = frozenset({0})

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)

    def stream_decoder(self):
        tok = self

        class D:
            def push(self, i):
                return tok.decode([i])

            def flush(self):
                return ""

        return D()


def nxt(t):
    return (t * 7 + 3) % V


def expected(start, n):
    out, t = [], start
    for _ in range(n):
        t = nxt(t)
        out.append(t)
    return out


def run(engine, prompt, **kw):
    pieces = list(engine.generate(prompt, GenerationConfig(**kw)))
    return "".join(p.text for p in pieces), [p.token_id for p in pieces if p.token_id is not None], pieces[-1]


def test_greedy_follows_backend_and_max_tokens():
    eng = Engine(ScriptedBackend(), CharTokenizer())
    text, ids, last = run(eng, [1, 2], max_tokens=6)
    assert ids == expected(2, 6)
    assert text == CharTokenizer().decode(ids)
    assert last.finish_reason == "length"
    assert eng.last_stats.generated_tokens == 6 and eng.last_stats.prompt_tokens == 2


def test_stop_string_cuts_text_and_is_held_back_while_pending():
    eng = Engine(ScriptedBackend(), CharTokenizer())
    full, _, _ = run(eng, [1], max_tokens=10)
    stop = full[4:6]
    eng.reset()
    pieces = list(eng.generate([1], GenerationConfig(max_tokens=10, stop=(stop,))))
    assert "".join(p.text for p in pieces) == full[:4]
    assert pieces[-1].finish_reason == "stop"
    # no piece ever emitted part of the stop string
    assert all(stop[0] not in p.text for p in pieces)


def test_stop_token_ends_generation():
    # token 0 is reached from 13: 13*7+3 = 94 = 30 mod 32... find a start that reaches 0
    start = next(t for t in range(V) if nxt(t) == 0)
    eng = Engine(ScriptedBackend(), CharTokenizer())
    text, ids, last = run(eng, [start], max_tokens=5)
    assert ids == [] and last.finish_reason == "stop"
    text, ids, last = run(eng, [start], max_tokens=3, ignore_eos=True)
    assert ids[0] == 0 and last.finish_reason == "length"


def test_prefix_reuse_prefills_only_the_new_part():
    be = ScriptedBackend()
    eng = Engine(be, CharTokenizer())
    run(eng, [1, 2, 3, 4], max_tokens=3)
    before = be.forwarded
    run(eng, [1, 2, 3, 4, 9, 9], max_tokens=1)
    assert eng.last_stats.cached_tokens == 4
    assert be.forwarded - before == 2  # only [9, 9]
    assert be.cache == [1, 2, 3, 4, 9, 9]


def test_trim_then_regenerate_reproduces_tokens():
    be = ScriptedBackend()
    eng = Engine(be, CharTokenizer())
    _, first, _ = run(eng, [5], max_tokens=8)
    eng.backend.trim(4)
    del eng.tokens[-4:]
    _, again, _ = run(eng, [5], max_tokens=8)
    assert again == first


def test_context_policies():
    eng = Engine(ScriptedBackend(n_ctx=8), CharTokenizer())
    with pytest.raises(ContextOverflowError):
        run(eng, list(range(1, 9)), max_tokens=1)
    _, ids, last = run(eng, [1, 2, 3], max_tokens=50, ignore_eos=True)
    assert last.finish_reason == "context" and 3 + len(ids) == 9  # the last sampled token is not fed


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(stop=("",))])
def test_config_validation(bad):
    with pytest.raises(InvalidOptionError):
        GenerationConfig(**bad)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=1.0),
                                 dict(top_k=-1), dict(repetition_penalty=0), dict(seed=-1),
                                 dict(temperature=float("nan"))])
def test_sampling_validation(bad):
    with pytest.raises(InvalidOptionError):
        SamplingParams(**bad)


def test_holdback():
    assert _stop_holdback("hello wor", ["world"]) == 3
    assert _stop_holdback("hello", ["xyz"]) == 0


def test_sampling_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert Sampler(SamplingParams()).sample(logits) == 0
    p = Sampler(SamplingParams(temperature=1.0, top_k=2)).probs(logits)
    assert (p[2:] == 0).all() and p[:2].sum() == pytest.approx(1.0)
    sm = torch.softmax(logits, 0)
    p = Sampler(SamplingParams(temperature=1.0, top_p=0.8)).probs(logits)
    kept = int((p > 0).sum())
    assert sm[: kept - 1].sum() < 0.8 <= sm[:kept].sum()
    p = Sampler(SamplingParams(temperature=1.0, min_p=0.3)).probs(logits)
    assert ((p > 0) == (sm >= 0.3 * sm.max())).all()
    # repetition penalty: a repeated positive logit is divided, a negative one multiplied
    pen = Sampler(SamplingParams(repetition_penalty=2.0)).penalize(logits, [0, 4])
    assert pen[0] == 1.5 and pen[4] == -2.0 and pen[1] == 2.0
    assert Sampler(SamplingParams(repetition_penalty=4.0)).sample(logits, [0]) == 1


def test_seeded_sampling_is_reproducible_and_matches_distribution():
    torch.manual_seed(0)
    logits = torch.randn(8) * 1.5
    a = Sampler(SamplingParams(temperature=0.9, seed=7))
    b = Sampler(SamplingParams(temperature=0.9, seed=7))
    draws_a = [a.sample(logits) for _ in range(4000)]
    assert draws_a[:200] == [b.sample(logits) for _ in range(200)]
    probs = torch.softmax(logits / 0.9, 0)
    counts = torch.bincount(torch.tensor(draws_a), minlength=8).float()
    expected_counts = probs * len(draws_a)
    chi2 = float(((counts - expected_counts) ** 2 / expected_counts).sum())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001
