"""The decode loop: prefill with prefix reuse, sampling, stop rules, streaming.

The engine keeps a mirror of the token ids in the backend's KV cache. A new request first
rolls the cache back to the longest common prefix with its prompt and prefills only the rest, so a
chat session that sends its whole history each turn prefills just the new turn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from edge_rt.errors import ContextOverflowError, InvalidOptionError
from edge_rt.generation.sampling import Sampler, SamplingParams

@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings; the text before the first match is returned
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] | None = None  # None = the tokenizer's end-of-turn ids
    ignore_eos: bool = False

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidOptionError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidOptionError("stop strings must be non-empty strings")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None
    speculative: object | None = None  # SpecStats when speculative decoding ran

    @property
    def decode_tps(self) -> float:
        # tokens produced by decode steps (the first comes from prefill)
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "generated_tokens": self.generated_tokens,
            "prefill_s": self.prefill_s,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tps,
            "finish_reason": self.finish_reason,
        } | ({"speculative": self.speculative.to_dict()} if self.speculative is not None else {})


@dataclass
class Piece:
    """One streamed step: new text (may be empty while a stop string is pending) and its token."""

    text: str
    token_id: int | None
    finish_reason: str | None = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    """Drives one backend for one sequence at a time; calls are serialized by a lock."""

    def __init__(self, backend, tokenizer):
        self.backend = backend
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # ids in the backend's KV cache, in order
        self.lock = threading.RLock()
        self.busy = False  # a generation or scoring is under way (possibly a suspended stream)
        self.last_stats = GenerationStats()

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def reset(self) -> None:
        with self.lock:
            self._check_idle()
            self.backend.reset()
            self.tokens = []

    def _check_idle(self) -> None:
        # the lock is reentrant, so the thread that owns a suspended stream gets here: refuse
        # rather than let two requests share one KV cache
        if self.busy:
            raise InvalidOptionError("the model is busy with an unfinished stream: exhaust or close it first")

    def _forward(self, ids: Sequence[int], all_logits: bool = False):
        try:
            out = self.backend.forward(ids, all_logits=all_logits)
        except BaseException:
            # an interrupted forward may leave layers at different offsets: start clean
            self.backend.reset()
            self.tokens = []
            raise
        self.tokens.extend(ids)
        return out

    def prefill(self, ids: Sequence[int]):
        """Make the cache hold `ids`, reusing the common prefix; return (last logits [V], reused)."""
        if not ids:
            raise InvalidOptionError("the prompt is empty (no tokens)")
        if len(ids) >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt has {len(ids)} tokens but the context holds {self.n_ctx}; "
                "shorten it or load with a larger n_ctx"
            )
        if self.backend.position != len(self.tokens):  # the backend was driven directly: the mirror is stale
            self.backend.reset()
            self.tokens = []
        keep = min(_common_prefix(self.tokens, ids), len(ids) - 1)  # re-run >= 1 token for its logits
        self.backend.trim(self.backend.position - keep)
        del self.tokens[keep:]
        logits = self._forward(ids[keep:])[-1]
        return logits, keep

    def score(self, ids: Sequence[int]):
        """Logits for every position of `ids` from an empty cache: [T, V] fp32 (for perplexity)."""
        with self.lock:
            self.reset()
            self.busy = True
            try:
                return self._forward(ids, all_logits=True)
            finally:
                self.busy = False
                self.reset()

    def generate(self, prompt_ids: Sequence[int], config: GenerationConfig, speculation=None) -> Iterator[Piece]:
        """Stream pieces for a prompt; the last piece carries finish_reason. Stats in last_stats.

        speculation: None for plain decoding, or a `Speculation` (drafter + controller): the
        tokens are the same, verified several at a time.
        """
        with self.lock:
            self._check_idle()
            self.busy = True
            try:
                yield from self._generate(list(prompt_ids), config, speculation)
            finally:
                self.busy = False

    def _plain_tokens(self, logits, sampler: Sampler, history: list[int], max_tokens: int) -> Iterator[int]:
        """One forward per token; ends early when the context is full."""
        for i in range(max_tokens):
            if i:
                if self.backend.position >= self.n_ctx:
                    return
                logits = self._forward([history[-1]])[-1]
            tok = sampler.sample(logits, history)
            history.append(tok)
            yield tok

    def _trim(self, n: int) -> None:
        """Roll back the last n cached tokens (rejected drafts)."""
        del self.tokens[len(self.tokens) - n :]

    def _generate(self, prompt_ids: list[int], config: GenerationConfig, speculation=None) -> Iterator[Piece]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.last_stats = stats
        t0 = time.perf_counter()
        logits, stats.cached_tokens = self.prefill(prompt_ids)
        stats.prefill_s = time.perf_counter() - t0
        sampler = Sampler(config.sampling)
        stop_ids = set() if config.ignore_eos else set(
            self.tokenizer.stop_ids if config.stop_ids is None else config.stop_ids)
        decoder = self.tokenizer.stream_decoder()
        history = list(prompt_ids)
        if speculation is None:
            source = self._plain_tokens(logits, sampler, history, config.max_tokens)
        else:
            stats.speculative = speculation.stats
            source = speculation.tokens(self.backend, sampler, logits, history, config.max_tokens,
                                        on_forward=self.tokens.extend, on_trim=self._trim)
        pending = ""
        finish, matched = "length", False
        try:
            for _ in range(config.max_tokens):
                t_step = time.perf_counter()
                tok = next(source, None)
                if tok is None:
                    finish = "context"
                    break
                if tok in stop_ids:
                    finish = "stop"
                    break
                stats.generated_tokens += 1
                stats.decode_s += time.perf_counter() - t_step  # the consumer's time between pieces is not counted
                pending += decoder.push(tok)
                hits = [(pending.find(s), s) for s in config.stop if s in pending]
                if hits:
                    cut = min(h for h, _ in hits)
                    yield Piece(pending[:cut], tok)
                    pending, finish, matched = "", "stop", True
                    break
                safe = len(pending) - _stop_holdback(pending, config.stop)
                yield Piece(pending[:safe], tok)
                pending = pending[safe:]
        except BaseException:
            if speculation is not None and self.backend.position != len(self.tokens):
                self.backend.reset()  # an interrupted verify: start clean
                self.tokens = []
            raise
        finally:
            source.close()
        stats.finish_reason = finish
        tail = "" if matched else pending + decoder.flush()
        yield Piece(tail, None, finish)
