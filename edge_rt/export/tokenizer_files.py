"""The bundle's tokenizer: Hugging Face tokenizer.json + tokenizer_config.json + chat_template.jinja.

Mobile runtimes read tokenizer.json (tokenizers-cpp, ONNX Runtime extensions, ExecuTorch's LLM
runner), and `Tokenizer.from_hf_folder` reads the same files back, so the tokenizer a bundle ships
is the one `edge-rt run --model BUNDLE/` and `edge-rt verify` use.

- Hugging Face folder: its tokenizer.json and tokenizer_config.json are copied unchanged.
- GGUF with a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2"): edge-rt's tokenizer
  pipeline (llama.cpp's pre-tokenizer regexes, the vocabulary and merges) is serialized, control
  and user-defined tokens become added tokens (special = control), as llama.cpp's converter maps them.
  A vocabulary without a token for some bytes (SmolLM2 lacks 21) keeps edge-rt's placeholder
  token for them after the last model id, as the BPE unk token: llama.cpp keeps such a byte apart
  and drops it, and so must a runtime (the manifest's tokenizer.drop_id; ids >= vocab_size).
- GGUF SentencePiece vocabularies ("llama") are refused: their space handling lives in edge-rt's
  Tokenizer class, not in a tokenizers pipeline a mobile runtime could read.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_rt.errors import UnsupportedModelError
from edge_rt.loading import tokenizer as tk

# GGUF token attribute -> tokenizer.json added-token "special" flag (None: not an added token)
_ADDED_SPECIAL = ((tk.ATTR_CONTROL, True), (tk.ATTR_UNKNOWN, True), (tk.ATTR_USER_DEFINED, False))


def tokenizer_files(source, tokenizer) -> dict[str, str]:
    """File name -> text of the bundle's tokenizer files.

    Args:
        source: the ModelSource (edge_rt.api.open_model).
        tokenizer: its edge_rt Tokenizer.
    Returns:
        {"tokenizer.json": ..., "tokenizer_config.json": ..., "chat_template.jinja": ...};
        a model without a template gets the ChatML one edge-rt falls back to (LLM.apply_chat_template).
    """
    from edge_rt.loading.chat_template import CHATML_TEMPLATE

    template = tokenizer.chat_template or CHATML_TEMPLATE
    if source.format == "hf":
        files = {"tokenizer.json": (source.path / "tokenizer.json").read_text(encoding="utf-8")}
        cfg = source.path / "tokenizer_config.json"
        files["tokenizer_config.json"] = cfg.read_text(encoding="utf-8") if cfg.is_file() else "{}"
    else:
        files = _from_gguf(tokenizer)
    files["chat_template.jinja"] = template
    return files


def _from_gguf(tok) -> dict[str, str]:
    if tok._kind != "bpe":
        raise UnsupportedModelError("export needs a byte-level BPE tokenizer; this GGUF has a SentencePiece "
                                    "vocabulary (tokenizer.ggml.model 'llama'), which is not exported yet")
    tj = json.loads(tok._core.to_str())
    added = []
    for i, (text, attr) in enumerate(zip(tok._tokens, tok._attrs)):
        special = next((s for bit, s in _ADDED_SPECIAL if attr & bit), None)
        if special is not None:
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special})
    tj["added_tokens"] = added
    tj["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    if tok.add_bos:
        bos = tok._tokens[tok.bos_id]
        tj["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}},
        }
    cfg = {
        "bos_token": tok._tokens[tok.bos_id] if tok.bos_id is not None else None,
        "eos_token": tok._tokens[tok.eos_id] if tok.eos_id is not None else None,
        "add_bos_token": bool(tok.add_bos),
        "chat_template": tok.chat_template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {"tokenizer.json": json.dumps(tj, ensure_ascii=False), "tokenizer_config.json": json.dumps(cfg, indent=2)}


def tokenizer_manifest(tok) -> dict:
    """What the manifest records about the tokenizer (explicit state a runtime needs)."""
    return {"file": "tokenizer.json", "config": "tokenizer_config.json", "bos_id": tok.bos_id,
            "eos_id": tok.eos_id, "add_bos": bool(tok.add_bos), "stop_ids": sorted(tok.stop_ids),
            "drop_id": tok._drop_id,
            "chat_template": "model" if tok.chat_template else "edge-rt default (ChatML)"}


def load_bundle_tokenizer(folder: Path, info: dict, vocab_size: int):
    """The edge_rt Tokenizer of a bundle, with the manifest's stop ids and placeholder id."""
    tok = tk.Tokenizer.from_hf_folder(folder)
    tok.stop_ids = frozenset(int(i) for i in info.get("stop_ids") or tok.stop_ids)
    if info.get("drop_id") is not None:
        tok._drop_id = int(info["drop_id"])
        tok.vocab_size = vocab_size  # the placeholder is no model token
    return tok
