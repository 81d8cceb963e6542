"""The Backend protocol: who executes a forward. The engine never knows which one it drives.

A backend holds one sequence's KV state. `forward` appends a chunk of tokens at the current
position and returns logits; `trim` rolls the cache back (speculative rollback, chat edits).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class Backend(Protocol):
    name: str
    n_ctx: int  # positions the backend can hold
    vocab_size: int
    exact_verify: bool  # verify() rows are bit-identical to one-token forwards

    @property
    def position(self) -> int:
        """Number of tokens currently in the KV cache."""

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` at `position`; return fp32 logits [T, V] (all) or [1, V] (last)."""

    def verify(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append `tokens`; return fp32 logits [T, V] for every position (a speculative verify chunk).

        Where `exact_verify` is True, row i is bit-identical to what forward() of the same tokens
        one at a time would return, so speculative decoding reproduces plain decoding exactly.
        """

    def trim(self, n: int) -> int:
        """Drop the last n cached positions; return how many were dropped."""

    def reset(self) -> None:
        """Empty the cache."""

    def kv_bytes(self) -> int:
        """Bytes the KV cache holds now."""
