"""Name tables: tensor names in model files -> the model's parameters.

Each row is (regex on the file name, target in the model, part). `part` orders the pieces of a
fused weight: wqkv = [q; k; v], w13 = [gate; up]. Sources: llama.cpp's gguf-py
tensor_mapping.py (GGUF names) and the Hugging Face LlamaForCausalLM / Qwen2ForCausalLM
state dicts (HF names).
"""

from __future__ import annotations

import re

from edge_rt.errors import UnsupportedModelError

GGUF_NAMES = [
    (r"token_embd\.weight", "embed.weight", 0),
    (r"output_norm\.weight", "norm.weight", 0),
    (r"output\.weight", "lm_head.weight", 0),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{0}.attn_norm.weight", 0),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 0),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 1),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 2),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.{0}.attn.wo.weight", 0),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{0}.ffn_norm.weight", 0),
    (r"blk\.(\d+)\.ffn_gate\.weight", "layers.{0}.ffn.w13.weight", 0),
    (r"blk\.(\d+)\.ffn_up\.weight", "layers.{0}.ffn.w13.weight", 1),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{0}.ffn.w2.weight", 0),
]

HF_NAMES = [
    (r"model\.embed_tokens\.weight", "embed.weight", 0),
    (r"model\.norm\.weight", "norm.weight", 0),
    (r"lm_head\.weight", "lm_head.weight", 0),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{0}.attn_norm.weight", 0),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 0),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 1),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "layers.{0}.attn.wqkv.{1}", 2),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{0}.attn.wo.weight", 0),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{0}.ffn_norm.weight", 0),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "layers.{0}.ffn.w13.weight", 0),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "layers.{0}.ffn.w13.weight", 1),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{0}.ffn.w2.weight", 0),
]

# File tensors that carry nothing the model needs (recomputed from the config).
IGNORED = [r"rope_freqs\.weight", r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]

_compiled: dict[int, list] = {}


def map_name(table, name: str) -> tuple[str | None, int]:
    """File tensor name -> (model target, part); (None, 0) for ignored tensors."""
    rows = _compiled.setdefault(id(table), [(re.compile(p), t, k) for p, t, k in table])
    for rx, target, part in rows:
        m = rx.fullmatch(name)
        if m:
            return target.format(*m.groups()), part
    if any(re.fullmatch(p, name) for p in IGNORED):
        return None, 0
    raise UnsupportedModelError(f"tensor {name!r} has no place in the model (unknown tensor name)")
