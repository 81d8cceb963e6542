"""The default backend: edge-rt's own PyTorch model with an external KV cache."""

from __future__ import annotations

from typing import Sequence

import torch

from edge_rt.kv.cache import make_caches
from edge_rt.models.llama import Transformer

# Prefill is run in chunks of this many tokens, bounding activation memory for long prompts.
PREFILL_CHUNK = 512


def batch_invariant(model: Transformer) -> bool:
    """Whether a multi-token verify reproduces one-token forwards bit for bit on this model.

    Attention is made invariant by `exact=True` (per-query); the matrix products must be too. Measured
    (docs/NOTES.md, tests/test_cuda.py): PyTorch's packed int4 kernels, on CPU and on CUDA (tinygemm,
    checked on an H100 for 1..16 rows at SmolLM2's shapes), give each row the same bits whatever the
    number of rows, while dense fp32/bf16 products switch kernels between 1 and several rows (gemv vs
    gemm). edge-rt's own int4 kernels (NATIVE_KERNELS, models/int4_matmul.c) are row-invariant by
    construction (tests/test_quants.py).
    """
    from edge_rt.models.linear import NATIVE_KERNELS, Int4Linear, Int8Linear

    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int4Linear, Int8Linear))]
    return bool(linears) and all(isinstance(m, (Int4Linear, Int8Linear))
                                 and m.kernel in ("cpu", "cuda", *NATIVE_KERNELS)
                                 for m in linears)


def head_block(model: Transformer) -> int | None:
    """Rows the output layer should run at a time in a verify chunk (None: all at once).

    PyTorch's packed int4 CPU kernel takes its input in blocks of 4 rows and reads all the weights
    once per block: for SmolLM2's output layer (49152 x 576 as two 4-bit halves, 2 threads) 1, 4,
    5 and 8 rows cost 1.7, 2.9, 5.8 and 5.8 ms. Computing a chunk's logits 4 rows at a time, and
    the next 4 only when the walk reaches them (every draft so far accepted), drops the second
    block whenever a draft is rejected in the first. Other kernels read the weights once per call:
    there the whole chunk goes in one call.
    """
    from edge_rt.models.linear import Int4Linear

    head = model.lm_head
    return 4 if isinstance(head, Int4Linear) and head.kernel == "cpu" else None


class LazyRows:
    """A verify chunk's logits, computed when first read: `rows[i]` -> fp32 [V] on CPU.

    Reading row i runs the output layer on the rows from the last one computed to the end of i's
    block (`block` rows per call, None: all rows), so a speculative walk that stops at a rejected
    draft never pays for the rows after it. Each row is bit-identical to computing all rows at
    once (the int4 kernels' rows do not depend on the other rows, tests/test_speculative.py).
    """

    def __init__(self, model: Transformer, hidden: torch.Tensor, block: int | None):
        self.model, self.hidden = model, hidden  # hidden: [T, D], final-normed
        self.block = block or hidden.shape[0]
        self.done: list[tuple[int, torch.Tensor]] = []  # (first row, fp32 logits [n, V]) per head call

    def __len__(self) -> int:
        return self.hidden.shape[0]

    @torch.inference_mode()
    def _compute(self, n: int) -> None:
        have = self.done[-1][0] + self.done[-1][1].shape[0] if self.done else 0
        if n > have:
            end = min(len(self), -(-n // self.block) * self.block)
            self.done.append((have, self.model.head(self.hidden[None, have:end])[0].float().cpu()))

    def logits(self, n: int) -> torch.Tensor:
        """fp32 logits [n, V] of the first n rows (computing what is missing)."""
        self._compute(n)
        return torch.cat([p for _, p in self.done])[:n]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of a {len(self)}-row verify chunk")
        self._compute(i + 1)
        start, piece = next((s, p) for s, p in self.done if i < s + p.shape[0])
        return piece[i - start]


class TorchBackend:
    name = "torch"

    def __init__(self, model: Transformer, device: torch.device, n_ctx: int,
                 kv_dtype: torch.dtype = torch.float32):
        args = model.args
        self.model = model
        self.device = device
        self.n_ctx = n_ctx
        self.vocab_size = args.vocab_size
        self.exact_verify = batch_invariant(model)
        self.head_block = head_block(model)
        self.caches = make_caches(args.num_hidden_layers, args.num_key_value_heads, args.head_dim,
                                  n_ctx, kv_dtype, device)

    @property
    def position(self) -> int:
        return self.caches[0].offset

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)
        if ids.numel() == 0:
            raise ValueError("forward() needs at least one token")
        if self.position + ids.numel() > self.n_ctx:
            raise IndexError(f"{self.position + ids.numel()} positions exceed the context of {self.n_ctx}")
        outs = []
        for start in range(0, ids.numel(), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            last = start + PREFILL_CHUNK >= ids.numel()
            if not all_logits and not last:
                self.model(chunk[None], self.caches, self.position, last_only=True)
                continue
            outs.append(self.model(chunk[None], self.caches, self.position, last_only=not all_logits)[0])
        return torch.cat(outs).float().cpu() if len(outs) > 1 else outs[0].float().cpu()

    @torch.inference_mode()
    def verify(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append tokens; fp32 logits [T, V], row i bit-identical to forwarding them one by one."""
        rows = self.verify_rows(tokens)
        return rows.logits(len(rows))

    @torch.inference_mode()
    def verify_rows(self, tokens: Sequence[int]) -> "LazyRows":
        """`verify`, with the output layer run on demand, `head_block` rows at a time (see LazyRows)."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)
        if ids.numel() == 0:
            raise ValueError("verify() needs at least one token")
        if self.position + ids.numel() > self.n_ctx:
            raise IndexError(f"{self.position + ids.numel()} positions exceed the context of {self.n_ctx}")
        h = self.model(ids[None], self.caches, self.position, exact=True, hidden=True)[0]
        return LazyRows(self.model, h, self.head_block)

    @torch.inference_mode()
    def forward_skipping(self, tokens: Sequence[int], skip: frozenset[int]) -> torch.Tensor:
        """A draft forward with the layers in `skip` left out: logits [T, V]. Undo with trim_skipping."""
        ids = torch.as_tensor(list(tokens), dtype=torch.long, device=self.device)
        start = self.caches[next(i for i in range(len(self.caches)) if i not in skip)].offset
        return self.model(ids[None], self.caches, start, skip=skip)[0].float().cpu()

    def trim_skipping(self, n: int, skip: frozenset[int]) -> None:
        """Roll back n positions written by forward_skipping (the layers it ran)."""
        for i, c in enumerate(self.caches):
            if i not in skip:
                c.trim(n)

    def trim(self, n: int) -> int:
        dropped = 0
        for c in self.caches:
            dropped = c.trim(n)
        return dropped

    def reset(self) -> None:
        for c in self.caches:
            c.reset()

    def kv_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches)
