"""The Python API: `load()` -> `LLM`, with generate / stream / chat / sessions.

    import edge_rt
    llm = edge_rt.load()                       # default model, device "auto"
    print(llm.generate("The capital of France is", max_tokens=8).text)
    for piece in llm.stream("Tell me a story", temperature=0.7, seed=1):
        print(piece, end="", flush=True)
    reply = llm.chat([{"role": "user", "content": "Hi!"}])

Thread-safety: an `LLM` holds one KV cache, so its calls are serialized by a lock: several
threads may share one object (each call waits for the previous one to finish; a stream holds
the lock until it is exhausted or closed). For parallel generation load one `LLM` per thread.
Errors from bad input are `edge_rt.EdgeRTError` subclasses (see edge_rt.errors).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from devices import Device, resolve_device
from edge_rt.errors import ContextOverflowError, DeviceError, InvalidOptionError, ModelFormatError
from edge_rt.generation.engine import Engine, GenerationConfig, GenerationStats
from edge_rt.generation.sampling import SamplingParams
from edge_rt.loading.chat_template import render_chat
from edge_rt.loading.resolve import resolve_model_path

DEFAULT_N_CTX = 4096
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BACKENDS = ("torch", "llamacpp")  # who runs the forward (backends/)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: GenerationStats = field(default_factory=GenerationStats)


@dataclass
class ModelSource:
    """What a model path holds, before any weight is decoded."""

    path: Path
    format: str  # "gguf" | "hf"
    args: object  # ModelArgs
    tensors: dict
    file_types: dict
    metadata: dict


def open_model(path: str | os.PathLike | None) -> ModelSource:
    """Resolve and open a model file or folder (no weights decoded)."""
    p = resolve_model_path(path)
    if p.is_dir():
        from edge_rt.loading.hf import open_hf_folder

        f = open_hf_folder(p)
        return _checked(ModelSource(p, "hf", f.args, f.tensors, f.file_types, f.config))
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from edge_rt.loading.gguf import open_gguf

        f = open_gguf(p)
        return _checked(ModelSource(p, "gguf", f.args, f.tensors, f.file_types, f.metadata))
    raise ModelFormatError(f"{p}: not a model (expected a GGUF file or a Hugging Face folder)")


def _checked(src: ModelSource) -> ModelSource:
    """Refuse hyper-parameters that disagree with the tensors of the file.

    The model is built from the config before any tensor is assigned, so a corrupt value would
    otherwise reach construction: billions of layers (a hang) or sizes that overflow.
    """
    a = src.args
    blocks = {int(t.split(".")[1]) for t in src.tensors if t.startswith("layers.")}
    if len(blocks) != a.num_hidden_layers or max(blocks, default=-1) + 1 != a.num_hidden_layers:
        raise ModelFormatError(f"{src.path}: the config says {a.num_hidden_layers} layers, "
                               f"the file has tensors for {len(blocks)}")
    want = {"embed.weight": (a.vocab_size, a.hidden_size), "layers.0.attn.wo.weight": (a.hidden_size, a.q_dim),
            "layers.0.ffn.w2.weight": (a.hidden_size, a.intermediate_size)}
    for target, shape in want.items():
        got = tuple(src.tensors[target][0][1].shape) if target in src.tensors else shape
        if got != shape:
            raise ModelFormatError(f"{src.path}: tensor for {target} has shape {got}, the config implies {shape}")
    for target, parts in src.tensors.items():  # the pieces of a fused weight are stacked on dim 0
        widths = sorted({tuple(s.shape[1:]) for _, s in parts})
        if len(widths) > 1:
            raise ModelFormatError(f"{src.path}: the parts of {target} differ in shape past dim 0: {widths}")
        empty = [s for _, s in parts if 0 in s.shape]
        if empty:
            raise ModelFormatError(f"{src.path}: tensor {empty[0].name} has an empty dimension: shape {empty[0].shape}")
        if target.endswith(".bias"):  # 1-D, one value per weight row, part by part
            weight = src.tensors.get(target.removesuffix(".bias") + ".weight", [])
            rows = sorted((k, tuple(s.shape[:1])) for k, s in weight)
            if sorted((k, tuple(s.shape)) for k, s in parts) != rows:
                raise ModelFormatError(f"{src.path}: the shapes of {target} do not match the rows of its weight")
    tokens = src.metadata.get("tokenizer.ggml.tokens") if src.format == "gguf" else None
    if isinstance(tokens, list) and len(tokens) > a.vocab_size:
        raise ModelFormatError(f"{src.path}: {len(tokens)} tokens but the embedding has {a.vocab_size} rows")
    return src


def _max_ctx(args) -> int:
    """Longest context edge-rt runs: sliding-window attention (Mistral) is not implemented, so stay within the window."""
    return min(args.max_position_embeddings, args.sliding_window or args.max_position_embeddings)


def _kv_dtype(dev: Device, compute: torch.dtype) -> torch.dtype:
    """Attention and the KV cache run in fp32 on CPU (faster there than bf16 for these small
    matrices, and closer to llama.cpp); in the compute dtype on accelerators."""
    return torch.float32 if dev.kind == "cpu" else compute


def _check_n_ctx(n_ctx, max_ctx: int) -> None:
    """Refuse an n_ctx outside [16, max_ctx] (None means: choose the default)."""
    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or not 16 <= n_ctx <= max_ctx):
        raise InvalidOptionError(f"n_ctx must be in [16, {max_ctx}], got {n_ctx}")


def _tokenizer_for(src: ModelSource):
    from edge_rt.loading.tokenizer import Tokenizer

    if src.format == "gguf":
        return Tokenizer.from_gguf_metadata(src.metadata)
    return Tokenizer.from_hf_folder(src.path)


def load(model: str | os.PathLike | None = None, device: str = "auto", *, dtype: str | None = None,
         n_ctx: int | None = None, threads: int | None = None, quantized: bool = True,
         progress: Callable[[int, int], None] | None = None, budget: int | str | None = None,
         cpu_budget: int | str | None = None, reconstruct: str = "rebuild", backend: str = "torch") -> "LLM":
    """Load a model for generation.

    Args:
        model: a GGUF file or a Hugging Face folder; None for the default model
            (SmolLM2-135M-Instruct, fetched once with `edge-rt pull`).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: compute dtype ("bfloat16", "float16", "float32"); default: the device's.
        n_ctx: context length (default: the model's, at most 4096).
        threads: CPU threads (default: torch's default, the core count).
        quantized: keep 4-bit GGUF weights packed (fast); False dequantizes everything.
        progress: called as progress(done, total) while the weights are loaded.
        budget: device memory for the model (bytes or "64MB"): weights, stream buffers, KV cache
            and activations stay within it (plus the runtime's fixed overhead, docs/OFFLOAD.md), or
            loading refuses with the minimum. Streaming needs a weight store (`edge-rt compress`);
            a plain model file must fit whole.
        cpu_budget: host RAM for a second tier of layers (pinned on CUDA); needs `budget`.
        reconstruct: BitStack stores only: "rebuild" each weight from its blocks in every forward
            (memory follows the budget) or "keep" the rebuilt weights (fast; counted in the budget).
            With a BitStack store, budget may also be "auto" (a share of free memory) and the
            model can be resized live (`LLM.resize`).
        backend: "torch" (edge-rt's own model) or "llamacpp" (llama.cpp through llama-cpp-python;
            a GGUF file, CPU, the file's own tensor types; tokenizer and engine stay edge-rt's).
    Returns:
        An LLM.
    Raises:
        ModelNotFoundError, ModelFormatError, UnsupportedModelError, DeviceError, InvalidOptionError.
    """
    dev = resolve_device(device)
    if dtype is not None and dtype not in DTYPES:
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise InvalidOptionError(f"threads must be an integer >= 1, got {threads}")
    if backend not in BACKENDS:
        raise InvalidOptionError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "llamacpp":
        return _load_llamacpp(model, device, dev, dtype, n_ctx, threads, quantized, budget)
    from offload.bitstack_load import is_bitstack_store

    if model is not None and is_bitstack_store(model):  # BitStack: budget may be "auto"; resizable
        return _load_bitstack(model, dev, dtype, n_ctx, threads, budget, cpu_budget, reconstruct, progress)
    from edge_rt.memory.sizes import parse_size

    budget = None if budget is None else parse_size(budget, "budget")
    cpu_budget = None if cpu_budget is None else parse_size(cpu_budget, "cpu_budget")
    if cpu_budget is not None and budget is None:
        raise InvalidOptionError("cpu_budget needs a (device) budget too")
    from offload.store import is_store

    if model is not None and is_store(model):
        return _load_store(model, dev, dtype, n_ctx, threads, budget, cpu_budget, progress)
    from edge_rt.export.bundle import is_bundle

    if model is not None and is_bundle(model):  # an `edge-rt export` bundle runs on its own runtime (CPU)
        from edge_rt.export.runtime import load_bundle

        return load_bundle(model, threads=threads, n_ctx=n_ctx)
    src = open_model(model)
    args = src.args
    max_ctx = _max_ctx(args)
    if n_ctx is None:
        n_ctx = min(max_ctx, DEFAULT_N_CTX)
    _check_n_ctx(n_ctx, max_ctx)
    if budget is not None:
        _check_whole_model_budget(src, dev, dtype, n_ctx, quantized, budget, cpu_budget)
    tokenizer = _tokenizer_for(src)
    if threads:
        torch.set_num_threads(threads)
    from backends.torch_backend import TorchBackend
    from edge_rt.loading.weights import build_model

    compute = DTYPES[dtype] if dtype else dev.default_dtype
    t0 = time.perf_counter()
    net = build_model(args, src.tensors, compute, dev.torch_device, n_ctx, quantized=quantized, progress=progress)
    kv_dtype = _kv_dtype(dev, compute)
    backend = TorchBackend(net, dev.torch_device, n_ctx, kv_dtype=kv_dtype)
    return LLM(src, tokenizer, backend, dev, compute, quantized, time.perf_counter() - t0)


def _check_whole_model_budget(src, dev, dtype, n_ctx, quantized, budget, cpu_budget) -> None:
    """A plain model file loads whole: refuse a budget it does not fit (streaming needs a store)."""
    from edge_rt.memory.estimate import describe_model
    from edge_rt.memory.sizes import format_size

    if cpu_budget is not None:
        raise InvalidOptionError("cpu_budget needs a weight store (edge-rt compress MODEL -o STORE)")
    compute = DTYPES[dtype] if dtype else dev.default_dtype
    kv_dtype = _kv_dtype(dev, compute)
    need = describe_model(src, compute, n_ctx, kv_dtype=kv_dtype, quantized=quantized,
                          device=dev.torch_device)["memory"]["total_bytes"]
    if need > budget:
        raise InvalidOptionError(
            f"budget {format_size(budget)} is below the {format_size(need)} this model file needs in memory; "
            f"to stream it within a smaller budget write a store: edge-rt compress MODEL --format dense -o STORE")


def _load_store(path, dev: Device, dtype, n_ctx, threads, budget, cpu_budget, progress) -> "LLM":
    """Load a weight store (offload/store.py), dispatching on its kind; planned for the budgets."""
    from offload.store import open_store_model

    sm = open_store_model(path)
    args = sm.args
    max_ctx = _max_ctx(args)
    _check_n_ctx(n_ctx, max_ctx)
    if n_ctx is None and budget is None:
        n_ctx = min(max_ctx, DEFAULT_N_CTX)
    if threads:
        torch.set_num_threads(threads)
    from backends.torch_backend import TorchBackend

    # CPUs without native bf16 matmuls run bf16 weights far faster widened to fp32 (exactly)
    compute = DTYPES[dtype] if dtype else (torch.float32 if dev.kind == "cpu" else DTYPES[sm.store.meta.get("dtype", "bfloat16")])
    kv_dtype = _kv_dtype(dev, compute)
    t0 = time.perf_counter()
    if sm.store.kind in ("dense", "endor"):
        from offload.loader import build_offloaded

        net, plan = build_offloaded(sm, dev.torch_device, dev.kind, compute, kv_dtype, n_ctx, max_ctx, budget,
                                    cpu_budget, progress=progress, workers=threads)
    else:
        raise ModelFormatError(f"{sm.path}: store kind {sm.store.kind!r} is not supported")
    backend = TorchBackend(net, dev.torch_device, plan.n_ctx, kv_dtype=kv_dtype)
    llm = LLM(sm, sm.tokenizer(), backend, dev, compute, False, time.perf_counter() - t0)
    llm.plan = plan
    return llm


def _load_bitstack(path, dev: Device, dtype, n_ctx, threads, budget, cpu_budget, reconstruct, progress) -> "LLM":
    """Load a BitStack store (offload/bitstack_load.py) at a budget: the LLM gets `.bitstack`."""
    from offload.bitstack_load import RECONSTRUCT, load_llm
    from offload.store import open_store_model

    if cpu_budget is not None:
        raise InvalidOptionError("cpu_budget does not apply to BitStack stores (use budget)")
    if reconstruct not in RECONSTRUCT:
        raise InvalidOptionError(f"reconstruct must be one of {', '.join(RECONSTRUCT)}, got {reconstruct!r}")
    sm = open_store_model(path)
    args = sm.args
    max_ctx = _max_ctx(args)
    _check_n_ctx(n_ctx, max_ctx)
    if threads:
        torch.set_num_threads(threads)
    compute = DTYPES[dtype] if dtype else dev.default_dtype
    return load_llm(sm, dev, compute, n_ctx, budget, keep=reconstruct == "keep", max_ctx=max_ctx, progress=progress)


def _load_llamacpp(model, device: str, dev: Device, dtype, n_ctx, threads, quantized, budget) -> "LLM":
    """Load a GGUF file on llama.cpp (backends/llamacpp.py); tokenizer and engine stay edge-rt's."""
    from backends.llamacpp import LlamaCppBackend

    if dev.kind != "cpu" and device != "auto":
        raise DeviceError(f"the llamacpp backend runs on the CPU here, not {dev.label}")
    if dtype is not None or not quantized:
        raise InvalidOptionError("dtype and quantized do not apply to the llamacpp backend: "
                                 "llama.cpp runs the GGUF file's own tensor types")
    if budget is not None:
        raise InvalidOptionError("budget needs the torch backend (the llamacpp backend loads the whole file)")
    if resolve_model_path(model).is_dir():
        raise ModelFormatError(f"{resolve_model_path(model)}: the llamacpp backend needs a GGUF file, not a folder")
    src = open_model(model)
    max_ctx = src.args.max_position_embeddings
    n_ctx = min(max_ctx, DEFAULT_N_CTX) if n_ctx is None else n_ctx
    _check_n_ctx(n_ctx, max_ctx)
    tokenizer = _tokenizer_for(src)
    t0 = time.perf_counter()
    backend = LlamaCppBackend(src.path, n_ctx, threads=threads)
    return LLM(src, tokenizer, backend, resolve_device("cpu"), torch.float32, True, time.perf_counter() - t0)


class LLM:
    """A loaded model with its tokenizer, backend and KV cache. See the module docstring."""

    def __init__(self, source: ModelSource, tokenizer, backend, device: Device, dtype: torch.dtype,
                 quantized: bool = True, load_s: float = 0.0):
        self.source = source
        self.args = source.args
        self.tokenizer = tokenizer
        self.backend = backend
        self.device = device
        self.dtype = dtype
        self.quantized = quantized
        self.load_s = load_s
        self.engine = Engine(backend, tokenizer)
        self._verify_costs: list[float] | None = None  # measured on first speculative use
        self._drafts: dict[str, "LLM"] = {}  # draft models by path, loaded on first use

    # --- text in, text out ------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    @property
    def last_stats(self) -> GenerationStats:
        return self.engine.last_stats

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, parse_special=parse_special)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from edge_rt.loading.chat_template import CHATML_TEMPLATE

        tok = self.tokenizer
        template = tok.chat_template or CHATML_TEMPLATE
        bos = tok.token_text(tok.bos_id) if tok.bos_id is not None else ""
        eos = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=bos, eos_token=eos)

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of messages rendered with the chat template (special tokens parsed)."""
        return self.tokenizer.encode(self.apply_chat_template(messages, add_generation_prompt), parse_special=True)

    def _prompt_ids(self, prompt: str | Sequence[int], chat: bool) -> list[int]:
        if not isinstance(prompt, str):
            if chat:
                raise InvalidOptionError("chat=True needs a text prompt, not token ids")
            return self._check_ids(prompt)
        if chat:
            return self.chat_ids([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        V = self.tokenizer.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, (int, torch.Tensor)) or int(i) != i:
                raise InvalidOptionError(f"token id {i!r} is not an integer")
            if not 0 <= int(i) < V:
                raise InvalidOptionError(f"token id {int(i)} is outside the vocabulary (size {V})")
        return [int(i) for i in ids]

    @staticmethod
    def _config(max_tokens=256, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                seed=None, stop=None, ignore_eos=False) -> GenerationConfig:
        if isinstance(stop, str):
            stop = [stop]
        sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, seed=seed)
        return GenerationConfig(max_tokens=max_tokens, stop=tuple(stop or ()), sampling=sp, ignore_eos=ignore_eos)

    def speculation(self, speculative=None, references: Sequence[str] | None = None, max_draft: int = 10,
                    adaptive: bool = True):
        """The Speculation (drafter + controller) for these options, or None for plain decoding.

        Args:
            speculative: "none" | "auto" | "ngram" | "reference" | "layerskip" | "draft:PATH".
            references: documents the reference drafter copies spans from, as text or token ids
                (method "reference"; "auto" uses it when references are given).
            max_draft: longest draft (1..16); adaptive: let acceptance and cost choose the length.
        """
        from edge_rt.generation import drafters
        from edge_rt.generation.speculative import Speculation, SpeculativeConfig

        if references is not None and (isinstance(references, str) or
                                        not all(isinstance(r, (str, list, tuple)) for r in references)):
            raise InvalidOptionError("references must be a list of strings (or of token id lists)")
        cfg = SpeculativeConfig.parse(speculative, max_draft=max_draft, adaptive=adaptive)
        method = cfg.method
        if method == "none":
            return None
        exact = getattr(self.backend, "exact_verify", False)
        if method == "auto":
            if not exact:
                return None  # lossless first: no speculation where verify is not bit-exact
            method = "reference" if references else "ngram"
        elif not exact:
            raise InvalidOptionError(
                f"speculative decoding on the {self.backend.name} backend with these weights would not be "
                "bit-exact (its multi-token forward differs from one-token forwards); use speculative='none'")
        if method == "reference" and not references:
            raise InvalidOptionError("speculative method 'reference' needs references (documents to copy from)")
        if method in ("ngram", "reference"):
            refs = [self.tokenizer.encode(r) if isinstance(r, str) else self._check_ids(r) for r in references or ()]
            drafter = drafters.NgramDrafter(references=refs)
        elif method == "draft":
            drafter = drafters.ModelDrafter(self._draft_model(cfg.draft).backend)
        else:  # layerskip
            from edge_rt.generation.layerskip import load_skip_set

            drafter = drafters.LayerSkipDrafter(self.backend, load_skip_set(self))
        return Speculation(drafter, cfg, self._verify_costs, on_costs=self._keep_costs)

    def _keep_costs(self, costs: list[float]) -> None:
        self._verify_costs = costs

    def _draft_model(self, path: str) -> "LLM":
        key = str(path)
        if key not in self._drafts:
            draft = load(path, device=self.device.label, n_ctx=self.n_ctx)
            if not draft.tokenizer.same_vocabulary(self.tokenizer):
                raise InvalidOptionError(f"draft model {path} has a different vocabulary from the target: "
                                         "a draft model must use the same tokenizer")
            self._drafts[key] = draft
        draft = self._drafts[key]
        draft.backend.reset()
        return draft

    def stream_pieces(self, prompt: str | Sequence[int], *, chat: bool = False, speculative=None,
                      references: Sequence[str] | None = None, max_draft: int = 10, **options):
        """Like `stream`, but yields engine Pieces (text, token_id, finish_reason)."""
        config = self._config(**options)
        spec = self.speculation(speculative, references, max_draft)
        ids = self._prompt_ids(prompt, chat)
        return self.engine.generate(ids, config, spec)

    def stream(self, prompt: str | Sequence[int], *, chat: bool = False, **options) -> Iterator[str]:
        """Yield the completion's text as it is generated. Options as in `generate`."""
        for piece in self.stream_pieces(prompt, chat=chat, **options):
            if piece.text:
                yield piece.text

    def generate(self, prompt: str | Sequence[int], *, chat: bool = False, max_tokens: int = 256,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False, speculative: str | None = None,
                 references: Sequence[str] | None = None, max_draft: int = 10) -> Completion:
        """Complete a prompt (text, or token ids).

        Args:
            prompt: text (tokenized without special-token parsing) or a list of token ids.
            chat: wrap a text prompt as one user turn in the model's chat template.
            max_tokens: most tokens to generate.
            temperature: 0 for greedy decoding.
            top_k, top_p, min_p, repetition_penalty, seed: sampling options.
            stop: stop string(s); the returned text ends before the first match.
            ignore_eos: keep generating past end-of-turn tokens.
            speculative: lossless speculative decoding: "none" (default), "auto", "ngram" (prompt
                lookup), "reference" (copy from `references`), "layerskip" or "draft:PATH"; the
                tokens are exactly those of plain decoding (same seed included), only faster.
            references: documents for the reference drafter; max_draft: longest draft (1..16).
        Returns:
            Completion(text, token_ids, finish_reason, stats).
        """
        opts = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, seed=seed, stop=stop, ignore_eos=ignore_eos,
                    speculative=speculative, references=references, max_draft=max_draft)
        return self._collect(self.stream_pieces(prompt, chat=chat, **opts))

    def _collect(self, pieces) -> Completion:
        text, ids, finish = [], [], "length"
        for p in pieces:
            text.append(p.text)
            if p.token_id is not None:
                ids.append(p.token_id)
            if p.finish_reason:
                finish = p.finish_reason
        return Completion("".join(text), ids, finish, self.engine.last_stats)

    def chat(self, messages: list[dict], **options) -> Completion:
        """One assistant reply to OpenAI-style messages [{"role": ..., "content": ...}]."""
        return self._collect(self.stream_chat(messages, **options))

    def stream_chat(self, messages: list[dict], *, speculative=None, references: Sequence[str] | None = None,
                    max_draft: int = 10, **options):
        """Pieces of the assistant reply to `messages` (prefix of the cache is reused)."""
        config = self._config(**options)
        spec = self.speculation(speculative, references, max_draft)
        return self.engine.generate(self.chat_ids(messages), config, spec)

    def session(self, system: str | None = None) -> "ChatSession":
        """A chat that keeps its history (and, through prefix reuse, its KV cache)."""
        return ChatSession(self, system)

    def reset(self) -> None:
        """Drop the KV cache."""
        self.engine.reset()

    def resize(self, budget: int | str, kv: str = "refresh") -> dict:
        """Change the memory budget of a model loaded from a BitStack store, in place.

        Growing reads only the extra blocks from the store; shrinking frees blocks. Open chat
        sessions go on. The cached positions are recomputed with the new weights on the next call
        (kv="refresh": the tokens that follow equal a fresh load's at the new budget), or kept as
        they are (kv="keep": no recompute; later tokens may differ from a fresh load's).

        Args:
            budget: bytes or a size string ("90MB", "1.5GiB"); "auto" for the free-memory rule.
            kv: "refresh" or "keep".
        Returns:
            {"blocks", "changed_blocks", "seconds", "footprint": {...}}.
        Raises:
            InvalidOptionError: not a BitStack model, a budget below the minimum (named), a bad kv.
        """
        from offload.bitstack_load import KV_MODES, auto_budget, parse_budget

        stack = getattr(self, "bitstack", None)
        if stack is None:
            raise InvalidOptionError("resize needs a model loaded from a BitStack store (edge-rt compress --format bitstack)")
        if kv not in KV_MODES:
            raise InvalidOptionError(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}")
        b = parse_budget(budget)
        with self.engine.lock:
            self.engine._check_idle()
            if b == "auto":
                b = min(auto_budget(stack.footprint().total), stack.full_bytes)
            info = stack.resize(b)
            if kv == "refresh" and info["changed_blocks"]:
                self.engine.reset()
        return info

    def perplexity(self, text: str | Sequence[int], window: int | None = None) -> float:
        """Perplexity of text, scored in non-overlapping windows of `window` tokens (default n_ctx)."""
        ids = self.tokenizer.encode(text) if isinstance(text, str) else self._check_ids(text)
        if window is not None and (not isinstance(window, int) or window < 2):
            raise InvalidOptionError(f"window must be an integer >= 2, got {window!r}")
        window = min(window or self.n_ctx, self.n_ctx)
        if len(ids) < 2:
            raise InvalidOptionError("perplexity needs at least 2 tokens")
        nll, count = 0.0, 0
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            logits = self.engine.score(chunk)
            lp = torch.log_softmax(logits[:-1].float(), -1)
            nll -= lp.gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
            count += len(chunk) - 1
        return math.exp(nll / count)

    def info(self) -> dict:
        from edge_rt.memory.estimate import describe_model

        kv_dtype = getattr(self.backend, "kv_dtype", None) or self.backend.caches[0].dtype
        info = describe_model(self.source, dtype=self.dtype, n_ctx=self.n_ctx, kv_dtype=kv_dtype,
                              quantized=self.quantized, device=self.device.torch_device)
        if getattr(self, "bitstack", None) is not None:  # BitStack store: the planned footprint
            st = self.bitstack
            info["bitstack"] = {"footprint": st.footprint(budget=st.budget).to_dict(), "min_bytes": st.min_bytes,
                                "full_bytes": st.full_bytes, "blocks": st.loaded, "total_blocks": len(st.order)}
        if hasattr(self.backend, "memory_info"):  # a backend that knows its own footprint (llamacpp)
            info["memory"] |= self.backend.memory_info()
        return info | {"device": self.device.to_dict(), "load_s": self.load_s,
                       "backend": getattr(self.backend, "name", "torch")}


class ChatSession:
    """Multi-turn chat. Each turn sends the whole history; the engine reuses the cached prefix.

    Context policy: the history plus the new turn must leave room for a reply of
    min(max_tokens, n_ctx // 2) tokens; when it does not, the oldest non-system turns are dropped,
    a user/assistant pair at a time. If the newest user turn alone does not fit,
    ContextOverflowError is raised and the history is left as it was.
    """

    def __init__(self, llm: LLM, system: str | None = None):
        self.llm = llm
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def _fit(self, messages: list[dict], reserve: int) -> tuple[list[dict], list[int]]:
        """The messages (oldest turns dropped as needed) and their ids, leaving `reserve` positions."""
        messages = list(messages)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        while True:
            ids = self.llm.chat_ids(messages)
            if len(ids) + reserve <= self.llm.n_ctx:
                return messages, ids
            if len(messages) - first <= 1:
                raise ContextOverflowError(
                    f"the message has {len(ids)} tokens; with room for a {reserve}-token reply the "
                    f"context holds {self.llm.n_ctx}"
                )
            del messages[first : first + 2]

    def stream(self, user: str, *, speculative=None, references: Sequence[str] | None = None, max_draft: int = 10,
               **options):
        """Yield text pieces of the reply; the turn is added to the history when it ends."""
        config = self.llm._config(**options)  # bad options fail before the history changes
        spec = self.llm.speculation(speculative, references, max_draft)
        reserve = min(config.max_tokens, self.llm.n_ctx // 2)
        messages, ids = self._fit(self.messages + [{"role": "user", "content": user}], reserve)
        self.messages = messages
        reply = []
        try:
            for piece in self.llm.engine.generate(ids, config, spec):
                reply.append(piece.text)
                if piece.text:
                    yield piece.text
        finally:
            self.messages.append({"role": "assistant", "content": "".join(reply)})

    def send(self, user: str, **options) -> str:
        return "".join(self.stream(user, **options))

    def reset(self) -> None:
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages = system
