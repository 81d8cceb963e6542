"""A static KV cache indexed by input position, for graphs exported ahead of time.

Exported graphs (ExecuTorch, ONNX) have fixed tensor shapes for their state: the cache is a
[1, Hkv, max_seq, hd] buffer per layer, and a forward writes its keys and values at the
positions it is given (`index_copy`) and attends over the whole buffer under a mask built from
the same positions. Rolling back (speculative rollback, `trim`) is then only a smaller position
on the next call: stale entries past the query positions are masked out.

Two modes, one object, same protocol as edge_rt.kv.cache (update_and_fetch, dtype):
- stateful (ExecuTorch): the buffers are module buffers mutated in place; the .pte keeps them.
- functional (ONNX): the caller hands the buffers in (`bind`) and reads the updated ones back
  (`keys`, `values`) after the forward; the graph has them as inputs and outputs.
"""

from __future__ import annotations

import torch
from torch import nn


class StaticKVCache(nn.Module):
    """One layer's fixed-size cache; `input_pos` [T] is set by the export wrapper before a forward."""

    def __init__(self, n_kv_heads: int, head_dim: int, max_seq: int, dtype: torch.dtype = torch.float32,
                 functional: bool = False):
        super().__init__()
        self.dtype = dtype  # attention runs in the cache's dtype (models/llama.py Attention)
        self.functional = functional
        self.input_pos: torch.Tensor | None = None
        shape = (1, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.keys = self.values = None  # functional mode: the tensors of this call

    def bind(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Functional mode: use these [1, Hkv, S, hd] tensors as the cache for the next forward."""
        self.keys, self.values = keys, values

    def update_and_fetch(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: [1, Hkv, T, hd] written at positions input_pos [T]; returns [1, Hkv, S, hd]
        pos = self.input_pos
        if self.functional:
            self.keys = self.keys.index_copy(2, pos, k.to(self.dtype))
            self.values = self.values.index_copy(2, pos, v.to(self.dtype))
            return self.keys, self.values
        self.k_cache.index_copy_(2, pos, k.to(self.dtype))
        self.v_cache.index_copy_(2, pos, v.to(self.dtype))
        return self.k_cache, self.v_cache
