"""Sampling: options, their validation, and the logits -> token step.

The order of transforms follows llama.cpp's default sampler chain: repetition penalty, top-k,
top-p, min-p, temperature, then a draw. temperature == 0 is greedy (argmax of the penalized
logits); ties resolve to the lowest token id, like torch.argmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from edge_rt.errors import InvalidOptionError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (llama.cpp / CTRL rule: divide positive, multiply negative)
    repeat_last_n: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None  # None = nondeterministic

    def __post_init__(self):
        checks = [
            (self.temperature >= 0 and self.temperature == self.temperature and self.temperature <= 100,
             f"temperature must be in [0, 100], got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p < 1, f"min_p must be in [0, 1), got {self.min_p}"),
            (0 < self.repetition_penalty <= 10, f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (isinstance(self.repeat_last_n, int) and self.repeat_last_n >= 0,
             f"repeat_last_n must be an integer >= 0, got {self.repeat_last_n}"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             f"seed must be an integer in [0, 2^63), got {self.seed}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidOptionError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Turns logits into tokens under fixed SamplingParams, with its own seeded generator."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def penalize(self, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        # logits: [V] fp32
        p = self.params
        if p.repetition_penalty == 1.0 or p.repeat_last_n == 0 or not history:
            return logits
        recent = torch.tensor(sorted(set(history[-p.repeat_last_n :])), dtype=torch.long)
        logits = logits.clone()
        vals = logits[recent]
        logits[recent] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        return logits

    def probs(self, logits: torch.Tensor, history: Sequence[int] = ()) -> torch.Tensor:
        """The distribution the sampler draws from: [V] fp32 (one-hot when greedy)."""
        logits = self.penalize(logits.float(), history)
        p = self.params
        if p.greedy:
            out = torch.zeros_like(logits)
            out[int(torch.argmax(logits))] = 1.0
            return out
        V = logits.shape[-1]
        if p.top_k and p.top_k < V:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) >= p.top_p  # keep the smallest set reaching top_p
            logits = logits.scatter(0, idx[drop], float("-inf"))
        if p.min_p > 0:
            pr = torch.softmax(logits, -1)
            logits = logits.masked_fill(pr < p.min_p * pr.max(), float("-inf"))
        return torch.softmax(logits / p.temperature, -1)

    def sample(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """One token id from logits [V]."""
        if self.params.greedy:
            return int(torch.argmax(self.penalize(logits.float(), history)))
        return int(torch.multinomial(self.probs(logits, history), 1, generator=self.generator))
