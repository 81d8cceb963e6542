"""Llama-family decoder (llama, mistral, qwen2): ModelArgs and the modules. No I/O, no devices.

The KV cache lives outside the model (edge_rt/kv): `forward(tokens, caches, start_pos)` reads and
writes one cache object per layer. Linear layers come from `edge_rt.models.linear.make_linear`,
so a weight format (dense, int4 groups, ...) plugs in by swapping the module after construction.
Projections are fused (wqkv = [q; k; v], w13 = [gate; up]) to keep the number of kernel calls per
layer low; the loader's name table says how file tensors map onto the fused weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from edge_rt.models import native_kernels
from edge_rt.models.linear import make_linear

# Architectures this file runs; the value says what differs from plain llama.
ARCHITECTURES = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
}


@dataclass
class ModelArgs:
    """Model hyper-parameters, with Hugging Face config.json field names."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and isinstance(self.num_attention_heads, int) and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Build from a config.json dict; unknown keys go to `extra`."""
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        extra = {k: v for k, v in config.items() if k not in names}
        args = cls(**known, extra=extra)
        args.attention_bias = bool(
            config.get("attention_bias", ARCHITECTURES.get(args.model_type, {}).get("attention_bias", False))
        )
        return args

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Raise ValueError for hyper-parameters no model can have (corrupt or hostile configs)."""
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{f} = {v!r} is invalid")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} is odd")
        check_rope_scaling(self.rope_scaling)

    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, L = self.hidden_size, self.num_hidden_layers
        attn = d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * d
        if self.attention_bias:
            attn += self.q_dim + 2 * self.kv_dim
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return L * per_layer + embed + d


# Tiny presets for tests; real configs come from the model file.
PRESETS = {
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 rope_theta=10000.0, tie_word_embeddings=True),
    "tiny-qwen2": dict(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                       max_position_embeddings=256, rope_theta=1e6, attention_bias=True),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
}


def preset(name: str, **overrides) -> ModelArgs:
    return ModelArgs(**{**PRESETS[name], **overrides})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        # x: fp32 residual stream; normalize in fp32 like llama.cpp, return in the matmul dtype
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps).to(out_dtype)


ROPE_SCALINGS = {None: (), "default": (), "linear": ("factor",), "llama3": ("factor",),
                 "freq_factors": ("factors",)}  # rope_type -> required keys


def check_rope_scaling(scaling: dict | None) -> None:
    """Raise ValueError for a rope scaling this file does not implement."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {kind!r} is not supported")
    missing = [k for k in ROPE_SCALINGS[kind] if k not in scaling]
    if missing:
        raise ValueError(f"{kind} rope scaling lacks {', '.join(missing)}")


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with llama3-style scaling when the config asks for it."""
    hd = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    check_rope_scaling(scaling)
    if kind == "llama3":
        factor = scaling["factor"]
        lo, hi = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = ((old_ctx / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "linear":
        inv = inv / scaling["factor"]
    elif kind == "freq_factors":  # GGUF rope_freqs: one divisor per frequency (llama.cpp rope_ext)
        inv = inv / torch.tensor(scaling["factors"], dtype=torch.float64)
    return inv


def rope_table(args: ModelArgs, length: int) -> torch.Tensor:
    """cos/sin table [length, 2, head_dim] for half-split (HF) rotary embedding, fp32.

    The sin row carries the sign of rotate_half, so rope is x * cos + swap_halves(x) * sin.
    """
    inv = rope_frequencies(args)
    t = torch.arange(length, dtype=torch.float64)
    ang = torch.outer(t, inv)  # [T, hd/2]
    ang = torch.cat([ang, ang], dim=-1)  # [T, hd]
    sin = ang.sin()
    sin[:, : inv.shape[0]] *= -1  # rotate-half: first half gets -x2 * sin
    return torch.stack([ang.cos(), sin], dim=1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    # x: [B, T, H, hd]; cos, sin: [T, 1, hd] (fp32; sin has its first half negated)
    half = x.shape[-1] // 2
    xf = x.float()
    rot = torch.cat([xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rot * sin).to(out_dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv = args.num_key_value_heads
        self.hd = args.head_dim
        self.q_dim, self.kv_dim = args.q_dim, args.kv_dim
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self.wqkv = make_linear(args.hidden_size, args.q_dim + 2 * args.kv_dim, bias=args.attention_bias)
        self.wo = make_linear(args.q_dim, args.hidden_size, bias=False)

    def forward(self, x, cos, sin, cache, mask):
        # x: [B, T, D]
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv, self.hd
        qkv = self.wqkv(x)
        if mask is None and native_kernels.fusable(qkv, cos, cache, hd):
            # decode steps and exact verify chunks: rope, cache write and attention in one C call,
            # each query computed as a one-token step computes it
            out = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
            return self.wo(native_kernels.rope_attention(qkv, cos, sin, cache, H, Hkv, self.scale, out).to(x.dtype))
        # rotate q and k together: [B, T, H + Hkv, hd]
        # Attention runs in the cache's dtype (fp32 by default: on CPU it is both faster
        # and closer to llama.cpp than bf16 for these small matrices).
        qk = apply_rope(qkv[..., : self.q_dim + self.kv_dim].view(B, T, H + Hkv, hd), cos, sin, cache.dtype)
        q = qk[:, :, :H].transpose(1, 2)  # [B, H, T, hd]
        k = qk[:, :, H:].transpose(1, 2)  # [B, Hkv, T, hd]
        v = qkv[..., self.q_dim + self.kv_dim :].view(B, T, Hkv, hd).transpose(1, 2).to(cache.dtype)
        k, v = cache.update_and_fetch(k, v)  # [B, Hkv, S, hd]
        if mask is None and T > 1:
            y = per_query_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=Hkv != H)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.q_dim).to(x.dtype))  # [B, T, D]


def per_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention computed one query at a time, each exactly as a one-token decode step.

    A T-query SDPA call does not give bit-identical rows to T one-query calls (its reductions are
    blocked differently), so a speculative verify chunk run through it could flip near-tied
    argmaxes. Here query i sees keys [0, S - T + i] through the same one-query call a plain
    decode step makes, so the verify chunk reproduces plain decoding exactly.
    """
    # q: [B, H, T, hd]; k, v: [B, Hkv, S, hd] (the last T positions belong to the queries)
    T, S = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    rows = [F.scaled_dot_product_attention(q[:, :, i : i + 1], k[:, :, : S - T + i + 1], v[:, :, : S - T + i + 1],
                                           enable_gqa=gqa) for i in range(T)]
    return torch.cat(rows, dim=2)  # [B, H, T, hd]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inter = args.intermediate_size
        self.w13 = make_linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.w2 = make_linear(args.intermediate_size, args.hidden_size, bias=False)

    def forward(self, x, native: bool = False):
        # native (decode steps and verify chunks): silu(gate) * up in one C call where it applies
        gu = self.w13(x)
        y = native_kernels.silu_mul(gu) if native else None
        if y is None:
            gate, up = gu.split(self.inter, dim=-1)
            y = F.silu(gate) * up
        return self.w2(y)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.ffn = FeedForward(args)

    def forward(self, x, cos, sin, cache, mask, dtype, y=None, defer: bool = False):
        """x: [B, T, D] fp32 residual stream; dtype: the dtype of matmul inputs.

        y: the previous block's output not yet added to x (the residual is x + y); defer: return
        (residual, output) unadded. Decode steps and verify chunks (no mask) use them to run each
        residual add with the RMSNorm after it in one native call (models/native_kernels.py).
        """
        x, xn = add_norm(x, y, self.attn_norm, dtype, mask is None)
        a = self.attn(xn, cos, sin, cache, mask)
        h, hn = add_norm(x, a, self.ffn_norm, dtype, mask is None)
        f = self.ffn(hn, mask is None)
        return (h, f) if defer else h + f


def add_norm(x: torch.Tensor, y: torch.Tensor | None, norm: RMSNorm, dtype: torch.dtype,
             native: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) for h = x + y (x where y is None): natively where allowed and it applies.

    The native path gives the same bits whether or not the add is deferred into it (one fp32
    rounding either way), so models with and without block hooks decode alike."""
    fused = native_kernels.add_rms_norm(x, y, norm.weight, norm.eps, dtype) if native else None
    if fused is not None:
        return fused
    h = x if y is None else x + y
    return h, norm(h, dtype)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = make_linear(args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("rope", rope_table(args, args.max_position_embeddings), persistent=False)
        self.compute_dtype = torch.float32  # dtype of matmul inputs; the loader sets it

    def forward(self, tokens: torch.Tensor, caches, start_pos: int, last_only: bool = False,
                exact: bool = False, skip: frozenset[int] = frozenset(), hidden: bool = False) -> torch.Tensor:
        """Run a chunk of tokens at absolute positions start_pos.. and return fp32 logits.

        Args:
            tokens: [B, T] token ids.
            caches: one KV cache object per layer (update_and_fetch, offset == start_pos).
            start_pos: position of tokens[:, 0].
            last_only: return logits for the last position only ([B, 1, V]).
            exact: make every row equal, bit for bit, to decoding the chunk one token at a time
                (per-query attention; for speculative verify chunks).
            skip: indices of layers to leave out (a self-speculative draft); their caches are untouched.
            hidden: return the final-normed hidden states [B, T, D] (compute dtype) instead of logits;
                `head` turns any rows of them into logits later.
        Returns:
            logits [B, T, V] (or [B, 1, V]) in fp32.
        """
        B, T = tokens.shape
        dtype = self.compute_dtype
        x = self.embed(tokens).float()  # [B, T, D]: the residual stream stays fp32
        rope = self.rope[start_pos : start_pos + T]
        cos, sin = rope[:, 0, None], rope[:, 1, None]  # [T, 1, hd]
        # exact: attention one query at a time (bit-identical to decoding the chunk token by token)
        mask = causal_mask(T, start_pos, x.device) if T > 1 and not exact else None
        # decode steps and verify chunks hand each block's output to the next block unadded, which
        # adds it together with its norm (one native call); not under hooks that read block inputs
        defer = mask is None and not any(layer._forward_pre_hooks for layer in self.layers)
        y = None  # the last block's output not yet added to x
        for i, (layer, cache) in enumerate(zip(self.layers, caches)):
            if i not in skip:
                if defer:
                    x, y = layer(x, cos, sin, cache, mask, dtype, y=y, defer=True)
                else:
                    x = layer(x, cos, sin, cache, mask, dtype)
        if last_only:
            x, y = x[:, -1:], (None if y is None else y[:, -1:])
        _, h = add_norm(x, y, self.norm, dtype, mask is None)
        return h if hidden else self.head(h)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final-normed hidden states (`forward(..., hidden=True)`)."""
        return self.lm_head(h).float()


def causal_mask(T: int, start_pos: int, device) -> torch.Tensor:
    """Boolean mask [T, start_pos + T]: query i sees keys 0..start_pos+i."""
    q = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    k = torch.arange(start_pos + T, device=device)[None, :]
    return k <= q
