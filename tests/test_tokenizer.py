"""Tokenizer tests: ids must be llama.cpp's own, bit for bit.

The reference is llama-cpp-python's `Llama.tokenize(text.encode(), add_bos=False, special=...)`
on the same GGUF. Pre-tokenizer types and the SentencePiece path that the default model does not
use are checked on vocab-only GGUFs written here from the default model's vocabulary.
"""

from __future__ import annotations

import ctypes
import json
import random
import time

import pytest

from edge_rt.errors import (
    EdgeRTError,
    InvalidOptionError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from edge_rt.loading import tokenizer as tok_module
from edge_rt.loading.tokenizer import (
    END_OF_TURN_TOKENS,
    SUPPORTED_PRE_TYPES,
    StreamDecoder,
    Tokenizer,
)

# Text that stresses the pre-tokenizer: scripts, emoji, digit runs, whitespace runs, code.
BASE_CORPUS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing spaces   ",
    "tabs\tand\t\ttabs\nnewlines\n\n\nand\r\nCRLF\r\n",
    "Multiple     spaces    between      words",
    "\n\n\n\n",
    " ",
    "\t",
    "12345678901234567890 3.14159 1,000,000 2024-06-01 0x1F 1e-9 007",
    "٠١٢٣٤٥٦٧٨٩ and ²³ and ½ and Ⅻ",
    "你好，世界！这是一个测试。中文没有空格。",
    "日本語のテキストとカタカナとひらがな。",
    "한국어 텍스트입니다.",
    "Emoji: 🙂😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️",
    "Accents: café naïve résumé Ångström façade Ελληνικά Русский текст",
    "RTL: שלום עולם مرحبا بالعالم \u200f\u200e",
    "Combining: e\u0301 a\u0308 n\u0303 Zalgo: Z\u0351\u0360\u0341a\u0358l\u0315g\u035co\u035d",
    "Contractions: don't I'm you're we've they'll he'd it's DON'T I'M YOU'RE",
    "Curly quotes: ‘single’ “double” — en–dash … ellipsis",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] * c; }\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "<html><body><div class=\"x\">Text &amp; more</div></body></html>",
    "$ ls -la | grep '^d' && echo \"done\" >> /tmp/log.txt",
    "SELECT * FROM users WHERE id = 42 AND name LIKE '%ab%';",
    "URLs: https://example.com/path?query=1&b=2#frag user@example.com",
    "Math: ∑_{i=1}^{n} i² = n(n+1)(2n+1)/6, ∀x∈ℝ, α→β",
    "Odd spaces:\u00a0nbsp\u2009thin\u3000ideographic\u2028line\u2029para\x85nel\x0bvt\x0cff",
    "Controls: \x00\x01\x1b[31mred\x1b[0m\x7f",
    "Private use \ue000\U000f0000 and unassigned \u0378 and tag \U000e0041",
    "Fullwidth ＡＢＣ１２３ and ligature ﬁ and math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Token-looking text: <s> </s> <unk> <0x41> ▁ Ġ Ċ [INST] <<SYS>>",
    "a" * 300,
    "🙂" * 50,
    "x" + " " * 40 + "y",
    "",
]
# Code points that llama.cpp's Unicode tables do not know (new in Unicode 16), in the contexts
# where a letter, digit or punctuation class would decide the split.
UNICODE_16 = [
    f"a{chr(lo)}'ll 1{chr(hi)}2 !{chr(lo)}? {chr(hi)}{chr(hi)}x"
    for lo, hi in tok_module._NOT_IN_LLAMACPP_TABLES
]
CORPUS = BASE_CORPUS + UNICODE_16

# Special-token text; with parse_special=False it must tokenize as plain text.
SPECIAL_TEXT = [
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|><|im_end|><|endoftext|>",
    "text<|im_end|>text <|im_start|> text",
    "<|im_start|<|im_end|>>",
    "<repo_name>x<reponame>y<file_sep>z<filename>",
    "<|endoftext|><|endoftext|>",
]

# Characters to build random strings from: a fuzz corpus with a fixed seed.
_FUZZ_POOL = [
    " ", "  ", "\n", "\r\n", "\t", "\x0b", "\x0c", "\x1c", "\x85", "\xa0", "\u2000", "\u3000",
    "\u200b", "\u200d", "a", "Z", "é", "É", "ß", "İ", "ǅ", "中", "日本", "한", "🙂", "👨‍👩‍👧",
    "🇫🇷", "١٢٣", "²", "½", "Ⅻ", "0", "1", "12345", "'", "'s", "'S", "'ll", "'LL", "’", "\"",
    ".", ",", "!!", "$", "+", "<", "=", "^", "~", "|", "`", "@", "#", "_", "-", "(", ")", "{",
    "}", "/", "\\", ":", ";", "\u0301", "ا", "ש", "\ue000", "\u0378", "\x00", "ﬁ", "Ａ", "𝔘",
    "<|im_start|>", "<|im_end|>", "<repo_name>", "<|endoftext|>", "hello", " world", "HTTP",
    "don't", "I'M", "<0x41>", "▁", "Ġ", "<s>", "</s>",
]


def _fuzz_strings(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_FUZZ_POOL) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def _chunks(text: str, size: int = 2048) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def gguf_fields(smollm2_path):
    """The default model's metadata, read once with gguf.GGUFReader: {key: (value, type)}."""
    import gguf

    reader = gguf.GGUFReader(smollm2_path)
    return {k: (f.contents(), f.types) for k, f in reader.fields.items()}


@pytest.fixture(scope="session")
def gguf_meta(gguf_fields):
    """The tokenizer metadata as `Tokenizer.from_gguf_metadata` takes it."""
    return {k: v for k, (v, _) in gguf_fields.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="session")
def tok(gguf_meta):
    return Tokenizer.from_gguf_metadata(gguf_meta)


@pytest.fixture(scope="session")
def llama_vocab(smollm2_path, llama_cpp_module):
    """llama.cpp with only the vocabulary loaded: fast, enough for tokenization."""
    return llama_cpp_module.Llama(smollm2_path, vocab_only=True, verbose=False)


def _ref_ids(llm, text: str, special: bool = False, add_bos: bool = False) -> list[int]:
    return llm.tokenize(text.encode(), add_bos=add_bos, special=special)


def _ref_piece(llama_cpp, llm, token_id: int, special: bool) -> bytes:
    """llama_token_to_piece through the C API (the Python wrapper pads to 32 bytes)."""
    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token_id, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


def _assert_same_ids(tok, llm, texts, special=False, what="text"):
    for k, text in enumerate(texts):
        ours = tok.encode(text, add_bos=False, parse_special=special)
        ref = _ref_ids(llm, text, special=special)
        if ours != ref:
            same = (i for i, (a, b) in enumerate(zip(ours, ref)) if a != b)
            at = next(same, min(len(ours), len(ref)))
            pytest.fail(
                f"{what} #{k} differs from llama.cpp (special={special}) at token {at}: "
                f"ours {ours[max(0, at - 3):at + 5]} vs llama.cpp {ref[max(0, at - 3):at + 5]}; "
                f"text {text[:200]!r}"
            )


# --- the default model against llama.cpp -----------------------------------------------------


def test_loads_fast_and_reads_metadata(gguf_meta):
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(gguf_meta)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"building the tokenizer took {elapsed:.2f}s"
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.token_text(2) == "<|im_end|>"


@pytest.mark.llamacpp
def test_pydoc_text_matches_llamacpp(tok, llama_vocab, pydoc_text):
    assert len(pydoc_text) > 400_000
    _assert_same_ids(tok, llama_vocab, _chunks(pydoc_text), what="pydoc chunk (2 KB)")
    assert tok.encode(pydoc_text) == _ref_ids(llama_vocab, pydoc_text), "whole pydoc text"


@pytest.mark.llamacpp
def test_corpus_matches_llamacpp(tok, llama_vocab):
    _assert_same_ids(tok, llama_vocab, CORPUS, what="corpus text")
    _assert_same_ids(tok, llama_vocab, CORPUS, special=True, what="corpus text")


@pytest.mark.llamacpp
def test_fuzz_matches_llamacpp(tok, llama_vocab):
    texts = _fuzz_strings(1500)
    _assert_same_ids(tok, llama_vocab, texts, what="fuzz string")
    _assert_same_ids(tok, llama_vocab, texts, special=True, what="fuzz string")


@pytest.mark.llamacpp
def test_special_tokens_match_llamacpp(tok, llama_vocab):
    _assert_same_ids(tok, llama_vocab, SPECIAL_TEXT, special=True, what="special text")
    _assert_same_ids(tok, llama_vocab, SPECIAL_TEXT, special=False, what="special text")
    assert tok.encode("<|im_start|>", parse_special=True) == [1]
    assert 1 not in tok.encode("<|im_start|>", parse_special=False)


@pytest.mark.llamacpp
def test_rendered_chat_matches_llamacpp(tok, llama_vocab):
    from edge_rt.loading.chat_template import render_chat

    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2? Answer in 日本語 🙂"},
        {"role": "assistant", "content": "四 (4)."},
        {"role": "user", "content": "And <|im_end|> as text?"},
    ]
    prompt = render_chat(tok.chat_template, messages, add_generation_prompt=True)
    ids = tok.encode(prompt, parse_special=True)
    assert ids == _ref_ids(llama_vocab, prompt, special=True)
    assert ids[0] == 1 and ids.count(2) == 5  # four turns plus the <|im_end|> in the user text
    assert tok.encode(prompt, parse_special=False) == _ref_ids(llama_vocab, prompt, special=False)


@pytest.mark.llamacpp
def test_add_bos_matches_llamacpp(tok, llama_vocab):
    # add_bos=None is llama.cpp's add_special=True: BOS only where the model asks for it
    assert tok.encode("Hi", add_bos=None) == _ref_ids(llama_vocab, "Hi", add_bos=True)
    assert tok.encode("Hi") == tok.encode("Hi", add_bos=False)  # SmolLM2: no BOS
    # add_bos=True forces it
    assert tok.encode("Hi", add_bos=True) == [tok.bos_id, *_ref_ids(llama_vocab, "Hi")]


@pytest.mark.llamacpp
def test_pieces_match_llamacpp(tok, llama_vocab, llama_cpp_module):
    for i in range(tok.vocab_size):
        for special in (True, False):
            assert tok.token_to_piece(i, special=special) == _ref_piece(
                llama_cpp_module, llama_vocab, i, special
            ), f"token {i} ({tok.token_text(i)!r}), special={special}"


@pytest.mark.llamacpp
def test_stop_ids_match_llamacpp_eog(tok, llama_vocab, llama_cpp_module):
    vocab = llama_cpp_module.llama_model_get_vocab(llama_vocab._model.model)
    eog = {i for i in range(tok.vocab_size) if llama_cpp_module.llama_vocab_is_eog(vocab, i)}
    assert tok.stop_ids == eog
    assert {tok.eos_id, 0} <= tok.stop_ids  # <|im_end|> (eos) and <|endoftext|>
    assert all(tok.token_text(i) in END_OF_TURN_TOKENS or i == tok.eos_id or
               tok.token_text(i) == "<reponame>" for i in tok.stop_ids)


# --- decoding --------------------------------------------------------------------------------


def test_round_trip(tok, pydoc_text):
    for text in [*CORPUS, *_fuzz_strings(300, seed=1), pydoc_text]:
        assert tok.decode(tok.encode(text)) == text


def test_decode_special(tok):
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>", parse_special=True)
    assert tok.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert tok.decode(ids, skip_special=True) == "user\nHi"
    assert tok.token_to_piece(2) == b"<|im_end|>"
    assert tok.token_to_piece(2, special=False) == b""


def test_stream_decoder_never_breaks_characters(tok):
    text = "Emoji 👨‍👩‍👧‍👦🙂 and 日本語 and é — ok"
    ids = tok.encode(text)
    # the test only means something if some token holds part of a character
    assert any(_is_partial_utf8(tok.token_to_piece(i)) for i in ids)
    dec = tok.stream_decoder()
    assert isinstance(dec, StreamDecoder)
    parts = [dec.push(i) for i in ids]
    parts.append(dec.flush())
    assert "".join(parts) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in parts)


def test_stream_decoder_skip_special_and_bad_bytes(tok):
    ids = tok.encode("<|im_start|>hi 🙂<|im_end|>", parse_special=True)
    dec = tok.stream_decoder(skip_special=True)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "hi 🙂"
    # a lone first byte of a 4-byte sequence: held back, then replaced at flush
    first_byte = tok.encode("🙂")[0]
    assert _is_partial_utf8(tok.token_to_piece(first_byte))
    dec = tok.stream_decoder()
    assert dec.push(first_byte) == ""
    assert dec.flush() == "\ufffd"
    assert tok.decode([first_byte]) == "\ufffd"


def _is_partial_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# --- bad input -------------------------------------------------------------------------------


def _broken(meta, **changes):
    out = dict(meta)
    for k, v in changes.items():
        key = "tokenizer.ggml." + k
        if v is None:
            out.pop(key, None)
        else:
            out[key] = v
    return out


@pytest.mark.parametrize(
    "changes, error",
    [
        ({"model": None}, ModelFormatError),
        ({"model": "bert"}, UnsupportedModelError),
        ({"model": "t5"}, UnsupportedModelError),
        ({"pre": "no-such-pre"}, UnsupportedModelError),
        ({"tokens": None}, ModelFormatError),
        ({"tokens": []}, ModelFormatError),
        ({"tokens": [1, 2, 3]}, ModelFormatError),
        ({"merges": None}, ModelFormatError),
        ({"merges": ["nospace"]}, ModelFormatError),
        ({"merges": ["Ġ notatoken"]}, ModelFormatError),
        ({"token_type": [1, 1, 1]}, ModelFormatError),
        ({"bos_token_id": 10**6}, ModelFormatError),
        ({"eos_token_id": -1}, ModelFormatError),
        ({"bos_token_id": None, "add_bos_token": True}, ModelFormatError),
    ],
)
def test_bad_metadata_raises_one_line(gguf_meta, changes, error):
    with pytest.raises(error) as exc:
        Tokenizer.from_gguf_metadata(_broken(gguf_meta, **changes))
    assert isinstance(exc.value, EdgeRTError)
    assert "\n" not in str(exc.value) and str(exc.value)


def test_duplicate_token_raises(gguf_meta):
    tokens = list(gguf_meta["tokenizer.ggml.tokens"])
    tokens[5] = tokens[6]
    with pytest.raises(ModelFormatError, match="duplicate token"):
        Tokenizer.from_gguf_metadata(_broken(gguf_meta, tokens=tokens))


def test_bad_calls(tok):
    with pytest.raises(InvalidOptionError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError):
        tok.decode([tok.vocab_size])
    with pytest.raises(InvalidOptionError):
        tok.token_to_piece(-1)


def test_supported_pre_types_listed():
    for name in ("default", "gpt-2", "smollm", "llama-bpe", "qwen2"):
        assert name in SUPPORTED_PRE_TYPES


# --- other pre-tokenizers and SentencePiece, on vocab-only GGUFs written here ----------------


def _write_vocab_gguf(path, gguf_fields, tokenizer_meta: dict) -> str:
    """A tensor-less GGUF: the default model's hyper-parameters plus `tokenizer_meta`."""
    import gguf

    T = gguf.GGUFValueType
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, (value, types) in gguf_fields.items():
        if key.startswith(("GGUF.", "tokenizer.", "general.architecture")) or types[0] == T.ARRAY:
            continue
        writer.add_key_value(key, value, types[0])
    for key, value in tokenizer_meta.items():
        if isinstance(value, str):
            writer.add_key_value(key, value, T.STRING)
        elif isinstance(value, bool):
            writer.add_key_value(key, value, T.BOOL)
        elif isinstance(value, int):
            writer.add_key_value(key, value, T.UINT32)
        else:
            sub = {str: T.STRING, int: T.INT32, float: T.FLOAT32}[type(value[0])]
            writer.add_key_value(key, list(value), T.ARRAY, sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


_PRE_TYPES_TO_CHECK = ["gpt-2", "default", "llama-bpe", "qwen2", "starcoder", "dbrx", "falcon",
                       "tekken", "gpt-4o"]


@pytest.mark.llamacpp
@pytest.mark.parametrize("pre", _PRE_TYPES_TO_CHECK)
def test_pre_type_matches_llamacpp(
    pre, gguf_fields, gguf_meta, llama_cpp_module, tmp_path, pydoc_text
):
    meta = {k: v for k, v in gguf_meta.items() if k != "tokenizer.chat_template"}
    meta["tokenizer.ggml.pre"] = pre
    meta.pop("tokenizer.ggml.add_bos_token")  # so the pre type's own default applies
    path = _write_vocab_gguf(tmp_path / f"{pre}.gguf", gguf_fields, meta)
    llm = llama_cpp_module.Llama(path, vocab_only=True, verbose=False)
    tok = Tokenizer.from_gguf_metadata(meta)
    texts = [*CORPUS, *_fuzz_strings(400, seed=2), *_chunks(pydoc_text[:40_000])]
    _assert_same_ids(tok, llm, texts, what=f"{pre} text")
    _assert_same_ids(tok, llm, SPECIAL_TEXT, special=True, what=f"{pre} special text")
    assert tok.add_bos == llm._model.add_bos_token()
    assert tok.encode("Hi") == _ref_ids(llm, "Hi", add_bos=True)  # add_bos=None: the default


def _spm_meta(gguf_meta) -> dict:
    """A SentencePiece vocabulary in llama.cpp's 'llama' format, made from SmolLM2's.

    <unk> <s> </s>, the 256 <0xXX> byte tokens, then every SmolLM2 token that is valid UTF-8
    (spaces as U+2581) and every character they use, scored by rank; a user-defined [INST].
    """
    from edge_rt.loading.tokenizer import _byte_level_decode

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [2, 3, 3, *([6] * 256)]
    seen = set(tokens)
    pieces = []
    smollm = zip(gguf_meta["tokenizer.ggml.tokens"], gguf_meta["tokenizer.ggml.token_type"])
    for text, ttype in smollm:
        try:
            piece = _byte_level_decode(text).decode("utf-8").replace(" ", "\u2581")
        except UnicodeDecodeError:
            continue
        if ttype == 1 and piece and "\0" not in piece and piece not in seen:
            seen.add(piece)
            pieces.append(piece)
    pieces += sorted({c for p in pieces for c in p} - seen)
    tokens += [*pieces, "<|im_start|>", "<|im_end|>", "[INST]"]
    types += [*([1] * len(pieces)), 3, 3, 4]
    scores = [0.0] * 259 + [-float(k) for k in range(len(pieces))] + [0.0] * 3
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


@pytest.mark.llamacpp
def test_sentencepiece_matches_llamacpp(
    gguf_fields, gguf_meta, llama_cpp_module, tmp_path, pydoc_text
):
    meta = _spm_meta(gguf_meta)
    llm = llama_cpp_module.Llama(
        _write_vocab_gguf(tmp_path / "spm.gguf", gguf_fields, meta), vocab_only=True, verbose=False
    )
    start = time.perf_counter()
    tok = Tokenizer.from_gguf_metadata(meta)
    assert time.perf_counter() - start < 2.0
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (1, 2, True, True)
    texts = [*CORPUS, *_fuzz_strings(400, seed=3), *_chunks(pydoc_text[:40_000]),
             "[INST] hi [/INST]", "a[INST]b", "<|im_start|> x <|im_end|>  y"]
    for special in (False, True):
        _assert_same_ids(tok, llm, texts, special=special, what="SPM text")
    for text in texts[:5]:
        assert tok.encode(text) == _ref_ids(llm, text, add_bos=True)
    # round trip: "▁" itself and user-defined tokens do not survive SentencePiece's spaces
    for text in [t for t in texts if "\u2581" not in t and "[INST]" not in t]:
        assert tok.decode(tok.encode(text), skip_special=True) == text
        dec = tok.stream_decoder(skip_special=True)
        assert "".join(dec.push(i) for i in tok.encode(text)) + dec.flush() == text
    assert tok.decode(tok.encode("Hi")) == "<s>Hi"


# --- Hugging Face folders --------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_folder(gguf_meta, tmp_path_factory):
    """SmolLM2's tokenizer as a Hugging Face folder (the same layout as the upstream repo)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tokens = gguf_meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in gguf_meta["tokenizer.ggml.merges"]]
    hf = HFTokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    hf.decoder = decoders.ByteLevel()
    specials = [t for t, ty in zip(tokens, gguf_meta["tokenizer.ggml.token_type"]) if ty == 3]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    folder = tmp_path_factory.mktemp("smollm2-hf")
    hf.save(str(folder / "tokenizer.json"))
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|im_end|>"},
        "chat_template": gguf_meta["tokenizer.chat_template"],
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.llamacpp
def test_hf_folder_matches_llamacpp(hf_folder, tok, llama_vocab):
    hf = Tokenizer.from_hf_folder(hf_folder)
    assert (hf.vocab_size, hf.bos_id, hf.eos_id, hf.add_bos) == (49152, 1, 2, False)
    assert hf.stop_ids == tok.stop_ids and hf.chat_template == tok.chat_template
    # Hugging Face semantics: Unicode 16 characters follow `tokenizers`, not llama.cpp
    texts = [*BASE_CORPUS, *_fuzz_strings(500, seed=4)]
    _assert_same_ids(hf, llama_vocab, texts, what="HF-folder text")
    _assert_same_ids(hf, llama_vocab, SPECIAL_TEXT, special=True, what="HF-folder special text")
    _assert_same_ids(hf, llama_vocab, SPECIAL_TEXT, special=False, what="HF-folder special text")
    for text in CORPUS:
        assert hf.decode(hf.encode(text)) == text


def test_hf_folder_errors(tmp_path, hf_folder):
    with pytest.raises(ModelNotFoundError):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        Tokenizer.from_hf_folder(tmp_path)
    wordpiece = {"model": {"type": "WordPiece", "vocab": {"a": 0}}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(wordpiece))
    with pytest.raises(UnsupportedModelError, match="WordPiece"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text((hf_folder / "tokenizer.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
    with pytest.raises(ModelFormatError, match="<nope>"):
        Tokenizer.from_hf_folder(tmp_path)


@pytest.mark.llamacpp
def test_hf_sentencepiece_folder_matches_llamacpp(
    gguf_fields, gguf_meta, llama_cpp_module, tmp_path
):
    """A Llama-2-style tokenizer.json (Prepend/Replace normalizer, byte fallback) for the
    SentencePiece vocabulary above tokenizes like llama.cpp on the GGUF of that vocabulary."""
    meta = _spm_meta(gguf_meta)
    llm = llama_cpp_module.Llama(
        _write_vocab_gguf(tmp_path / "spm.gguf", gguf_fields, meta), vocab_only=True, verbose=False
    )
    tj = json.loads(Tokenizer.from_gguf_metadata(meta)._core.to_str())  # vocab + merges
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
    ]}
    tj["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]}
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    tj["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": ty != 4}
        for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (2, 3, 4)
    ]
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True})
    )
    hf = Tokenizer.from_hf_folder(folder)
    assert (hf.bos_id, hf.eos_id, hf.add_bos, hf.add_space_prefix) == (1, 2, True, True)
    texts = [*CORPUS, *_fuzz_strings(300, seed=5), "[INST] hi [/INST]", "<|im_start|> x <|im_end|>"]
    for special in (False, True):
        _assert_same_ids(hf, llm, texts, special=special, what="HF SPM text")
    assert hf.encode("Hi") == _ref_ids(llm, "Hi", add_bos=True)
    for text in CORPUS[:20]:
        assert hf.decode(hf.encode(text), skip_special=True) == text
