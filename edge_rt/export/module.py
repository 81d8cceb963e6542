"""The export wrapper: edge-rt's own Transformer, run over a static cache by input position.

Nothing here forks the model: the wrapper embeds, takes the rope rows of the input positions,
builds the [T, max_seq] mask from the positions and calls each existing `Block.forward`, then
the final norm and lm_head, exactly as `Transformer.forward` does with a growing cache.

Inputs of the exported graph:
    tokens     [1, T] int64   T dynamic in 1..max_chunk
    input_pos  [T]    int64   absolute positions (consecutive, < max_seq)
    (ONNX only) k_cache_i, v_cache_i  [1, Hkv, max_seq, hd] fp32 for each layer i
Outputs:
    logits     [1, T, V] fp32
    (ONNX only) k_cache_out_i, v_cache_out_i  the updated caches
"""

from __future__ import annotations

import torch
from torch import nn

from edge_rt.export.static_cache import StaticKVCache
from edge_rt.models.llama import Transformer, rope_table


class ExportLM(nn.Module):
    """Transformer + static caches; `functional` puts the caches on the graph's inputs/outputs."""

    def __init__(self, model: Transformer, max_seq: int, functional: bool = False):
        super().__init__()
        args = model.args
        self.model = model
        self.max_seq = max_seq
        self.functional = functional
        self.caches = nn.ModuleList(
            StaticKVCache(args.num_key_value_heads, args.head_dim, max_seq, torch.float32, functional)
            for _ in range(args.num_hidden_layers)
        )
        self.register_buffer("rope_rows", rope_table(args, max_seq), persistent=False)  # [S, 2, hd]
        self.register_buffer("key_pos", torch.arange(max_seq), persistent=False)  # [S]

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, caches: list[torch.Tensor] | None = None):
        # tokens: [1, T]; input_pos: [T]; caches (functional): [k_0, v_0, k_1, v_1, ...]
        m = self.model
        dtype = m.compute_dtype
        x = m.embed(tokens).float()  # [1, T, D]: fp32 residual stream
        rope = self.rope_rows.index_select(0, input_pos)  # [T, 2, hd]
        cos, sin = rope[:, 0, None], rope[:, 1, None]  # [T, 1, hd]
        mask = self.key_pos[None, :] <= input_pos[:, None]  # [T, S]: query i sees keys <= its position
        for i, (layer, cache) in enumerate(zip(m.layers, self.caches)):
            cache.input_pos = input_pos
            if self.functional:
                cache.bind(caches[2 * i], caches[2 * i + 1])
            x = layer(x, cos, sin, cache, mask, dtype)
        logits = m.lm_head(m.norm(x, dtype)).float()  # [1, T, V]
        if not self.functional:
            return logits
        return (logits, *[t for c in self.caches for t in (c.keys, c.values)])
