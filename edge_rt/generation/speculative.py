"""Lossless speculative decoding: drafters propose, one verifier accepts. Backend-independent.

Each step holds a pending token (sampled, not yet in the KV cache). The drafter guesses k tokens
that follow it; the backend's `verify([pending, d_1..d_k])` returns the target's logits for all
k + 1 positions in one forward, and the verifier walks them:

- deterministic drafts (n-gram, reference, layer skip, greedy draft model): at position i sample
  y_i from the target exactly as plain decoding would (same sampler, same history, same random
  stream), accept while y_i == d_i; the first differing y_i (or the bonus y_k) becomes the next
  pending token. Every emitted token is the sample plain decoding would draw, so the output is
  token-for-token identical to plain decoding, greedy or seeded sampling alike, provided the
  backend's verify rows equal its one-token forwards bit for bit (`backend.exact_verify`).
- drafts with a distribution q (a draft model sampling): the Leviathan/Chen rule: accept d_i with
  probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection draw from norm(max(0, p_i - q_i));
  if all are accepted draw the bonus from p_k. The output distribution is the target's.

The KV entries of rejected drafts are trimmed right after the walk. The draft length follows the
measured acceptance (per drafter level) and the measured cost of verify chunks on this backend
(`DraftController`); it drops to 0 (plain decoding) where drafting does not pay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from edge_rt.errors import InvalidOptionError
from edge_rt.generation.drafters import Draft
from edge_rt.generation.sampling import Sampler

METHODS = ("none", "auto", "ngram", "reference", "layerskip", "draft")
MAX_DRAFT = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    """Which drafter, how far it may guess, and whether the length adapts.

    method: none | auto | ngram | reference | layerskip | draft. `auto` picks reference copy when
        references are given, else n-gram lookup (with the saved layer-skip set where one exists).
    draft: path of the draft model (method "draft").
    max_draft: longest draft (1..16).
    adaptive: choose each step's draft length from acceptance and verify cost (else always max_draft).
    """

    method: str = "none"
    draft: str | None = None
    max_draft: int = 10
    adaptive: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidOptionError(f"speculative method must be one of {', '.join(METHODS)} or draft:PATH, "
                                     f"got {self.method!r}")
        if self.method == "draft" and not self.draft:
            raise InvalidOptionError("speculative method 'draft' needs a draft model: use draft:PATH")
        if not isinstance(self.max_draft, int) or not 1 <= self.max_draft <= MAX_DRAFT:
            raise InvalidOptionError(f"max_draft must be an integer in [1, {MAX_DRAFT}], got {self.max_draft!r}")

    @classmethod
    def parse(cls, spec: "str | SpeculativeConfig | None", **kw) -> "SpeculativeConfig":
        """'none' | 'auto' | 'ngram' | 'reference' | 'layerskip' | 'draft:PATH' -> config."""
        if isinstance(spec, SpeculativeConfig):
            return spec
        if spec is None:
            return cls("none", **kw)
        if not isinstance(spec, str):
            raise InvalidOptionError(f"speculative must be a string such as 'ngram' or 'draft:PATH', got {spec!r}")
        method, _, path = spec.partition(":")
        if method == "draft" or path:
            return cls("draft", draft=path or None, **kw)
        return cls(method, **kw)


@dataclass
class SpecStats:
    """What speculation did in one generation (reported by `run --json` and `/stats`)."""

    method: str = "none"
    verify_steps: int = 0  # target forwards that verified a draft (k >= 1)
    plain_steps: int = 0  # target forwards without a draft
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    draft_s: float = 0.0  # time spent drafting
    verify_s: float = 0.0  # time in target forwards (verify and plain) and the walks over their rows
    calibration_s: float = 0.0  # one-time measurement of verify costs on this backend
    accepted_lengths: dict[int, int] = field(default_factory=dict)  # accepted drafts per verify step -> count

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens emitted per target forward (1.0 = plain decoding)."""
        steps = self.verify_steps + self.plain_steps
        return (self.accepted + steps) / steps if steps else 0.0

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_per_verify": self.accepted / self.verify_steps if self.verify_steps else 0.0,
            "tokens_per_forward": self.tokens_per_step,
            "verify_steps": self.verify_steps,
            "plain_steps": self.plain_steps,
            "drafted_tokens": self.drafted,
            "accepted_tokens": self.accepted,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "calibration_s": self.calibration_s,
            "accepted_length_histogram": {str(k): v for k, v in sorted(self.accepted_lengths.items())},
        }


class VerifyCosts(list):
    """Seconds per verify chunk, [0, c(1), ..., c(n)], every row's logits read (a list, as before).

    Backends that compute a chunk's logits on demand, `block` rows per output-layer call
    (`verify_rows`, `head_block`), also have `first`: the same chunks when only the rows of the first
    block are read, which is what a step costs when a draft is rejected inside that block.
    """

    def __init__(self, full, first=None, block: int | None = None):
        super().__init__(full)
        self.first = list(first) if first is not None else list(full)
        self.block = block

    def expected(self, t: int, a: float) -> float:
        """Expected cost of a t-token chunk (t - 1 drafts) at per-token acceptance a: the rows past
        the first block are computed only when its drafts are all accepted (probability a^block)."""
        if self.block is None or t <= self.block:
            return self[t]
        return self.first[t] + a ** self.block * (self[t] - self.first[t])


def verify_rows(backend, tokens):
    """The backend's lazily computed verify rows where it has them (`rows[i]`), else its tensor."""
    fn = getattr(backend, "verify_rows", None)
    return fn(tokens) if fn is not None else backend.verify(tokens)


def measure_verify_costs(backend, max_chunk: int, reps: int = 2) -> VerifyCosts:
    """Seconds for verify chunks of 1..max_chunk tokens at the backend's current position.

    Every size is measured (best of `reps` after one warm-up): the cost is not linear in the
    chunk length (PyTorch's int4 CPU kernel works in blocks of 4 rows, so 4 rows cost about what
    2 do), and the controller should see the steps. Where the backend computes logits on demand
    (`head_block`), each size is also measured reading only the first block's rows. The cache is
    left as it was.
    """
    block = getattr(backend, "head_block", None) if hasattr(backend, "verify_rows") else None
    room = backend.n_ctx - backend.position
    sizes = range(1, max(1, min(max_chunk, room)) + 1)
    backend.verify([0])
    backend.trim(1)
    full, first = [0.0], [0.0]
    for t in sizes:
        kinds = [(full, t)] + ([(first, block)] if block is not None and t > block else [])
        for table, read in kinds:
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                verify_rows(backend, [0] * t)[read - 1]
                best = min(best, time.perf_counter() - t0)
                backend.trim(t)
            table.append(best)
        if len(first) < len(full):
            first.append(full[-1])
    for table in (full, first):
        while len(table) <= max_chunk:  # no room to measure longer chunks: extrapolate linearly
            table.append(table[-1] * len(table) / (len(table) - 1))
    return VerifyCosts(full, first, block)


class DraftController:
    """Chooses the draft length k per step: maximize expected tokens per second.

    Acceptance is modelled per drafter level as independent per-token acceptance a (success and
    failure counts with exponential forgetting). With cost c(t) of verifying t tokens and d per
    drafted token, k tokens yield (1 - a^(k+1)) / (1 - a) tokens for c(k+1) + k d seconds; k = 0 is
    plain decoding at c(1). A level whose best k is 0 is re-probed with a short draft now and then,
    so drafting turns itself back on when the text becomes predictable.
    """

    DECAY = 0.9
    PROBE_EVERY = 8

    def __init__(self, costs: Sequence[float], max_draft: int, adaptive: bool = True, draft_cost: float = 0.0):
        self.costs = VerifyCosts(costs, getattr(costs, "first", None), getattr(costs, "block", None))
        self.max_draft = min(max_draft, len(self.costs) - 2)
        self.adaptive = adaptive
        self.draft_cost = draft_cost
        self.counts: dict[int, list[float]] = {}  # level -> [accepted, rejected]
        self.idle: dict[int, int] = {}  # level -> steps since it last drafted

    def acceptance(self, level: int) -> float:
        """Per-token acceptance of a level; a level not seen yet starts from the pooled estimate."""
        if level not in self.counts:
            s = sum(c[0] for c in self.counts.values()) + 1.0
            f = sum(c[1] for c in self.counts.values()) + 1.0
            return s / (s + f)
        s, f = self.counts[level]
        return s / (s + f)

    def length(self, level: int, limit: int) -> int:
        limit = min(limit, self.max_draft)
        if limit <= 0:
            return 0
        if not self.adaptive:
            return limit
        a = min(self.acceptance(level), 0.999)
        best_k, best_rate = 0, 1.0 / self.costs[1]
        for k in range(1, limit + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (self.costs.expected(k + 1, a) + k * self.draft_cost)
            if rate > best_rate:
                best_k, best_rate = k, rate
        if best_k == 0:
            self.idle[level] = self.idle.get(level, 0) + 1
            if self.idle[level] >= self.PROBE_EVERY:
                self.idle[level] = 0
                return min(2, limit)
        return best_k

    def update(self, level: int, proposed: int, accepted: int) -> None:
        a = self.acceptance(level)
        s, f = self.counts.get(level, (2 * a, 2 * (1 - a)))  # a new level: the pooled prior, weight 2
        self.counts[level] = [self.DECAY * s + accepted, self.DECAY * f + (1.0 if accepted < proposed else 0.0)]
        self.idle[level] = 0

    def observe_draft(self, k: int, seconds: float) -> None:
        """Follow the measured cost per drafted token (model drafters)."""
        self.draft_cost = 0.8 * self.draft_cost + 0.2 * seconds / k if self.draft_cost else seconds / k

    def observe_cost(self, t: int, seconds: float, rows_read: int | None = None) -> None:
        """Follow the measured cost of a t-token verify (load changes, longer contexts); rows_read:
        how many of its rows' logits the walk read (None: all)."""
        if 1 <= t < len(self.costs):
            c = self.costs
            only_first = c.block is not None and rows_read is not None and rows_read <= c.block < t
            table = c.first if only_first else c
            table[t] = 0.8 * table[t] + 0.2 * seconds


def speculative_tokens(backend, drafter, controller: DraftController, sampler: Sampler, first_logits: torch.Tensor,
                       history: list[int], max_tokens: int, stats: SpecStats, on_forward=None,
                       on_trim=None) -> Iterator[int]:
    """Yield generated token ids; appends each to `history` before yielding it.

    Args:
        backend: the target (forward/verify/trim/position/n_ctx).
        drafter: see drafters.py.
        first_logits: [V] logits after the prompt (the cache holds the prompt).
        history: prompt ids; grows with every generated token.
        on_forward(ids), on_trim(n): keep the engine's mirror of the cache in step.
    Stops after max_tokens or when the context is full (the caller sees the generator end early).
    """
    tok = sampler.sample(first_logits, history)
    history.append(tok)
    yield tok
    made = 1
    drafter.begin(history)
    model_level = getattr(drafter, "level", None)  # model drafters have one level; lookups report theirs
    while made < max_tokens:
        room = backend.n_ctx - backend.position - 1  # positions left after the pending token
        if room < 0:
            return
        t0 = time.perf_counter()
        limit = min(room, max_tokens - made - 1)
        draft = Draft()
        if limit > 0:
            if model_level is not None:  # a model drafter: decide k first, drafting costs per token
                k = controller.length(model_level, limit)
                draft = drafter.propose(history, k) if k else Draft()
            else:  # a lookup: see what it finds, then decide how much of it to verify
                probe = drafter.propose(history, controller.max_draft)
                k = controller.length(probe.level, min(limit, len(probe.tokens))) if probe.tokens else 0
                draft = Draft(probe.tokens[:k], None if probe.probs is None else probe.probs[:k], probe.level)
        t1 = time.perf_counter()
        stats.draft_s += t1 - t0
        if model_level is not None and draft.tokens:
            controller.observe_draft(len(draft.tokens), t1 - t0)
        chunk = [tok] + draft.tokens
        rows = verify_rows(backend, chunk)  # k + 1 rows of logits
        out, n_acc = _walk(rows, draft, sampler, history)
        t2 = time.perf_counter()
        stats.verify_s += t2 - t1
        controller.observe_cost(len(chunk), t2 - t1, rows_read=len(out))
        if on_forward:
            on_forward(chunk)
        k = len(draft.tokens)
        if k:
            rejected = k - n_acc
            if rejected:
                backend.trim(rejected)
                if on_trim:
                    on_trim(rejected)
            controller.update(draft.level, k, n_acc)
            stats.verify_steps += 1
            stats.drafted += k
            stats.accepted += n_acc
            stats.accepted_lengths[n_acc] = stats.accepted_lengths.get(n_acc, 0) + 1
        else:
            stats.plain_steps += 1
        for y in out:
            history.append(y)
            drafter.observe(history)
            yield y
            made += 1
            if made >= max_tokens:
                return
        tok = out[-1]


def _walk(rows: torch.Tensor, draft: Draft, sampler: Sampler, history: list[int]) -> tuple[list[int], int]:
    """The tokens a verify step emits (accepted drafts + one target sample) and how many drafts were accepted."""
    n = sampler.params.repeat_last_n
    hist = list(history[-n:]) if n and sampler.params.repetition_penalty != 1.0 else []  # all the penalty reads
    out: list[int] = []
    if draft.probs is None or sampler.params.greedy:
        for i, d in enumerate(draft.tokens):
            y = sampler.sample(rows[i], hist)
            out.append(y)
            hist.append(y)
            if y != d:
                return out, i
        out.append(sampler.sample(rows[len(draft.tokens)], hist))
        return out, len(draft.tokens)
    g = sampler.generator
    for i, d in enumerate(draft.tokens):
        p = sampler.probs(rows[i], hist)
        q = draft.probs[i]
        u = float(torch.rand((), generator=g))
        if q[d] > 0 and u < min(1.0, float(p[d] / q[d])):
            out.append(d)
            hist.append(d)
            continue
        resid = torch.clamp(p - q, min=0)
        total = float(resid.sum())
        y = int(torch.multinomial(resid / total if total > 0 else p, 1, generator=g))
        out.append(y)
        return out, i
    out.append(int(torch.multinomial(sampler.probs(rows[len(draft.tokens)], hist), 1, generator=g)))
    return out, len(draft.tokens)


class Speculation:
    """One request's speculative decoding: a drafter, its controller and its stats.

    costs: the backend's verify cost table (seconds per chunk size), measured on first use when
    None and handed to `on_costs` so the caller can keep it for later requests.
    """

    def __init__(self, drafter, config: SpeculativeConfig, costs: list[float] | None = None, on_costs=None):
        self.drafter = drafter
        self.config = config
        self.costs = costs
        self.on_costs = on_costs
        self.stats = SpecStats(method=drafter.name)

    def tokens(self, backend, sampler: Sampler, first_logits: torch.Tensor, history: list[int], max_tokens: int,
               on_forward=None, on_trim=None) -> Iterator[int]:
        if self.costs is None or len(self.costs) < self.config.max_draft + 2:
            t0 = time.perf_counter()
            self.costs = measure_verify_costs(backend, self.config.max_draft + 1)
            self.stats.calibration_s = time.perf_counter() - t0
            if self.on_costs:
                self.on_costs(self.costs)
        controller = DraftController(self.costs, self.config.max_draft, self.config.adaptive)
        return speculative_tokens(backend, self.drafter, controller, sampler, first_logits, history, max_tokens,
                                  self.stats, on_forward, on_trim)
