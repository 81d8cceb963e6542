"""Tiny random llama-family GGUF files for tests, written the way llama.cpp writes real ones.

`write_tiny_gguf(path)` writes a complete model file: the `{arch}.*` hyper-parameters that
llama.cpp's convert_hf_to_gguf.py writes, a small byte-level BPE tokenizer (gpt2 model, the 256
byte characters, merges learned from a fixed paragraph, three ChatML control tokens), and
random weights under llama.cpp's tensor names (gguf-py tensor_mapping.py), with Q and K rows
permuted for llama/mistral as convert_hf_to_gguf.py's LlamaModel.permute does.

`gguf_layout(data)` walks the bytes of a GGUF file and returns where each field is (written
from the GGUF spec, docs/gguf.md in ggml, independently of the reader under test); the fuzz
tests use it to find length and count fields, `set_tensor_type` to patch a tensor's type id.
"""

from __future__ import annotations

import functools
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from gguf import GGUFWriter
from gguf import quants as gq

from edge_rt.models.llama import ModelArgs
from edge_rt.models.llama import preset as model_preset

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)
BOS_ID, EOS_ID = 1, 2
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5  # llama.cpp llama_token_type

# Text the merges are learned from (any fixed English text would do).
_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model runs on the device in front of you,
reads the weights from one file, and writes the answer one token at a time. The capital of
France is Paris; the capital of Italy is Rome; the capital of Spain is Madrid. Once upon a time
there was a little robot that wanted to learn how to tell stories, so it read every book in the
library, from the first shelf to the last, and then it started to write its own. In the morning
the sun rises in the east, and in the evening it sets in the west. Numbers like 1, 2, 3 and 42
appear in text as well as words such as language, model, token, context, memory and attention.
"""


# --- tokenizer ---------------------------------------------------------------------------------


def _byte_chars() -> list[str]:
    """GPT-2's byte -> character map (llama.cpp unicode_byte_to_utf8), in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


@functools.lru_cache(maxsize=8)
def tiny_vocab(vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE vocabulary of exactly `vocab_size` tokens.

    Merges are learned greedily from `_CORPUS` (most frequent pair first, ties by the pair's
    text); when the corpus runs out of pairs the rest is filled with unused placeholder tokens.
    """
    byte_chars = _byte_chars()
    tokens = [*SPECIAL_TOKENS, *byte_chars]
    types = [TOKEN_CONTROL] * len(SPECIAL_TOKENS) + [TOKEN_NORMAL] * 256
    if vocab_size < len(tokens):
        raise ValueError(f"vocab_size must be at least {len(tokens)}, got {vocab_size}")
    counts: dict[tuple[str, ...], int] = {}
    for w in re.findall(r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+", _CORPUS):
        key = tuple(byte_chars[b] for b in w.encode())
        counts[key] = counts.get(key, 0) + 1
    merges: list[str] = []
    while len(tokens) < vocab_size:
        pairs: dict[tuple[str, str], int] = {}
        for word, n in counts.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] = pairs.get((a, b), 0) + n
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        types.append(TOKEN_NORMAL)
        merged = {}
        for word, n in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        counts = merged
    while len(tokens) < vocab_size:
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(TOKEN_UNUSED)
    return tokens, types, merges


# --- weights -------------------------------------------------------------------------------------


def tiny_weights(args: ModelArgs, seed: int = 0) -> dict[str, np.ndarray]:
    """Random fp32 weights under GGUF tensor names, in the Hugging Face layout (Q/K not permuted).

    Shapes are in torch order ([out, in] for linear weights).
    """
    rng = np.random.default_rng(seed)
    r = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    d, f = args.hidden_size, args.intermediate_size
    w = {"token_embd.weight": r(args.vocab_size, d), "output_norm.weight": 1 + r(d)}
    if not args.tie_word_embeddings:
        w["output.weight"] = r(args.vocab_size, d)
    for i in range(args.num_hidden_layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = 1 + r(d)
        w[p + "attn_q.weight"] = r(args.q_dim, d)
        w[p + "attn_k.weight"] = r(args.kv_dim, d)
        w[p + "attn_v.weight"] = r(args.kv_dim, d)
        if args.attention_bias:
            w[p + "attn_q.bias"] = r(args.q_dim)
            w[p + "attn_k.bias"] = r(args.kv_dim)
            w[p + "attn_v.bias"] = r(args.kv_dim)
        w[p + "attn_output.weight"] = r(d, args.q_dim)
        w[p + "ffn_norm.weight"] = 1 + r(d)
        w[p + "ffn_gate.weight"] = r(f, d)
        w[p + "ffn_up.weight"] = r(f, d)
        w[p + "ffn_down.weight"] = r(d, f)
    return w


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: half-split rotary rows -> interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode_tensor(w: np.ndarray, qtype: QT) -> tuple[np.ndarray, QT | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype) for one weight in `qtype`."""
    if qtype == QT.F32:
        return w.astype(np.float32), None
    if qtype == QT.F16:
        return w.astype(np.float16), None
    if qtype in (QT.I8, QT.I16, QT.I32):  # integer tensors (edge-rt does not load them)
        return np.round(w * 100).astype({QT.I8: np.int8, QT.I16: np.int16, QT.I32: np.int32}[qtype]), None
    return gq.quantize(w, qtype), qtype  # uint8 bytes [rows, bytes per row]


# --- the file ------------------------------------------------------------------------------------


def _infer_type(value) -> VT:
    if isinstance(value, bool):
        return VT.BOOL
    if isinstance(value, int):
        return VT.UINT32 if 0 <= value < 2**32 else VT.INT64
    if isinstance(value, float):
        return VT.FLOAT32
    if isinstance(value, str):
        return VT.STRING
    if isinstance(value, (list, tuple)):
        return VT.ARRAY
    raise TypeError(f"no GGUF type for {value!r}")


def write_tiny_gguf(path, preset: str = "tiny", qtype: str = "Q8_0", seed: int = 0, arch: str | None = None, *,
                    metadata: dict | None = None, tensor_types: dict | None = None, **overrides) -> Path:
    """Write a tiny random model as a GGUF file, like llama.cpp's converter would.

    Args:
        path: the file to write.
        preset: an `edge_rt.models.llama.PRESETS` name; `overrides` replace its fields
            (e.g. num_hidden_layers=1, max_position_embeddings=64).
        qtype: GGML type of the 2-D weights (token_embd, attention and FFN projections):
            "F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1" (norms and biases stay F32,
            as llama.cpp keeps them).
        seed: seed of the random weights (`tiny_weights`).
        arch: general.architecture, and the prefix of the hyper-parameter keys; default: the
            preset's model_type ("llama" for "tiny").
        metadata: GGUF keys to set or replace; a value None removes the key, a value
            (value, GGUFValueType) gives the type explicitly.
        tensor_types: GGUF tensor name -> GGML type name, overriding `qtype` per tensor
            (also "I8", "I16", "I32": integer tensors edge-rt does not load).
    Returns:
        The path written.
    """
    path = Path(path)
    args = model_preset(preset, **overrides)
    arch = arch or args.model_type
    tokens, types, merges = tiny_vocab(args.vocab_size)
    kv: dict[str, tuple[object, VT]] = {
        "general.name": ("tiny-random", VT.STRING),
        f"{arch}.block_count": (args.num_hidden_layers, VT.UINT32),
        f"{arch}.context_length": (args.max_position_embeddings, VT.UINT32),
        f"{arch}.embedding_length": (args.hidden_size, VT.UINT32),
        f"{arch}.feed_forward_length": (args.intermediate_size, VT.UINT32),
        f"{arch}.attention.head_count": (args.num_attention_heads, VT.UINT32),
        f"{arch}.attention.head_count_kv": (args.num_key_value_heads, VT.UINT32),
        f"{arch}.rope.freq_base": (float(args.rope_theta), VT.FLOAT32),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(args.rms_norm_eps), VT.FLOAT32),
        f"{arch}.vocab_size": (args.vocab_size, VT.UINT32),
        "tokenizer.ggml.model": ("gpt2", VT.STRING),
        "tokenizer.ggml.pre": ("gpt-2", VT.STRING),
        "tokenizer.ggml.tokens": (tokens, VT.ARRAY),
        "tokenizer.ggml.token_type": (types, VT.ARRAY),
        "tokenizer.ggml.merges": (merges, VT.ARRAY),
        "tokenizer.ggml.bos_token_id": (BOS_ID, VT.UINT32),
        "tokenizer.ggml.eos_token_id": (EOS_ID, VT.UINT32),
        "tokenizer.ggml.add_bos_token": (False, VT.BOOL),
    }
    if args.head_dim != args.hidden_size // args.num_attention_heads:
        kv[f"{arch}.attention.key_length"] = (args.head_dim, VT.UINT32)
        kv[f"{arch}.attention.value_length"] = (args.head_dim, VT.UINT32)
    for key, value in (metadata or {}).items():
        if value is None:
            kv.pop(key, None)
        elif isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], VT):
            kv[key] = value
        else:
            kv[key] = (value, kv[key][1] if key in kv else _infer_type(value))

    writer = GGUFWriter(path, arch)
    for key, (value, vtype) in kv.items():
        sub = None
        if vtype == VT.ARRAY and value:
            sub = VT.INT32 if key == "tokenizer.ggml.token_type" else _infer_type(value[0])
        writer.add_key_value(key, value, vtype, sub_type=sub)

    permute = arch in ("llama", "mistral")
    types_by_name = tensor_types or {}
    for name, w in tiny_weights(args, seed).items():
        if permute and ".attn_q.weight" in name:
            w = permute_qk(w, args.num_attention_heads)
        elif permute and ".attn_k.weight" in name:
            w = permute_qk(w, args.num_key_value_heads)
        default = qtype if w.ndim == 2 else "F32"
        array, raw_dtype = _encode_tensor(w, QT[types_by_name.get(name, default)])
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --- the bytes of a GGUF file (docs/gguf.md) -------------------------------------------------------

# GGUF value type -> size in bytes of one value (scalars only; 8 = STRING, 9 = ARRAY)
_SCALAR_SIZE = {VT.UINT8: 1, VT.INT8: 1, VT.UINT16: 2, VT.INT16: 2, VT.UINT32: 4, VT.INT32: 4,
                VT.FLOAT32: 4, VT.BOOL: 1, VT.UINT64: 8, VT.INT64: 8, VT.FLOAT64: 8}


@dataclass(frozen=True)
class Span:
    offset: int
    size: int
    kind: str  # "magic" "version" "count" "strlen" "str" "type" "arraylen" "value" "ndims" "dim" "ggml_type" "data_offset"
    label: str  # the key or tensor it belongs to


@dataclass
class Layout:
    spans: list[Span]
    kv_start: int  # first metadata key/value
    tensor_info_start: int  # first tensor info
    data_start: int  # tensor data (aligned)
    size: int

    def of_kind(self, *kinds: str) -> list[Span]:
        return [s for s in self.spans if s.kind in kinds]


def gguf_layout(data: bytes) -> Layout:
    """Where every field of a valid little-endian GGUF v3 file is."""
    spans: list[Span] = []
    pos = 0

    def take(n: int, kind: str, label: str, fmt: str | None = None):
        nonlocal pos
        spans.append(Span(pos, n, kind, label))
        v = struct.unpack_from(fmt, data, pos)[0] if fmt else None
        pos += n
        return v

    def string(kind_len: str, label: str) -> str:
        n = take(8, kind_len, label, "<Q")
        start = pos
        take(n, "str", label)
        return data[start:start + n].decode()

    def value(vtype: int, label: str):
        if vtype == VT.STRING:
            return string("strlen", label)
        if vtype == VT.ARRAY:
            itype = take(4, "type", label, "<I")
            n = take(8, "arraylen", label, "<Q")
            return [value(itype, label) for _ in range(n)]
        size = _SCALAR_SIZE[VT(vtype)]
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[size]
        return take(size, "value", label, fmt)

    take(4, "magic", "GGUF")
    take(4, "version", "GGUF", "<I")
    n_tensors = take(8, "count", "tensor_count", "<Q")
    n_kv = take(8, "count", "kv_count", "<Q")
    kv_start = pos
    alignment = 32
    for _ in range(n_kv):
        key = string("strlen", "key")
        vtype = take(4, "type", key, "<I")
        v = value(vtype, key)
        if key == "general.alignment":
            alignment = v
    tensor_info_start = pos
    for _ in range(n_tensors):
        name = string("strlen", "tensor name")
        n_dims = take(4, "ndims", name, "<I")
        for _ in range(n_dims):
            take(8, "dim", name, "<Q")
        take(4, "ggml_type", name, "<I")
        take(8, "data_offset", name, "<Q")
    data_start = -(-pos // alignment) * alignment
    return Layout(spans, kv_start, tensor_info_start, data_start, len(data))


def set_tensor_type(path, name: str, type_id: int) -> None:
    """Overwrite the GGML type id of tensor `name` in the file at `path` (in place)."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    span = next(s for s in gguf_layout(bytes(data)).of_kind("ggml_type") if s.label == name)
    struct.pack_into("<I", data, span.offset, type_id)
    path.write_bytes(bytes(data))
