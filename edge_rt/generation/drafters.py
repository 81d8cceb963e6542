"""Drafters for speculative decoding: cheap guesses of the next tokens, checked by the target.

A drafter proposes up to k tokens that continue the context; the verifier (speculative.py) runs
them through the target model in one forward and keeps the longest prefix the target agrees
with, so the output never depends on how good the guesses are, only the speed does.

Protocol (what the verifier relies on):
    name: str
    begin(context)                 a new request starts; context = the prompt ids
    propose(context, k) -> Draft   up to k tokens continuing context (possibly none)
    observe(context)               the context grew by accepted tokens (called after each verify)

Drafters here:
- `NgramDrafter` (prompt lookup / ANPD): multi-level n-gram tables over the prompt and the
  generated text, updated with every accepted token; the longest matching n-gram wins.
- `NgramDrafter(references=...)` (LLMA reference copy): the same lookup also searches caller-given
  documents and copies the span that follows the match.
- `ModelDrafter`: a smaller model (any backend) with the same tokenizer decodes k tokens.
- `LayerSkipDrafter` (Draft & Verify): the target's own weights with some layers skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from edge_rt.generation.sampling import Sampler


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None  # [len(tokens), V] draft distribution q; None: deterministic guesses
    level: int = 0  # what produced it (n-gram order; 0 for models): acceptance is tracked per level


class NgramIndex:
    """Where the latest earlier occurrence of every n-gram (n = 1..max_n) continues, for a growing sequence."""

    def __init__(self, max_n: int, tokens: Sequence[int] = ()):
        self.max_n = max_n
        self.tokens: list[int] = []
        self.tables: list[dict[tuple, int]] = [{} for _ in range(max_n + 1)]
        self.extend(tokens)

    def extend(self, ids: Sequence[int]) -> None:
        toks, tables = self.tokens, self.tables
        for t in ids:
            toks.append(t)
            j = len(toks) - 1  # the new token continues the n-grams that end at j - 1
            for n in range(1, min(self.max_n, j) + 1):
                tables[n][tuple(toks[j - n : j])] = j

    def match(self, suffix: Sequence[int], min_n: int = 1) -> tuple[int, int]:
        """(n, start) for the longest n-gram equal to the end of `suffix`, or (0, -1)."""
        for n in range(min(self.max_n, len(suffix)), min_n - 1, -1):
            c = self.tables[n].get(tuple(suffix[-n:]))
            if c is not None:
                return n, c
        return 0, -1

    def copy(self, start: int, k: int, wrap: bool) -> list[int]:
        """Up to k tokens from `start`.

        wrap: the sequence is the context itself, so a continuation that runs into its end goes on
        with the draft's own tokens (like LZ77: the text after the match is the text being guessed);
        a reference document just ends.
        """
        toks = self.tokens
        if not wrap:
            return toks[start : start + k]
        out: list[int] = []
        for i in range(k):
            j = start + i
            out.append(toks[j] if j < len(toks) else out[j - len(toks)])
        return out


class NgramDrafter:
    """Prompt lookup with adaptive multi-level n-grams (ANPD), optionally over reference documents (LLMA).

    The context (prompt + generated text) is indexed incrementally; references are indexed once.
    A proposal copies what followed the longest n-gram match of the context's last tokens,
    searching the references first, so a quoted span is copied from its source.
    """

    def __init__(self, max_n: int = 4, min_n: int = 1, references: Sequence[Sequence[int]] = ()):
        self.name = "reference" if references else "ngram"
        self.max_n, self.min_n = max_n, min_n
        self.references = [NgramIndex(max_n, r) for r in references if len(r) > 1]
        self.context = NgramIndex(max_n)

    def begin(self, context: Sequence[int]) -> None:
        self.context = NgramIndex(self.max_n, context)

    def observe(self, context: Sequence[int]) -> None:
        self.context.extend(context[len(self.context.tokens) :])

    def propose(self, context: Sequence[int], k: int) -> Draft:
        best = (0, None, -1)
        tail = context[-self.max_n :]
        for index in self.references + [self.context]:
            n, start = index.match(tail, self.min_n)
            if n > best[0]:
                best = (n, index, start)
        n, index, start = best
        if not n or k <= 0:
            return Draft()
        return Draft(index.copy(start, k, wrap=index is self.context), level=n)


class ModelDrafter:
    """A smaller model with the same tokenizer drafts k tokens by plain decoding on its own backend.

    The draft backend keeps its KV cache between steps: each proposal rolls it back to the common
    prefix with the context and forwards only the new tokens.
    """

    level = 0

    def __init__(self, backend, sampler: Sampler | None = None):
        self.name = "draft"
        self.backend = backend
        self.sampler = sampler  # None: greedy drafts (deterministic); else sample and return q
        self.tokens: list[int] = []  # ids in the draft backend's cache

    def begin(self, context: Sequence[int]) -> None:
        pass

    def observe(self, context: Sequence[int]) -> None:
        pass

    def _sync(self, context: Sequence[int]) -> torch.Tensor:
        keep = 0
        n = min(len(self.tokens), len(context) - 1)
        while keep < n and self.tokens[keep] == context[keep]:
            keep += 1
        self.backend.trim(self.backend.position - keep)
        del self.tokens[keep:]
        new = list(context[keep:])
        self.tokens.extend(new)
        return self.backend.forward(new)[-1]

    def propose(self, context: Sequence[int], k: int) -> Draft:
        k = min(k, self.backend.n_ctx - len(context))
        if k <= 0:
            return Draft()
        logits = self._sync(context)
        history = list(context)
        tokens, probs = [], []
        for i in range(k):
            if self.sampler is None or self.sampler.params.greedy:
                tok = int(torch.argmax(logits))
            else:
                q = self.sampler.probs(logits, history)
                tok = int(torch.multinomial(q, 1, generator=self.sampler.generator))
                probs.append(q)
            tokens.append(tok)
            history.append(tok)
            if i + 1 < k:
                logits = self.backend.forward([tok])[-1]
                self.tokens.append(tok)
        return Draft(tokens, torch.stack(probs) if probs else None, level=0)


class LayerSkipDrafter:
    """Draft & Verify: the target's own weights with a set of layers skipped.

    Drafting writes (approximate) KV entries into the target's caches of the layers it runs;
    they are rolled back before the verify forward, so the target's cache is left as it was.
    """

    level = 0

    def __init__(self, backend, skip: Sequence[int]):
        self.name = "layerskip"
        self.backend = backend
        self.skip = frozenset(skip)

    def begin(self, context: Sequence[int]) -> None:
        pass

    def observe(self, context: Sequence[int]) -> None:
        pass

    def propose(self, context: Sequence[int], k: int) -> Draft:
        # the target cache holds context[:-1]; the last token is pending
        k = min(k, self.backend.n_ctx - len(context))
        if k <= 0:
            return Draft()
        tokens: list[int] = []
        tok = context[-1]
        for _ in range(k):
            logits = self.backend.forward_skipping([tok], self.skip)
            tok = int(torch.argmax(logits[-1]))
            tokens.append(tok)
        self.backend.trim_skipping(k, self.skip)
        return Draft(tokens, level=0)
