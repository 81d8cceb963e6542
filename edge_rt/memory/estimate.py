"""Memory a model needs once loaded: weights in their loaded format, KV cache, activations.

These rules mirror edge_rt.loading.weights (what stays packed, what is dequantized); a test
checks the estimate against the bytes of a really loaded model.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as QT

from edge_rt.loading.quants import INT4_TYPES
from edge_rt.loading.weights import INT4_GROUP, int4_kernel_for, int8_kernel_for

ACTIVATION_TOKENS = 512  # the prefill chunk (backends.torch_backend.PREFILL_CHUNK)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _kernel(device: torch.device | None, dtype: torch.dtype, in_features: int) -> str:
    """The int4 kernel the loader would pick (weights.int4_kernel_for); no device: a packed one."""
    return "packed" if device is None else int4_kernel_for(device, dtype, in_features)[0]


def linear_bytes(srcs, dtype: torch.dtype, quantized: bool, device: torch.device | None = None) -> int:
    """Bytes of one (possibly fused) linear weight once loaded on `device`.

    Where no packed int4 kernel runs (MPS, fp16 or pre-Ampere CUDA) an Int4Linear holds its weight
    dequantized in `dtype`; a Q8_0 weight then has the two 4-bit halves' width (2 K). With the
    AVX-512 BF16 kernel a Q8_0 weight stays int8 (Int8Linear); elsewhere it is two 4-bit halves.
    """
    N = sum(int(s.shape[0]) for s in srcs)
    K = int(srcs[0].shape[1])
    packed = quantized and dtype in (torch.float16, torch.bfloat16)
    if packed and all(s.qtype in INT4_TYPES for s in srcs):
        if _kernel(device, dtype, K) == "dense":
            return N * K * _elt(dtype)
        return N * K // 2 + 2 * (N * K // INT4_GROUP) * _elt(dtype)
    if packed and all(s.qtype == QT.Q8_0 for s in srcs):
        kernel = _kernel(device, dtype, 2 * K)
        if kernel == "dense":
            return 2 * N * K * _elt(dtype)
        if int8_kernel_for(kernel):  # Int8Linear: the int8 codes and one scale per group
            return N * K + (N * K // INT4_GROUP) * _elt(dtype)
        return N * K + 2 * (2 * N * K // INT4_GROUP) * _elt(dtype)  # two 4-bit halves
    return N * K * _elt(dtype)


def weight_bytes(tensors: dict, args, dtype: torch.dtype, quantized: bool = True,
                 device: torch.device | None = None) -> int:
    total = 0
    for target, parts in tensors.items():
        srcs = [s for _, s in sorted(parts, key=lambda p: p[0])]
        if target.endswith(".bias"):
            total += sum(_numel(s.shape) for s in srcs) * _elt(dtype)
        elif "norm" in target:
            total += sum(_numel(s.shape) for s in srcs) * 4
        elif target == "embed.weight":
            packed = quantized and dtype in (torch.float16, torch.bfloat16) and srcs[0].qtype == QT.Q8_0
            n = _numel(srcs[0].shape)
            total += n + 4 * n // INT4_GROUP if packed else n * _elt(dtype)
            if "lm_head.weight" not in tensors and packed:
                total += linear_bytes(srcs, dtype, quantized, device)
        else:
            total += linear_bytes(srcs, dtype, quantized, device)
    return total


def kv_bytes(args, n_ctx: int, kv_dtype: torch.dtype) -> int:
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * n_ctx * _elt(kv_dtype)


def activation_bytes(args, dtype: torch.dtype) -> int:
    """Peak activations of one prefill chunk (a rough upper bound: widest intermediates x 4)."""
    T = ACTIVATION_TOKENS
    widest = max(2 * args.intermediate_size, args.q_dim + 2 * args.kv_dim)
    scores = args.num_attention_heads * T * T * 4  # attention scores of the chunk, fp32
    return T * (widest * _elt(dtype) * 4 + args.hidden_size * 4 * 4) + scores + args.vocab_size * 4


def describe_model(source, dtype: torch.dtype, n_ctx: int, kv_dtype: torch.dtype = torch.float32,
                   quantized: bool = True, device: torch.device | None = None) -> dict:
    """Architecture, size and memory needed to load `source` (an api.ModelSource) on `device`
    (None: where the packed int4 kernels run)."""
    args = source.args
    w = weight_bytes(source.tensors, args, dtype, quantized, device)
    kv = kv_bytes(args, n_ctx, kv_dtype)
    act = activation_bytes(args, dtype)
    file_bytes = source.path.stat().st_size if source.path.is_file() else sum(
        p.stat().st_size for p in source.path.glob("*.safetensors"))
    return {
        "path": str(source.path),
        "format": source.format,
        "architecture": args.model_type,
        "parameters": args.num_parameters(),
        "layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "heads": args.num_attention_heads,
        "kv_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size,
        "context_length": args.max_position_embeddings,
        "tensor_types": dict(sorted(source.file_types.items())),
        "file_bytes": file_bytes,
        "memory": {
            "dtype": str(dtype).removeprefix("torch."),
            "n_ctx": n_ctx,
            "weights_bytes": w,
            "kv_cache_bytes": kv,
            "activations_bytes": act,
            "total_bytes": w + kv + act,
        },
    }
