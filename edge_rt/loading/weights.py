"""Assemble a model from the tensors of a file: the one place weights meet modules.

The model is built on the meta device, then every parameter is assigned from its source
tensor(s). Linear weights whose file type maps exactly onto a packed format (GGUF Q4_0/Q4_1 ->
Int4Linear; Q8_0 -> Int8Linear on the AVX-512 BF16 kernel, else Int4Linear as two 4-bit halves)
keep their codes when `quantized` is true; everything else is dequantized bit-exactly to fp32 and
cast to the compute dtype. Norm weights stay fp32.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from edge_rt.errors import ModelFormatError
from edge_rt.loading.quants import int8_as_int4
from edge_rt.models.linear import Int4Linear, Int8Embedding, Int8Linear, swap_linear
from edge_rt.models.llama import ModelArgs, Transformer, rope_table

INT4_GROUP = 32


def _parts(tensors, target):
    parts = sorted(tensors.get(target, []), key=lambda p: p[0])
    return [src for _, src in parts]


def _check_shape(target: str, got: tuple, want: tuple) -> None:
    if tuple(got) != tuple(want):
        raise ModelFormatError(f"tensor for {target} has shape {tuple(got)}, the config implies {tuple(want)}")


INT4_KERNELS = ("auto", "native_vnni", "native_bf16", "native", "pytorch")


def int4_kernel_for(device: torch.device, dtype: torch.dtype, in_features: int) -> tuple[str, int]:
    """Which packed int4 kernel runs here: ("native_vnni" | "native_bf16" | "native" | "cpu" | "cuda" |
    "dense", CUDA inner_k_tiles).

    CPU, bf16: edge-rt's own kernels (models/int4_matmul.c): "native_vnni" where the CPU has
    AVX-512 VNNI (activations rounded to int8 per 32-wide group, as llama.cpp rounds them, then
    exact integer dot products), else "native_bf16" where it has AVX-512 BF16, else "native"
    (AVX2 + FMA) where PyTorch's CPU kernels run at AVX2 level, else PyTorch's
    _weight_int4pack_mm_for_cpu ("cpu"). Measured on one CPU in the real model
    (docs/BENCHMARKS.md), time against PyTorch's AVX-512 kernel: native_vnni 0.85x for a decode
    step and 0.58x for an 8-token verify, native_bf16 0.91x and 0.68x; native 0.70x PyTorch's AVX2
    kernel's but 1.09x its AVX-512 one's.
    $EDGE_RT_INT4_KERNEL=native_vnni|native_bf16|native|pytorch overrides the choice (a kernel the
    CPU cannot run falls through to the next). CPU, other dtypes: "cpu". CUDA: tinygemm's
    _weight_int4pack_mm, bf16 inputs only, compute capability 8.0+, K a multiple of
    16 * inner_k_tiles. Anything else (MPS, older GPUs, fp16 on CUDA) runs a dequantized weight.
    """
    choice = os.environ.get("EDGE_RT_INT4_KERNEL", "auto").strip().lower() or "auto"
    if choice not in INT4_KERNELS:
        raise ValueError(f"EDGE_RT_INT4_KERNEL={choice!r}: expected one of {', '.join(INT4_KERNELS)}")
    if device.type == "cpu" and dtype == torch.bfloat16 and in_features % 32 == 0 and choice != "pytorch":
        from edge_rt.models.native_kernels import int4_available

        if choice in ("auto", "native_vnni") and int4_available("native_vnni"):
            return "native_vnni", 8
        if choice in ("auto", "native_bf16") and int4_available("native_bf16"):
            return "native_bf16", 8
        if (choice == "native" or torch.backends.cpu.get_cpu_capability() == "AVX2") and int4_available():
            return "native", 8
    if device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu", 8
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 8:
        for tiles in (8, 4, 2):
            if in_features % (16 * tiles) == 0:
                return "cuda", tiles
    return "dense", 8


def int8_kernel_for(int4_kernel: str) -> str | None:
    """Which kernel keeps GGUF Q8_0 weights int8 (Int8Linear) next to int4 layers on
    `int4_kernel`: "native_vnni" beside native_vnni, else "native_bf16" beside either AVX-512
    kernel where the CPU has AVX-512 BF16; None: they run as two 4-bit halves on `int4_kernel`."""
    from edge_rt.models.native_kernels import int4_available

    if int4_kernel == "native_vnni":
        return "native_vnni"
    if int4_kernel == "native_bf16" and int4_available("native_bf16"):
        return "native_bf16"
    return None


def _linear(target, srcs, bias, want, use_int4, dtype, device) -> nn.Module:
    """One linear module from its source parts: packed int4 where the file type allows, else dense."""
    if use_int4:
        split = [s.int4() for s in srcs]
        if all(p is not None for p in split):
            q, scale, zero = (torch.cat(x) for x in zip(*split))
            _check_shape(target, q.shape, want)
            kernel, tiles = int4_kernel_for(device, dtype, q.shape[1])
            return Int4Linear(q, scale, zero, INT4_GROUP, bias, dtype, device, kernel=kernel, inner_k_tiles=tiles)
        split8 = [s.int8() for s in srcs]
        if all(p is not None for p in split8):
            q8, d = (torch.cat(x) for x in zip(*split8))
            _check_shape(target, q8.shape, want)
            kernel, tiles = int4_kernel_for(device, dtype, 2 * q8.shape[1])
            int8 = int8_kernel_for(kernel)
            if int8:
                return Int8Linear(q8, d, bias, dtype, device, kernel=int8)
            return Int4Linear(*int8_as_int4(q8, d), INT4_GROUP, bias, dtype, device, input_repeat=2,
                              kernel=kernel, inner_k_tiles=tiles)
    w = torch.cat([s.dense() for s in srcs])
    _check_shape(target, w.shape, want)
    new = nn.Linear(want[1], want[0], bias=bias is not None, device=device, dtype=dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def build_model(args: ModelArgs, tensors: dict, dtype: torch.dtype, device: torch.device,
                n_ctx: int, quantized: bool = True, progress=None) -> Transformer:
    """Build a Transformer on `device` from source tensors keyed by model target.

    Args:
        args: hyper-parameters.
        tensors: model target -> [(part, SourceTensor)].
        dtype: compute dtype for activations and dense weights.
        device: torch device.
        n_ctx: context length to prepare rotary tables for.
        quantized: keep Q4_0/Q4_1 codes packed (Int4Linear) instead of dequantizing.
        progress: optional callable(done, total) for progress display.
    """
    with torch.device("meta"):
        model = Transformer(args)
    use_int4 = quantized and dtype in (torch.float16, torch.bfloat16)
    linear_names = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = dict(model.named_parameters())
    targets = list(params)
    for i, target in enumerate(targets):
        if progress:
            progress(i, len(targets))
        module_name, _, kind = target.rpartition(".")
        if target == "lm_head.weight" and "lm_head.weight" not in tensors:
            continue  # tied: assigned after the embedding
        srcs = _parts(tensors, target)
        if not srcs:
            if kind == "bias":
                raise ModelFormatError(f"model file lacks the bias tensors for {module_name}")
            raise ModelFormatError(f"model file lacks tensor {target}")
        want = tuple(params[target].shape)
        if module_name in linear_names and kind == "weight":
            module = model.get_submodule(module_name)
            bias = None
            if module.bias is not None:
                bsrcs = _parts(tensors, module_name + ".bias")
                if not bsrcs:
                    raise ModelFormatError(f"model file lacks the bias tensors for {module_name}")
                bias = torch.cat([s.dense() for s in bsrcs])
            swap_linear(model, module_name, _linear(target, srcs, bias, want, use_int4, dtype, device))
        elif kind == "bias" and module_name in linear_names:
            continue  # handled with its weight
        elif target == "embed.weight" and use_int4 and srcs[0].int8() is not None:
            q, d = srcs[0].int8()
            _check_shape(target, q.shape, want)
            model.embed = Int8Embedding(q, d, INT4_GROUP, dtype, device)
        else:
            w = torch.cat([s.dense() for s in srcs]) if len(srcs) > 1 else srcs[0].dense()
            _check_shape(target, w.shape, want)
            keep_fp32 = "norm" in module_name
            owner = model.get_submodule(module_name)
            setattr(owner, kind, nn.Parameter(w.to(device, torch.float32 if keep_fp32 else dtype), requires_grad=False))
    unused = sorted(set(tensors) - set(targets))
    if unused:
        raise ModelFormatError(f"model file has tensors the {args.model_type} model does not use: {', '.join(unused[:3])}")
    if "lm_head.weight" not in tensors:  # tied to the embedding
        if isinstance(model.embed, nn.Embedding):
            head = nn.Linear(args.hidden_size, args.vocab_size, bias=False, device="meta")
            head.weight = model.embed.weight
        else:
            head = _linear("lm_head.weight", _parts(tensors, "embed.weight"), None,
                           (args.vocab_size, args.hidden_size), use_int4, dtype, device)
        swap_linear(model, "lm_head", head)
    model.register_buffer("rope", rope_table(args, n_ctx).to(device), persistent=False)
    model.compute_dtype = dtype
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.is_meta:
            raise ModelFormatError(f"model file lacks tensor {name}")
    if progress:
        progress(len(targets), len(targets))
    release_heap()
    return model.eval().requires_grad_(False)


def release_heap() -> None:
    """Hand the decoder's freed scratch memory back to the OS (glibc keeps it otherwise)."""
    import ctypes
    import ctypes.util
    import sys

    if sys.platform.startswith("linux") and ctypes.util.find_library("c"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
