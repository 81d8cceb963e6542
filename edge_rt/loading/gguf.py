"""GGUF files: memory-mapped through the `gguf` package, validated before use.

`open_gguf(path)` returns a `GGUFModelFile` with the metadata as plain Python values, the
`ModelArgs`, and one `SourceTensor` per tensor (named in the model's own names). Nothing is
decoded until the loader asks for it.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader

from edge_rt.errors import ModelFormatError, UnsupportedModelError, one_line
from edge_rt.loading import quants
from edge_rt.loading.names import GGUF_NAMES, map_name
from edge_rt.models.llama import ARCHITECTURES, ModelArgs

GGUF_MAGIC = b"GGUF"

# GGUF metadata key (with {arch} = general.architecture) -> ModelArgs field. From llama.cpp's
# gguf-py constants (Keys.LLM / Keys.Attention / Keys.Rope).
GGUF_ARGS = {
    "hidden_size": "{arch}.embedding_length",
    "intermediate_size": "{arch}.feed_forward_length",
    "num_hidden_layers": "{arch}.block_count",
    "num_attention_heads": "{arch}.attention.head_count",
    "num_key_value_heads": "{arch}.attention.head_count_kv",
    "head_dim": "{arch}.attention.key_length",
    "rms_norm_eps": "{arch}.attention.layer_norm_rms_epsilon",
    "rope_theta": "{arch}.rope.freq_base",
    "max_position_embeddings": "{arch}.context_length",
    "sliding_window": "{arch}.attention.sliding_window",
    "vocab_size": "{arch}.vocab_size",
}
REQUIRED_ARGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Architectures whose GGUF conversion permuted the rows of Q and K for llama.cpp's interleaved
# rotary embedding (convert_hf_to_gguf.py LlamaModel.permute). We undo it at load so the model
# always uses the Hugging Face (half-split) rotary layout. qwen2 uses NEOX rope: not permuted.
ROPE_PERMUTED_ARCHS = {"llama", "mistral"}
# Llama 3.1-style GGUFs carry their rope scaling as per-frequency divisors in this tensor.
ROPE_FREQS = "rope_freqs.weight"


@dataclass
class SourceTensor:
    """One tensor of a model file, not yet decoded."""

    name: str  # name in the file
    shape: tuple[int, ...]  # torch order ([out, in] for weights)
    qtype: Any  # GGMLQuantizationType
    raw: np.ndarray | None = None  # file bytes (memory-mapped)
    row_perm: torch.Tensor | None = None  # applied to rows after decoding
    array: Any = None  # for dense sources (safetensors): a tensor-producing callable

    def int4(self):
        """(q, scale, zero) when the type maps exactly onto Int4Linear, else None."""
        if self.qtype not in quants.INT4_TYPES or len(self.shape) != 2:
            return None
        q, scale, zero = quants.split_int4(self.raw, self.qtype, self.shape)
        if self.row_perm is not None:
            q, scale, zero = q[self.row_perm], scale[self.row_perm], zero[self.row_perm]
        return q, scale, zero

    def int8(self):
        """(q int8 [N, K], d [N, K/32]) for Q8_0 weights, else None."""
        if self.qtype != QT.Q8_0 or len(self.shape) != 2:
            return None
        q, d = quants.split_q8_0(self.raw, self.shape)
        if self.row_perm is not None:
            q, d = q[self.row_perm], d[self.row_perm]
        return q, d

    def dense(self) -> torch.Tensor:
        """The tensor in fp32 (bit-exact dequantization)."""
        if self.array is not None:
            t = self.array().float()
        else:
            t = quants.dequantize(self.raw, self.qtype, self.shape)
        return t[self.row_perm] if self.row_perm is not None else t


@dataclass
class GGUFModelFile:
    path: Path
    metadata: dict[str, Any]
    args: ModelArgs
    tensors: dict[str, list[tuple[int, SourceTensor]]]  # model target -> [(part, tensor)]
    file_types: dict[str, int]  # tensor type name -> count

    @property
    def architecture(self) -> str:
        return self.args.model_type


GGML_MAX_DIMS = 4  # ggml.h
GGUF_DEFAULT_ALIGNMENT = 32  # gguf.h; general.alignment overrides it
# GGUF value type id -> bytes of one value, for the fixed-size types; 8 is STRING, 9 ARRAY
# (ggml's docs/gguf.md, gguf-py GGUFValueType).
GGUF_VALUE_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_STRING, GGUF_ARRAY, GGUF_UINT32 = 8, 9, 4


class _HeaderCursor:
    """Reads the GGUF header; never past the end of the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def left(self) -> int:
        return len(self.buf) - self.pos

    def skip(self, n: int, what: str) -> int:
        if n > self.left():
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF: {what} at byte {self.pos} "
                                   f"needs {n} bytes, the file has {self.left()} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.skip(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.skip(8, what))[0]

    def string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        start = self.skip(n, what)
        return bytes(self.buf[start : start + n])

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.u64(what)
        if n * min_item_bytes > self.left():
            raise ModelFormatError(f"{self.path}: corrupt or truncated GGUF: {what} is {n}, more than the "
                                   f"{self.left()} bytes left in the file can hold")
        return n


def _label(raw: bytes) -> str:
    """A key or tensor name from the file, fit for a one-line message."""
    s = raw[:100].decode("utf-8", "replace")
    return s if s.isprintable() else repr(s)


def _check_value(cur: _HeaderCursor, vtype: int, key: str) -> int | None:
    """Skip one metadata value; returns it when it is a UINT32 (for general.alignment)."""
    if vtype == GGUF_UINT32:
        return cur.u32(f"value of {key}")
    if vtype in GGUF_VALUE_SIZES:
        cur.skip(GGUF_VALUE_SIZES[vtype], f"value of {key}")
    elif vtype == GGUF_STRING:
        cur.string(f"value of {key}")
    elif vtype == GGUF_ARRAY:
        itype = cur.u32(f"item type of {key}")
        if itype in GGUF_VALUE_SIZES:
            n = cur.count(f"length of array {key}", GGUF_VALUE_SIZES[itype])
            cur.skip(n * GGUF_VALUE_SIZES[itype], f"items of {key}")
        elif itype == GGUF_STRING:
            for _ in range(cur.count(f"length of array {key}", 8)):
                cur.string(f"item of {key}")
        elif itype == GGUF_ARRAY:  # llama.cpp's gguf.cpp refuses them too
            raise UnsupportedModelError(f"{cur.path}: metadata {key} is an array of arrays (not supported)")
        else:
            raise ModelFormatError(f"{cur.path}: corrupt GGUF: metadata {key} has item type {itype}")
    else:
        raise ModelFormatError(f"{cur.path}: corrupt GGUF: metadata {key} has value type {vtype}")
    return None


def _check_layout(buf, path: Path) -> None:
    """Walk the header (docs/gguf.md) and check every length, count, type and tensor extent.

    gguf.GGUFReader trusts the counts it reads: a corrupt array length makes it loop over (and
    keep a numpy view of) every remaining item of the file, gigabytes for a real model. This
    walk reads no more than the file has and keeps nothing, so GGUFReader only ever sees a
    header whose counts fit the file.
    """
    cur = _HeaderCursor(buf, path)
    cur.skip(4, "magic")
    version = cur.u32("version")
    if version & 0xFFFF == 0:
        raise UnsupportedModelError(f"{path}: big-endian GGUF files are not supported")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.count("tensor count", 24)  # name length, n_dims, type, offset
    n_kv = cur.count("metadata count", 13)  # key length, type, one byte of value
    alignment = GGUF_DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        key = _label(cur.string("metadata key"))
        value = _check_value(cur, cur.u32(f"type of {key}"), key)
        if key == "general.alignment" and value is not None:
            alignment = value
    if alignment == 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{path}: corrupt GGUF: general.alignment {alignment} is not a power of two")
    extents = []
    for _ in range(n_tensors):
        name = _label(cur.string("tensor name"))
        n_dims = cur.u32(f"dimension count of tensor {name}")
        if n_dims > GGML_MAX_DIMS:
            raise ModelFormatError(f"{path}: corrupt GGUF: tensor {name} has {n_dims} dimensions (at most 4)")
        dims = [cur.u64(f"dimensions of tensor {name}") for _ in range(n_dims)]
        type_id = cur.u32(f"type of tensor {name}")
        offset = cur.u64(f"data offset of tensor {name}")
        try:
            qtype = QT(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"tensor {name}: ggml type {type_id} is unknown (a newer GGUF than edge-rt reads, or a corrupt file)"
            ) from None
        quants.check_supported(name, qtype)
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise ModelFormatError(f"tensor {name}: row length {dims[0]} is not a multiple of the "
                                   f"{qtype.name} block size {block}")
        extents.append((name, offset, int(np.prod(dims, dtype=object)) // block * type_size))
    data_start = -(-cur.pos // alignment) * alignment
    for name, offset, nbytes in extents:
        end = data_start + offset + nbytes
        if end > len(buf):
            raise ModelFormatError(f"{path}: truncated GGUF: tensor {name} ends at byte {end}, file has {len(buf)}")


def _reader(path: Path) -> GGUFReader:
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            _check_layout(buf, path)
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError,
            MemoryError, AssertionError, EOFError, OSError) as e:
        raise ModelFormatError(f"{path}: corrupt or truncated GGUF ({type(e).__name__}: {one_line(e)})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != t.n_bytes:
            raise ModelFormatError(f"{path}: truncated GGUF: tensor {t.name} ends at byte {end}, file has {size}")
    return reader




def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError, TypeError) as e:
            raise ModelFormatError(f"metadata key {key!r} is corrupt ({one_line(e)})") from None
    return meta


def args_from_metadata(meta: dict[str, Any], n_vocab_tokens: int | None) -> ModelArgs:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFormatError("GGUF has no general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    values = {}
    for field, key in GGUF_ARGS.items():
        v = meta.get(key.format(arch=arch))
        if v is not None:
            values[field] = v
    missing = [f for f in REQUIRED_ARGS if f not in values]
    if missing:
        raise ModelFormatError(f"GGUF metadata lacks {', '.join(GGUF_ARGS[m].format(arch=arch) for m in missing)}")
    if "vocab_size" not in values and n_vocab_tokens:
        values["vocab_size"] = n_vocab_tokens
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        values["rope_scaling"] = {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    elif scaling not in (None, "none"):
        raise UnsupportedModelError(f"rope scaling {scaling!r} is not supported")
    try:
        args = ModelArgs(model_type=arch, **values)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise ModelFormatError(f"inconsistent GGUF hyper-parameters: {one_line(e)}") from None
    try:
        args.validate()
    except ValueError as e:
        raise ModelFormatError(f"GGUF hyper-parameter {one_line(e)}") from None
    if args.hidden_size % args.num_attention_heads:
        raise ModelFormatError("GGUF head counts do not divide the embedding size")
    args.attention_bias = ARCHITECTURES[arch].get("attention_bias", False)
    args.bos_token_id = meta.get("tokenizer.ggml.bos_token_id")
    args.eos_token_id = meta.get("tokenizer.ggml.eos_token_id")
    return args


def _rope_unpermute(rows: int, n_heads: int) -> torch.Tensor:
    """Row order that undoes convert_hf_to_gguf's permute for `n_heads` heads."""
    hd = rows // n_heads
    return torch.arange(rows).reshape(n_heads, hd // 2, 2).transpose(1, 2).reshape(-1)


def open_gguf(path: str | os.PathLike) -> GGUFModelFile:
    """Open and validate a GGUF model file (memory-mapped; nothing decoded yet)."""
    path = Path(path)
    reader = _reader(path)
    meta = read_metadata(reader)
    tokens = meta.get("tokenizer.ggml.tokens")
    args = args_from_metadata(meta, len(tokens) if isinstance(tokens, list) else None)
    permute = args.model_type in ROPE_PERMUTED_ARCHS
    tensors: dict[str, list[tuple[int, SourceTensor]]] = {}
    file_types: dict[str, int] = {}
    for t in reader.tensors:
        qtype = t.tensor_type
        quants.check_supported(t.name, qtype)
        shape = tuple(int(s) for s in reversed([int(x) for x in t.shape]))
        if len(shape) == 2 and qtype not in (QT.F32, QT.F16, QT.BF16) and shape[1] % quants.BLOCK:
            raise ModelFormatError(f"tensor {t.name}: row length {shape[1]} is not a multiple of the block size")
        target, part = map_name(GGUF_NAMES, t.name)
        file_types[qtype.name] = file_types.get(qtype.name, 0) + 1
        if t.name == ROPE_FREQS:
            factors = quants.dequantize(t.data, qtype, shape)
            if factors.shape != (args.head_dim // 2,) or not bool((factors > 0).all()):
                raise ModelFormatError(f"tensor {t.name}: expected {args.head_dim // 2} positive factors")
            args.rope_scaling = {"rope_type": "freq_factors", "factors": factors.tolist()}
            continue
        if target is None:
            continue
        src = SourceTensor(name=t.name, shape=shape, qtype=qtype, raw=t.data)
        if permute and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = args.num_attention_heads if ".attn_q." in t.name else args.num_key_value_heads
            if shape[0] % (2 * heads):  # weights and biases alike
                raise ModelFormatError(f"tensor {t.name}: shape {shape} does not split into {heads} heads")
            src.row_perm = _rope_unpermute(shape[0], heads)
        tensors.setdefault(target, []).append((part, src))
    args.tie_word_embeddings = "lm_head.weight" not in tensors
    # some llama-architecture conversions carry q/k/v biases; the file's tensors say so
    args.attention_bias = args.attention_bias or any(t.endswith("attn.wqkv.bias") for t in tensors)
    return GGUFModelFile(path=path, metadata=meta, args=args, tensors=tensors, file_types=file_types)
