"""Hugging Face model folders: config.json, *.safetensors, tokenizer.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edge_rt.errors import ModelFormatError, UnsupportedModelError, one_line
from edge_rt.loading.gguf import SourceTensor
from edge_rt.loading.names import HF_NAMES, map_name
from edge_rt.models.llama import ARCHITECTURES, ModelArgs


@dataclass
class HFModelFolder:
    path: Path
    config: dict
    args: ModelArgs
    tensors: dict[str, list[tuple[int, SourceTensor]]]
    file_types: dict[str, int]


def open_hf_folder(path: str | Path) -> HFModelFolder:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: not a model folder (no config.json)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: invalid JSON ({one_line(e)})") from None
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"architecture {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    try:
        args = ModelArgs.from_hf_config(config)
        args.validate()
    except (TypeError, ValueError, ZeroDivisionError, KeyError) as e:
        if "not supported" in str(e):
            raise UnsupportedModelError(f"{cfg_path}: {one_line(e)}") from None
        raise ModelFormatError(f"{cfg_path}: inconsistent config ({one_line(e)})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{path}: no *.safetensors weight files")
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, list[tuple[int, SourceTensor]]] = {}
    file_types: dict[str, int] = {}
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt")
            names = list(handle.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelFormatError(f"{f}: corrupt safetensors file ({one_line(e)})") from None
        for name in names:
            target, part = map_name(HF_NAMES, name)
            if target is None:
                continue
            sl = handle.get_slice(name)
            dtype = sl.get_dtype()
            file_types[dtype] = file_types.get(dtype, 0) + 1
            src = SourceTensor(name=name, shape=tuple(sl.get_shape()), qtype=dtype,
                               array=(lambda h=handle, n=name: h.get_tensor(n)))
            tensors.setdefault(target, []).append((part, src))
    if args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    return HFModelFolder(path=path, config=config, args=args, tensors=tensors, file_types=file_types)
