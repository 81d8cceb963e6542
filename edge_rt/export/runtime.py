"""Run and check bundles: `load_bundle` -> LLM on the ExecuTorch or ONNX Runtime backend, `verify_bundle`.

The LLM is the same class the torch backend gets, so sampling, streaming, chat sessions and
speculative decoding run on a bundle unchanged; only the backend differs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from edge_rt.errors import ContextOverflowError, InvalidOptionError
from edge_rt.export.bundle import Bundle, open_bundle

# Fixed prompt set for `edge-rt verify`: plain text and one chat turn, short and long-ish.
VERIFY_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "<|im_start|>user\nWhat is 2 + 2? Answer in one word.<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to",
    "1, 2, 3, 5, 8, 13, 21,",
)


def make_backend(bundle: Bundle, threads: int | None = None):
    """The backend that runs `bundle` (imports its runtime lazily)."""
    if bundle.format == "executorch":
        from backends.executorch import ExecuTorchBackend

        if threads:
            torch.set_num_threads(threads)
        return ExecuTorchBackend(bundle.model_file, bundle.manifest)
    from backends.onnxruntime import OnnxRuntimeBackend

    return OnnxRuntimeBackend(bundle.model_file, bundle.manifest, threads=threads)


def load_bundle(path, *, threads: int | None = None, n_ctx: int | None = None, verify: bool = True):
    """Load a bundle folder as an LLM.

    Args:
        path: the bundle folder (with manifest.json).
        threads: CPU threads for the runtime.
        n_ctx: must be None or at most the bundle's max_seq (the static cache is fixed at export).
        verify: check every file's sha256 first.
    Returns:
        An edge_rt.api.LLM driving the bundle's runtime.
    """
    from devices import resolve_device
    from edge_rt.api import LLM, ModelSource
    from edge_rt.export.tokenizer_files import load_bundle_tokenizer
    from edge_rt.models.llama import ModelArgs

    t0 = time.perf_counter()
    bundle = open_bundle(path, verify=verify)
    m = bundle.manifest
    if n_ctx is not None and n_ctx != m["max_seq"]:
        raise InvalidOptionError(f"a bundle's context is fixed at export: max_seq {m['max_seq']}, got n_ctx {n_ctx}")
    args = ModelArgs(**m["args"])
    tokenizer = load_bundle_tokenizer(bundle.path, m["tokenizer"], m["vocab_size"])
    backend = make_backend(bundle, threads)
    src = ModelSource(bundle.path, m["format"], args, {}, {}, m)
    return LLM(src, tokenizer, backend, resolve_device("cpu"), torch.float32,
               quantized=m["quantization"]["mode"] != "none", load_s=time.perf_counter() - t0)


def compare_logits(ref_backend, test_backend, prompts_ids: list[list[int]]) -> dict:
    """Max |logit diff| and top-1 agreement of two backends over every position of each prompt."""
    max_diff, agree, total = 0.0, 0, 0
    for ids in prompts_ids:
        ref_backend.reset()
        test_backend.reset()
        a = ref_backend.forward(ids, all_logits=True)
        b = test_backend.forward(ids, all_logits=True)
        max_diff = max(max_diff, (a - b).abs().max().item())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
    ref_backend.reset()
    test_backend.reset()
    return {"max_abs_logit_diff": max_diff, "top1_agreement": agree / total, "positions": total}


def verify_bundle(path, model=None, *, prompts=VERIFY_PROMPTS, threads: int | None = None) -> dict:
    """Compare a bundle's logits with the torch backend (fp32, dense weights) on a prompt set.

    Args:
        path: the bundle folder.
        model: the source model (default: the path recorded in the manifest).
        prompts: texts; chat markup in them is parsed as special tokens.
        threads: CPU threads.
    Returns:
        {"max_abs_logit_diff", "top1_agreement", "positions", "prompts", "bundle", "reference", ...}.
    """
    import edge_rt

    llm = load_bundle(path, threads=threads)
    m = llm.source.metadata
    source = model or m["source"]["path"]
    ref = edge_rt.load(source, device="cpu", dtype="float32", quantized=False, n_ctx=m["max_seq"], threads=threads)
    ids = [llm.tokenizer.encode(p, parse_special=True) for p in prompts]
    ref_ids = [ref.tokenizer.encode(p, parse_special=True) for p in prompts]
    if ids != ref_ids:
        raise InvalidOptionError("the bundle's tokenizer and the reference model's disagree on the prompt set")
    too_long = [len(i) for i in ids if len(i) > m["max_seq"]]
    if too_long:
        raise ContextOverflowError(f"a verify prompt has {too_long[0]} tokens, more than max_seq {m['max_seq']}")
    out = compare_logits(ref.backend, llm.backend, ids)
    return out | {"prompts": len(prompts), "bundle": str(Path(path)), "format": m["format"],
                  "quantization": m["quantization"]["mode"], "reference": f"torch backend, {source}, float32 dense"}
