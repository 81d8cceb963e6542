"""The default backend: edge-rt's own PyTorch model with an external KV cache."""

from __future__ import annotations

from typing import Sequence

import torch

from edge_rt.kv.cache import make_caches
from edge_rt.models.llama import Transformer

# Prefill is run in chunks of this many tokens, bounding activation memory for long prompts.
PREFILL_CHUNK = 512


class TorchBackend:
    name = "torch"

    def __init__(self, model: Transformer, device: torch.device, n_ctx: int,
                 kv_dtype: torch.dtype = torch.float32):
        args = model.args
        self.model = model
        self.device = device
        self.n_ctx = n_ctx
        self.vocab_size = args.vocab_size
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
