"""Tokenizers for GGUF files and Hugging Face folders, with llama.cpp's semantics.

The BPE merge work is done by the `tokenizers` library; this module only feeds it what
llama.cpp feeds its own tokenizer, so that ids match `llama_tokenize` exactly:

- the pre-tokenizer regexes are llama.cpp's, per `tokenizer.ggml.pre` (`_BPE_PRE_TYPES`);
- special tokens are split out first, the way llama.cpp does it (longest token text first,
  control tokens only when `parse_special`, user-defined tokens always);
- SentencePiece vocabularies (`tokenizer.ggml.model == "llama"`, e.g. Llama 2, Mistral) carry
  scores, not merges: the merges are derived from the scores (a pair merges when the joined
  text is a token; the higher the joined token's score, the earlier it merges), with byte
  fallback, a space prefix before the first text fragment and after each special token, and
  spaces written as U+2581, as llama.cpp's SPM tokenizer does.

Reference for every table here: llama.cpp, src/llama-vocab.cpp and src/unicode.cpp.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_rt.errors import (
    one_line,
    InvalidOptionError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)

log = logging.getLogger(__name__)

# --- GGUF keys (gguf-py `Keys.Tokenizer`) -------------------------------------------------
K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_TOKEN_TYPE = "tokenizer.ggml.token_type"
K_SCORES = "tokenizer.ggml.scores"
K_MERGES = "tokenizer.ggml.merges"
K_BOS = "tokenizer.ggml.bos_token_id"
K_EOS = "tokenizer.ggml.eos_token_id"
K_EOT = "tokenizer.ggml.eot_token_id"
K_EOM = "tokenizer.ggml.eom_token_id"
K_UNK = "tokenizer.ggml.unknown_token_id"
K_FIM_PAD = "tokenizer.ggml.fim_pad_token_id"
K_FIM_REP = "tokenizer.ggml.fim_rep_token_id"
K_FIM_SEP = "tokenizer.ggml.fim_sep_token_id"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"
K_ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
K_CHAT_TEMPLATE = "tokenizer.chat_template"

# --- token attributes: llama.cpp's `llama_token_attr` bits ----------------------------------
ATTR_UNDEFINED = 0
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5

# GGUF `tokenizer.ggml.token_type` values (llama_token_type) -> attribute bits.
_TOKEN_TYPE_TO_ATTR = {
    0: ATTR_UNDEFINED,
    1: ATTR_NORMAL,
    2: ATTR_UNKNOWN,
    3: ATTR_CONTROL,
    4: ATTR_USER_DEFINED,
    5: ATTR_UNUSED,
    6: ATTR_BYTE,
}

# --- pre-tokenizer regexes (llama.cpp `llm_tokenizer_bpe`, one list per pre type) ----------
# Each regex splits every piece left by the previous one; matched and unmatched spans are both
# kept ("isolated"). The strings are llama.cpp's own (its "adapted" forms, not the upstream
# tokenizer.json ones), so that what llama.cpp runs is what runs here.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Code points new in Unicode 16.0. llama.cpp's tables (src/unicode-data.cpp, generated from an
# older Unicode) leave them unassigned: not \p{L}, \p{N} or \p{P}, so they pre-tokenize like
# symbols. The Oniguruma engine in `tokenizers` knows Unicode 16, so these are taken out of its
# classes. Found by classifying every code point with llama-cpp-python 0.3.36 and with
# Oniguruma, and diffing.
_NOT_IN_LLAMACPP_TABLES = (
    (0x01B4E, 0x01B4F), (0x01B7F, 0x01B7F), (0x01C89, 0x01C8A), (0x0A7CB, 0x0A7CD),
    (0x0A7DA, 0x0A7DC), (0x105C0, 0x105F3), (0x10D40, 0x10D65), (0x10D6E, 0x10D85),
    (0x10EC2, 0x10EC4), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D5),
    (0x113D7, 0x113D8), (0x116D0, 0x116E3), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9),
    (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16130, 0x16139), (0x16D40, 0x16D79),
    (0x18CFF, 0x18CFF), (0x1CCF0, 0x1CCF9), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5FA),
    (0x1E5FF, 0x1E5FF),
)


def _with_llamacpp_classes(regex: str) -> str:
    r"""Rewrite \p{L}, \p{N}, \p{P} to leave out `_NOT_IN_LLAMACPP_TABLES`.

    `[\p{L}&&[^...]]` is an Oniguruma class intersection; nested inside another class it is a
    union member, so the rewrite is valid inside and outside brackets.
    """
    excluded = "".join(f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in _NOT_IN_LLAMACPP_TABLES)
    for cat in ("L", "N", "P"):
        regex = regex.replace(f"\\p{{{cat}}}", f"[\\p{{{cat}}}&&[^{excluded}]]")
    return regex


@dataclass(frozen=True)
class _PreType:
    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token that is in the vocab skips the merges
    add_bos: bool = False  # llama.cpp's default when the GGUF has no add_bos_token key


_DEFAULT = _PreType((r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = _PreType((_RE_GPT2,))
_SMOLLM = _PreType((r"\p{N}", _RE_GPT2))  # digits one by one, then GPT-2
_LLAMA3 = _PreType((_RE_LLAMA3,), ignore_merges=True, add_bos=True)
_DBRX = _PreType((_RE_LLAMA3,))
_QWEN2 = _PreType((_RE_QWEN2,))
_FALCON = _PreType((r"[\p{P}\$\+<=>\^~\|`]+", _RE_GPT2, r"[0-9][0-9][0-9]"))
_TEKKEN = _PreType((_RE_TEKKEN,), ignore_merges=True, add_bos=True)
_GPT4O = _PreType((_RE_GPT4O,))

# `tokenizer.ggml.pre` -> pre-tokenizer (llama.cpp `llama_vocab::impl::load`). Names not listed
# here are refused rather than guessed.
_BPE_PRE_TYPES: dict[str, _PreType] = {
    "default": _DEFAULT,
    **dict.fromkeys(
        ["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
         "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "a.x-4.0", "mellum",
         "modern-bert"],
        _GPT2,
    ),
    **dict.fromkeys(
        ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
        _SMOLLM,
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2"],
        _LLAMA3,
    ),
    **dict.fromkeys(["dbrx", "smaug-bpe"], _DBRX),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"], _QWEN2),
    "falcon": _FALCON,
    "tekken": _TEKKEN,
    **dict.fromkeys(["gpt-4o", "llama4"], _GPT4O),
}

SUPPORTED_PRE_TYPES = tuple(sorted(_BPE_PRE_TYPES))

# --- end of generation (llama.cpp `special_eog_ids`) ----------------------------------------
# Token texts that end a turn or a generation, as llama.cpp lists them; a token with one of these
# texts stops generation and is treated as a control token (llama.cpp forces that attribute).
END_OF_TURN_TOKENS = frozenset({
    "<|eot_id|>",  # Llama 3
    "<|im_end|>",  # ChatML (Qwen, SmolLM, ...)
    "<|end|>",  # Phi-3
    "<|return|>", "<|call|>",  # gpt-oss (o200k_harmony)
    "<|flush|>", "<|calls|>",  # solar-open
    "<end_of_turn>",  # Gemma
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<EOT>", "_<EOT>",
    "[EOT]", "[EOS]",  # Kimi-K2
    "<|end_of_text|>",  # Granite
    "<end_of_utterance>",  # SmolDocling
    "<eos>", "<turn|>", "<|tool_response>",  # Gemma 4
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "[e~[",  # MiniMax
})
# Fill-in-the-middle tokens that llama.cpp also stops on when their ids are not in the metadata.
FIM_STOP_TOKENS = {
    K_FIM_PAD: frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    K_FIM_REP: frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    K_FIM_SEP: frozenset({"<|file_sep|>"}),
}
# gpt-oss: llama.cpp renders these as user-defined tokens, and does not stop on <|end|> when
# <|return|> and <|call|> (or solar-open's <|calls|> and <|flush|>) exist.
_ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

_SPM_SPACE = "\u2581"  # "▁", SentencePiece's escaped space


def _byte_level_table() -> dict[int, int]:
    """GPT-2's byte-level map, reversed (llama.cpp `unicode_utf8_to_byte_map`).

    Bytes that are printable characters stand for themselves; the other 68 bytes are written
    as U+0100, U+0101, ... in byte order. Returns {character code: byte}, a str.translate table.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: b for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({0x100 + k: b for k, b in enumerate(others)})
    return table


_CHAR_TO_BYTE = _byte_level_table()


def _byte_level_decode(text: str) -> bytes:
    """A byte-level BPE token's text back to its bytes."""
    mapped = text.translate(_CHAR_TO_BYTE)
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:  # a character outside the byte map: keep it as UTF-8
        return b"".join(
            bytes([_CHAR_TO_BYTE[ord(c)]]) if ord(c) in _CHAR_TO_BYTE else c.encode()
            for c in text
        )


class StreamDecoder:
    """Incremental detokenizer: feed ids one by one, get text as soon as it is complete.

    Bytes of a UTF-8 sequence split across tokens are held back until the sequence is whole,
    so `push` never returns a broken character; invalid bytes become U+FFFD, as in `decode`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer._strip_leading_space  # SPM: drop the added space prefix

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        piece = self._tok._piece(token_id, special=not self._skip_special)
        if self._strip_space and piece and not self._tok.is_control(token_id):
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of stream: return what is held back (an incomplete sequence becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text <-> token ids for one model, matching llama.cpp's `llama_tokenize`.

    Build it with `from_gguf_metadata` or `from_hf_folder`.
    """

    def __init__(
        self,
        *,
        core: Any,
        drop_id: int | None = None,
        kind: str,
        tokens: list[str],
        attrs: list[int],
        pieces: list[bytes],
        bos_id: int | None,
        eos_id: int | None,
        stop_ids: frozenset[int],
        add_bos: bool,
        add_space_prefix: bool,
        chat_template: str | None,
        escape_spaces: bool = False,
    ):
        self._core = core  # tokenizers.Tokenizer without added tokens: plain text only
        self._drop_id = drop_id  # a placeholder id `core` may emit, never part of the result
        self._kind = kind  # "bpe" (byte-level) | "spm" (SentencePiece, ▁ and byte fallback)
        # GGUF SPM: this class adds the space prefix and writes spaces as ▁ (a Hugging Face
        # tokenizer.json does that in its own normalizer)
        self._escape_spaces = escape_spaces
        self._tokens = tokens
        self._attrs = attrs
        self._pieces = pieces  # llama.cpp token_to_piece(special=True), cached like llama.cpp
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = stop_ids
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.vocab_size = len(tokens)
        self._strip_leading_space = kind == "spm" and add_space_prefix
        # special-token texts split out before BPE, longest first (llama.cpp cache_special_tokens)
        special = [
            (t, i) for i, (t, a) in enumerate(zip(tokens, attrs))
            if a & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) and t
        ]
        special.sort(key=lambda ti: (-len(ti[0].encode()), ti[1]))
        self._specials_all = special
        self._specials_user = [(t, i) for t, i in special if attrs[i] & ATTR_USER_DEFINED
                               and not attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN)]

    # --- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes.

        Args:
            meta: GGUF key -> value, as `gguf.GGUFReader(path).fields[key].contents()` gives them.

        Returns:
            The tokenizer. Raises UnsupportedModelError for a tokenizer model or pre-tokenizer
            type llama.cpp has but edge-rt does not, ModelFormatError for bad metadata.
        """
        model = meta.get(K_MODEL)
        if not isinstance(model, str):
            raise ModelFormatError(f"GGUF metadata has no {K_MODEL} string")
        if model not in ("gpt2", "llama"):
            raise UnsupportedModelError(
                f"tokenizer model '{model}' is not supported (supported: gpt2, llama)"
            )
        tokens = _str_list(meta, K_TOKENS, required=True)
        n = len(tokens)
        if n == 0:
            raise ModelFormatError(f"{K_TOKENS} is empty")
        # llama.cpp reads token texts as C strings (cut at a NUL) and renames empty ones
        tokens = [t.partition("\0")[0] or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        vocab = _vocab_dict(tokens)
        attrs = _gguf_attrs(meta, n)
        scores = _gguf_scores(meta, n)

        if model == "gpt2":
            kind = "bpe"
            pre_name = meta.get(K_PRE)
            if pre_name is None:
                log.warning("GGUF has no %s; using llama.cpp's 'default' pre-tokenizer", K_PRE)
                pre_name = "default"
            pre = _BPE_PRE_TYPES.get(pre_name)
            if pre is None:
                raise UnsupportedModelError(
                    f"pre-tokenizer type '{pre_name}' ({K_PRE}) is not supported"
                )
            core, drop_id = _bpe_core(vocab, _gguf_merges(meta, vocab), pre)
            # no BOS/EOS unless the metadata names them (llama.cpp's id 11 is not guessed here)
            default_bos, default_eos, default_add_bos = None, None, pre.add_bos
            default_prefix = False
        else:
            kind = "spm"
            core, drop_id = _spm_core(vocab, tokens, scores, attrs), None
            # llama.cpp's SPM defaults: <s>=1, </s>=2, BOS added, a space before the text
            default_bos, default_eos, default_add_bos = 1, 2, True
            default_prefix = True

        bos_id = _gguf_token_id(meta, K_BOS, n, default_bos)
        eos_id = _gguf_token_id(meta, K_EOS, n, default_eos)
        add_bos = _gguf_bool(meta, K_ADD_BOS, default_add_bos)
        add_space_prefix = _gguf_bool(meta, K_ADD_SPACE_PREFIX, default_prefix)
        if add_bos and bos_id is None:
            raise ModelFormatError(f"{K_ADD_BOS} is true but {K_BOS} is not set")
        metadata_stops = [_gguf_token_id(meta, k, n, None) for k in (K_EOS, K_EOT, K_EOM)]
        fim_ids = {k: _gguf_token_id(meta, k, n, None) for k in FIM_STOP_TOKENS}
        stop_ids = _stop_ids(tokens, attrs, [i for i in metadata_stops if i is not None], fim_ids)

        template = meta.get(K_CHAT_TEMPLATE)
        if template is not None and not isinstance(template, str):
            raise ModelFormatError(f"{K_CHAT_TEMPLATE} is not a string")
        return cls(
            core=core, drop_id=drop_id, kind=kind, tokens=tokens, attrs=attrs,
            pieces=_pieces(tokens, attrs, kind), bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids,
            add_bos=add_bos, add_space_prefix=add_space_prefix, chat_template=template,
            escape_spaces=kind == "spm",
        )

    @classmethod
    def from_hf_folder(cls, path: str | Path) -> Tokenizer:
        """Build the tokenizer of a Hugging Face model folder.

        Reads tokenizer.json (a BPE model: byte-level, or SentencePiece-style with byte
        fallback) and tokenizer_config.json (bos/eos tokens, add_bos_token, chat_template;
        chat_template.jinja when the config has none). Added tokens marked `special` are
        control tokens (parsed only with parse_special), the others user-defined (always
        parsed), as llama.cpp's converter maps them.

        Args:
            path: the model folder.

        Returns:
            The tokenizer. Raises ModelNotFoundError without tokenizer.json, ModelFormatError
            for unreadable files, UnsupportedModelError for a non-BPE model.
        """
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(path)
        tj_path = folder / "tokenizer.json"
        if not tj_path.is_file():
            raise ModelNotFoundError(f"no tokenizer.json in {folder}")
        tj = _read_json(tj_path)
        config_path = folder / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}

        model = tj.get("model") or {}
        if model.get("type") != "BPE":
            raise UnsupportedModelError(
                f"tokenizer.json model type '{model.get('type')}' is not supported (BPE only)"
            )
        tokens, added = _hf_tokens(tj, tj_path)

        byte_level = "ByteLevel" in json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
        spm_like = bool(model.get("byte_fallback")) or _SPM_SPACE in json.dumps(
            [tj.get("normalizer"), tj.get("pre_tokenizer"), tj.get("decoder")], ensure_ascii=False
        )
        if byte_level:
            kind = "bpe"
        elif spm_like:
            kind = "spm"
        else:
            raise UnsupportedModelError(
                f"{tj_path}: BPE without ByteLevel or SentencePiece-style decoding is not supported"
            )
        attrs = [ATTR_NORMAL if t else ATTR_UNUSED for t in tokens]
        if kind == "spm":
            for i, t in enumerate(tokens):
                if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                    attrs[i] = ATTR_BYTE
        for tok_id, special in added.items():
            attrs[tok_id] = ATTR_CONTROL if special else ATTR_USER_DEFINED

        core_json = dict(tj, added_tokens=[], post_processor=None)
        try:
            core = HFTokenizer.from_str(json.dumps(core_json))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise ModelFormatError(f"{tj_path}: {one_line(e)}") from None

        text_to_id = {t: i for i, t in enumerate(tokens) if t}
        bos_id = _hf_special_id(config.get("bos_token"), text_to_id, config_path)
        eos_id = _hf_special_id(config.get("eos_token"), text_to_id, config_path)
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            add_bos = _post_processor_adds(tj.get("post_processor"), tokens, bos_id)
        if add_bos and bos_id is None:
            raise ModelFormatError(f"{config_path}: add_bos_token is true but bos_token is not set")
        prefix = kind == "spm" and (
            '"Prepend"' in json.dumps(tj.get("normalizer"))
            or _metaspace_prepends(tj.get("pre_tokenizer"))
        )
        template = _hf_chat_template(config, folder)
        stop_ids = _stop_ids(tokens, attrs, [eos_id] if eos_id is not None else [],
                             dict.fromkeys(FIM_STOP_TOKENS))
        return cls(
            core=core, kind=kind, tokens=tokens, attrs=attrs, pieces=_pieces(tokens, attrs, kind),
            bos_id=bos_id, eos_id=eos_id, stop_ids=stop_ids, add_bos=add_bos,
            add_space_prefix=prefix, chat_template=template,
        )

    # --- encoding ----------------------------------------------------------------------------

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = False
    ) -> list[int]:
        """Text to ids, as llama.cpp's `llama_tokenize(text, add_special, parse_special)`.

        Args:
            text: the text.
            add_bos: prepend BOS; None means the model's default (`self.add_bos`).
            parse_special: control-token texts in `text` (e.g. "<|im_start|>") become their ids;
                when False they are tokenized as plain text. User-defined tokens are always
                recognized, as in llama.cpp.

        Returns:
            The token ids.
        """
        if not isinstance(text, str):
            raise InvalidOptionError(f"text to encode must be a str, got {type(text).__name__}")
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise InvalidOptionError("this model has no BOS token; use add_bos=False")
            ids.append(self.bos_id)
        prev_special = True  # SPM: a space prefix on the first fragment and after a special token
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                ids.append(frag)
                prev_special = True
                continue
            if self._escape_spaces:
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                frag = frag.replace(" ", _SPM_SPACE)
            frag_ids = self._core.encode(frag, add_special_tokens=False).ids
            if self._drop_id is not None:
                frag_ids = [i for i in frag_ids if i != self._drop_id]
            ids.extend(frag_ids)
            prev_special = False
        return ids

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split special-token texts out of `text` (llama.cpp `tokenizer_st_partition`).

        Tokens are tried longest first; each splits every text fragment left by the previous.
        """
        frags: list[str | int] = [text] if text else []
        specials = self._specials_all if parse_special else self._specials_user
        for tok_text, tok_id in specials:
            if tok_text not in text:
                continue
            out: list[str | int] = []
            for f in frags:
                if isinstance(f, int) or tok_text not in f:
                    out.append(f)
                    continue
                for k, part in enumerate(f.split(tok_text)):
                    if k:
                        out.append(tok_id)
                    if part:
                        out.append(part)
            frags = out
        return frags

    # --- decoding ----------------------------------------------------------------------------

    def token_to_piece(self, token_id: int, special: bool = True) -> bytes:
        """The bytes one token stands for (llama.cpp `llama_token_to_piece`).

        Args:
            token_id: the id.
            special: render control and unknown tokens as their text; if False they are empty.

        Returns:
            The bytes, possibly part of a UTF-8 sequence.
        """
        return self._piece(token_id, special)

    def _piece(self, token_id: int, special: bool) -> bytes:
        self._check_id(token_id)
        if not special and self._attrs[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN):
            return b""
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids to text: the pieces joined, invalid UTF-8 replaced by U+FFFD.

        Args:
            ids: token ids.
            skip_special: drop control and unknown tokens (BOS, <|im_end|>, ...).

        Returns:
            The text. For SentencePiece vocabularies the space that `encode` put before the
            text is removed again. No other cleanup is done, so decode(encode(x)) == x.
        """
        ids = [int(i) for i in ids]
        pieces = [self._piece(i, not skip_special) for i in ids]
        if self._strip_leading_space:  # the added space is in the first text token's piece
            first = next(
                (k for k, i in enumerate(ids) if pieces[k] and not self.is_control(i)), None
            )
            if first is not None and pieces[first][:1] == b" ":
                pieces[first] = pieces[first][1:]
        return b"".join(pieces).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """A new incremental detokenizer for this tokenizer."""
        return StreamDecoder(self, skip_special=skip_special)

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        """True when both map every id to the same token (a draft model must share the target's)."""
        return self._tokens == other._tokens and self._kind == other._kind

    def token_text(self, token_id: int) -> str:
        """The token's text as stored in the vocabulary (e.g. "Ġthe", "<|im_end|>")."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def is_control(self, token_id: int) -> bool:
        """True for control and unknown tokens (those `skip_special` drops)."""
        self._check_id(token_id)
        return bool(self._attrs[token_id] & (ATTR_CONTROL | ATTR_UNKNOWN))

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise InvalidOptionError(f"token id {token_id} is out of range [0, {self.vocab_size})")

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, add_bos={self.add_bos})"
        )


# --- helpers: GGUF metadata ------------------------------------------------------------------


def _str_list(meta: Mapping[str, Any], key: str, required: bool) -> list[str] | None:
    v = meta.get(key)
    if v is None:
        if required:
            raise ModelFormatError(f"GGUF metadata has no {key}")
        return None
    if not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
        raise ModelFormatError(f"{key} is not an array of strings")
    return list(v)


def _vocab_dict(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        j = vocab.setdefault(t, i)
        if j != i:
            raise ModelFormatError(f"duplicate token in vocabulary: {t!r} has ids {j} and {i}")
    return vocab


def _gguf_attrs(meta: Mapping[str, Any], n: int) -> list[int]:
    types = meta.get(K_TOKEN_TYPE)
    if types is None:
        return [ATTR_NORMAL] * n
    if not isinstance(types, (list, tuple)):
        raise ModelFormatError(f"{K_TOKEN_TYPE} is not an array")
    if len(types) < n:
        raise ModelFormatError(f"{K_TOKEN_TYPE} has {len(types)} entries for {n} tokens")
    try:
        return [_TOKEN_TYPE_TO_ATTR.get(int(t), ATTR_UNDEFINED) for t in types[:n]]
    except (TypeError, ValueError):
        raise ModelFormatError(f"{K_TOKEN_TYPE} is not an array of integers") from None


def _gguf_scores(meta: Mapping[str, Any], n: int) -> list[float]:
    scores = meta.get(K_SCORES)
    if scores is None:
        return [0.0] * n
    if not isinstance(scores, (list, tuple)) or len(scores) < n:
        raise ModelFormatError(f"{K_SCORES} must be an array of at least {n} numbers")
    try:
        return [float(s) for s in scores[:n]]
    except (TypeError, ValueError):
        raise ModelFormatError(f"{K_SCORES} is not an array of numbers") from None


def _gguf_merges(meta: Mapping[str, Any], vocab: Mapping[str, int]) -> list[tuple[str, str]]:
    merges = _str_list(meta, K_MERGES, required=True)
    out: list[tuple[str, str]] = []
    for i, m in enumerate(merges):
        pos = m.find(" ", 1)  # llama.cpp: the first space after the first character
        if pos < 0:
            raise ModelFormatError(f"{K_MERGES}[{i}] {m!r} is not two tokens separated by a space")
        a, b = m[:pos], m[pos + 1:]
        if a not in vocab or b not in vocab or a + b not in vocab:
            raise ModelFormatError(f"{K_MERGES}[{i}] {m!r} names a token not in the vocabulary")
        out.append((a, b))
    return out


def _gguf_token_id(meta: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    v = meta.get(key)
    if v is None:
        return default if default is not None and default < n else None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ModelFormatError(f"{key} is not an integer")
    if not 0 <= v < n:
        raise ModelFormatError(f"{key} = {v} is outside the vocabulary of {n} tokens")
    return v


def _gguf_bool(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key)
    if v is None:
        return default
    if not isinstance(v, (bool, int)):
        raise ModelFormatError(f"{key} is not a boolean")
    return bool(v)


# --- helpers: building the `tokenizers` pipeline ---------------------------------------------


def _bpe_core(
    vocab: dict[str, int], merges: list[tuple[str, str]], pre: _PreType
) -> tuple[Any, int | None]:
    """Byte-level BPE: llama.cpp's regex splits, then bytes -> GPT-2 characters, then merges.

    Returns:
        The `tokenizers` pipeline, and the id of a placeholder to drop from its output (None
        when every byte has a token). llama.cpp keeps a byte without a token as a symbol that
        never merges and drops it at the end; `tokenizers` would drop it first and merge its
        neighbours. Mapping such bytes to a placeholder outside the vocabulary keeps them apart.
    """
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    unk = None
    if any(chr(c) not in vocab for c in _CHAR_TO_BYTE):
        unk = "<edge-rt:no-token>"
        while unk in vocab:
            unk += "!"
        vocab = {**vocab, unk: len(vocab)}
    try:
        bpe = models.BPE(
            vocab, merges, ignore_merges=pre.ignore_merges, unk_token=unk, fuse_unk=False
        )
    except Exception as e:  # tokenizers raises plain Exception subclasses
        raise ModelFormatError(f"bad BPE vocabulary: {one_line(e)}") from None
    core = HFTokenizer(bpe)
    splits = [
        pre_tokenizers.Split(Regex(_with_llamacpp_classes(r)), behavior="isolated")
        for r in pre.regexes
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    return core, (vocab[unk] if unk is not None else None)


def _spm_core(
    vocab: dict[str, int], tokens: list[str], scores: list[float], attrs: list[int]
) -> Any:
    """SentencePiece BPE from scores: merges derived from the vocabulary, byte fallback.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined text is a token
    with the highest score (leftmost first on ties). As BPE merges: every split (a, b) of a
    token t with a and b in the vocabulary, ranked by t's score, highest first.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    ranked: list[tuple[float, int, int, str, str]] = []
    for t_id, t in enumerate(tokens):
        for k in range(1, len(t)):
            a, b = t[:k], t[k:]
            if a in vocab and b in vocab:
                ranked.append((-scores[t_id], t_id, k, a, b))
    ranked.sort()
    merges = [(a, b) for _, _, _, a, b in ranked]
    unk = next((t for t, a in zip(tokens, attrs) if a & ATTR_UNKNOWN), None)
    try:
        bpe = models.BPE(vocab, merges, unk_token=unk, byte_fallback=True, fuse_unk=False)
    except Exception as e:
        raise ModelFormatError(f"bad SentencePiece vocabulary: {one_line(e)}") from None
    return HFTokenizer(bpe)


def _pieces(tokens: list[str], attrs: list[int], kind: str) -> list[bytes]:
    """Each token's bytes with special=True (llama.cpp `token_to_piece`, cached at load)."""
    out: list[bytes] = []
    for t, a in zip(tokens, attrs):
        if a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED):
            out.append(t.encode())
        elif a & ATTR_NORMAL and kind == "bpe":
            out.append(_byte_level_decode(t))
        elif a & ATTR_NORMAL:
            out.append(t.replace(_SPM_SPACE, " ").encode())
        elif a & ATTR_BYTE:
            out.append(_byte_token_value(t))
        else:  # unused / undefined tokens render as nothing
            out.append(b"")
    return out


def _byte_token_value(text: str) -> bytes:
    """<0xXX> -> the byte XX."""
    try:
        if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
    except ValueError:
        pass
    raise ModelFormatError(f"byte token {text!r} is not of the form <0xXX>")


def _stop_ids(
    tokens: list[str], attrs: list[int], metadata_ids: list[int], fim_ids: Mapping[str, int | None]
) -> frozenset[int]:
    """End-of-generation ids as llama.cpp collects them; marks them control tokens in `attrs`.

    The metadata ids (eos, eot, eom, fim pad/rep/sep), plus every token whose text is in
    END_OF_TURN_TOKENS, plus the FIM_STOP_TOKENS of each FIM kind the metadata leaves unset.
    """
    stops = set(metadata_ids)
    for i, t in enumerate(tokens):
        if t in _ALWAYS_USER_DEFINED:
            attrs[i] = ATTR_USER_DEFINED
        if t in END_OF_TURN_TOKENS:
            stops.add(i)
            attrs[i] |= ATTR_CONTROL
    for key, texts in FIM_STOP_TOKENS.items():
        fid = fim_ids.get(key)
        if fid is not None:
            stops.add(fid)
            continue
        for i, t in enumerate(tokens):
            if t in texts:
                stops.add(i)
                attrs[i] |= ATTR_CONTROL
    texts = {tokens[i]: i for i in stops}
    if "<|end|>" in texts and (
        {"<|return|>", "<|call|>"} <= texts.keys() or {"<|calls|>", "<|flush|>"} <= texts.keys()
    ):
        end = texts["<|end|>"]
        stops.discard(end)
        attrs[end] = ATTR_USER_DEFINED
    return frozenset(stops)


# --- helpers: Hugging Face folders -----------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"cannot read {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path} is not a JSON object")
    return data


def _hf_tokens(tj: Mapping[str, Any], where: Path) -> tuple[list[str], dict[int, bool]]:
    """Token texts by id (model vocab plus added tokens), and {added id: is special}."""
    vocab = (tj.get("model") or {}).get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ModelFormatError(f"{where}: model.vocab is not a non-empty mapping")
    try:
        id_to_text = {int(i): str(t) for t, i in vocab.items()}
        added = {int(a["id"]): bool(a.get("special")) for a in tj.get("added_tokens") or []}
        for a in tj.get("added_tokens") or []:
            id_to_text[int(a["id"])] = str(a["content"])
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ModelFormatError(f"{where}: malformed vocab or added_tokens") from None
    if min(id_to_text) < 0:
        raise ModelFormatError(f"{where}: negative token id {min(id_to_text)}")
    return [id_to_text.get(i, "") for i in range(max(id_to_text) + 1)], added


def _hf_special_id(value: Any, text_to_id: Mapping[str, int], where: Path) -> int | None:
    if isinstance(value, dict):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str) or value not in text_to_id:
        raise ModelFormatError(f"{where}: special token {value!r} is not in the vocabulary")
    return text_to_id[value]


def _post_processor_adds(post: Any, tokens: list[str], bos_id: int | None) -> bool:
    """True when a TemplateProcessing post-processor starts single sequences with BOS."""
    if bos_id is None or not isinstance(post, dict):
        return False
    procs = post.get("processors", [post]) if post.get("type") == "Sequence" else [post]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            first = single[0] if single else {}
            return first.get("SpecialToken", {}).get("id") == tokens[bos_id]
    return False


def _metaspace_prepends(pre: Any) -> bool:
    if not isinstance(pre, dict):
        return False
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for p in items:
        if isinstance(p, dict) and p.get("type") == "Metaspace":
            scheme = p.get("prepend_scheme")
            if scheme:
                return scheme in ("always", "first")
            return bool(p.get("add_prefix_space", True))
    return False


def _hf_chat_template(config: Mapping[str, Any], folder: Path) -> str | None:
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]: the default one
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    if tpl is None and (folder / "chat_template.jinja").is_file():
        tpl = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if tpl is not None and not isinstance(tpl, str):
        raise ModelFormatError(f"{folder / 'tokenizer_config.json'}: chat_template is not a string")
    return tpl


