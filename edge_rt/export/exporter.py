"""`export_bundle`: a model -> a verified-ready ExecuTorch (.pte) or ONNX bundle.

Stages (each reported through `log`, the CLI prints them on stderr with elapsed time):
    open      resolve the model, check the options, build the tokenizer files
    weights   build edge-rt's Transformer with dense fp32 weights (quantized=False)
    quantize  ExecuTorch: linear layers and the embedding onto grids that hold the file's codes
              (edge_rt/export/et_quant.py, before export)
    export    torch.export with a dynamic token count T in 1..max_chunk
    lower     ExecuTorch: to_edge_transform_and_lower(XnnpackPartitioner) + to_executorch
              ONNX: torch.onnx.export (dynamo), then edge_rt.export.onnx_quant for int8 / 8da4w
    write     model file, tokenizer files, manifest with sha256 of every file; atomic rename

Quantization schemes (QUANTS), each by its runtime's own tools:
    none   fp32 weights and activations.
    int8   weights of at most 8 bits.
           ExecuTorch: XNNPACK int8 x int4 kernels on the file's Q4_0/Q4_1/Q8_0 codes (exact; Q8_0
           as two 4-bit halves), other weights symmetric 8-bit per channel; int8 codes for the
           embedding table.
           ONNX: MatMulNBits weights of at most 8 bits in blocks of 32 inputs, fp32 activations.
    8da4w  layers at most 4 bits, the output projection at most 8.
           ExecuTorch: the same kernels and codes; other layer weights asymmetric 4-bit per 32 inputs.
           ONNX: MatMulNBits 4-bit weights in blocks of 32 inputs, the output projection up to 8
           bits, fp32 activations.
Both formats keep the GGUF's own grids where the file has them, so on a Q4_1/Q8_0 model (the
default) int8 and 8da4w give the same file. The ONNX quantizer finds the grid from the dense
weights (edge_rt/export/onnx_quant.py, fp32 activations, embedding fp32); the ExecuTorch one takes
the codes from the file and runs XNNPACK's int8-activation kernels on two int8 rows per token
(x on the kernel's own grid, then the remainder), offsets as small fp32 linears on group sums
(edge_rt/export/et_quant.py). Both meet the quality bars on SmolLM2 (docs/EXPORT.md).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

import torch

import edge_rt
from edge_rt.errors import EdgeRTError, InvalidOptionError, UnsupportedModelError, one_line
from edge_rt.export.bundle import FORMAT, FORMAT_VERSION, RUNTIMES, finish_bundle, staging_dir, write_file_atomic

FORMATS = tuple(RUNTIMES)
QUANTS = ("none", "int8", "8da4w")
GROUP_SIZE = 32  # 8da4w weight group (inputs per scale)
DEFAULT_MAX_SEQ = 512
DEFAULT_MAX_CHUNK = 32  # most tokens per forward: speculative verify chunks and prefill pieces

_ET_KERNEL = ("XNNPACK int8 x int4/int8 linears, torchao IntxUnpackedToInt8Tensor on the file's codes (not "
              f"re-quantized): Q4_0/Q4_1 exact as 4-bit codes plus per-{GROUP_SIZE} offsets (an fp32 linear on "
              "group sums), Q8_0 exact as two 4-bit halves")
_ET_ACTS = ("activations as two int8 rows per token (x on the kernel's own grid, then the remainder); "
            "embedding: int8 codes with group scales (the file's where it has them)")
_ORT_FORM = ("on the fast kernel's form (4-bit codes with zero point 8, 8 bits as two 4-bit halves, zero "
             "points as block offsets through an fp32 product of the input's block sums); fp32 activations")
# quant -> what the manifest says was done, per format
QUANT_METHODS = {
    ("executorch", "int8"): f"{_ET_KERNEL}; weights of at most 8 bits (others symmetric 8-bit per output "
                            f"channel); {_ET_ACTS}",
    ("executorch", "8da4w"): f"{_ET_KERNEL}; layers at most 4 bits (others asymmetric 4-bit per {GROUP_SIZE} "
                             "inputs), output projection at most 8 bits (others symmetric 8-bit per output "
                             f"channel); {_ET_ACTS}",
    ("onnx", "int8"): f"MatMulNBits, weights of at most 8 bits in blocks of {GROUP_SIZE} inputs, per matrix the "
                      f"grid (symmetric / asymmetric, 4 / 8 bits) that reproduces it best; {_ORT_FORM}",
    ("onnx", "8da4w"): f"MatMulNBits, 4-bit weights in blocks of {GROUP_SIZE} inputs (output projection at most 8 "
                       f"bits), per matrix the grid that reproduces it best; {_ORT_FORM}",
}


def check_options(format: str, quant: str, max_seq, max_chunk) -> None:
    """Raise InvalidOptionError for a bad --format/--quant/--max-seq/--max-chunk (before any work)."""
    if format not in FORMATS:
        raise InvalidOptionError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if quant not in QUANTS:
        raise InvalidOptionError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 16:
        raise InvalidOptionError(f"--max-seq must be an integer >= 16, got {max_seq!r}")
    if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or not 1 <= max_chunk <= max_seq:
        raise InvalidOptionError(f"--max-chunk must be an integer in [1, max_seq], got {max_chunk!r}")


def _require(module: str, extra: str = "export") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InvalidOptionError(f"{module} is not installed; install edge-rt's '{extra}' extra")


def export_bundle(model=None, out=None, *, format: str = "executorch", quant: str = "none",
                  max_seq: int = DEFAULT_MAX_SEQ, max_chunk: int = DEFAULT_MAX_CHUNK,
                  log: Callable[[str], None] | None = None) -> Path:
    """Export a model to a self-contained bundle folder.

    Args:
        model: a GGUF file or Hugging Face folder (None: the default model).
        out: the bundle folder to create (replaced if it holds a bundle).
        format: "executorch" (.pte, XNNPACK) or "onnx".
        quant: "none", "int8" or "8da4w" (see the module docstring).
        max_seq: positions of the static KV cache (the bundle's context length).
        max_chunk: most tokens one forward takes (longer inputs are run in chunks).
        log: called with a line per stage.
    Returns:
        The bundle path.
    Raises:
        InvalidOptionError (bad options, unwritable output, missing exporter package),
        ModelNotFoundError / ModelFormatError (the model), UnsupportedModelError (the exporter
        cannot handle the model).
    """
    from edge_rt.api import _tokenizer_for, open_model
    from edge_rt.export.tokenizer_files import tokenizer_files, tokenizer_manifest

    log = log or (lambda msg: None)
    if out is None:
        raise InvalidOptionError("an output folder (-o BUNDLE/) is required")
    check_options(format, quant, max_seq, max_chunk)
    _require("executorch" if format == "executorch" else "onnxruntime")
    if format == "onnx":
        _require("onnxscript")
    t0 = time.perf_counter()
    stage = None

    def step(name: str) -> None:
        log(f"[{time.perf_counter() - t0:6.1f}s] {name}")

    try:
        step("open model")
        src = open_model(model)
        args = src.args
        limit = min(args.max_position_embeddings, args.sliding_window or args.max_position_embeddings)
        if max_seq > limit:
            raise InvalidOptionError(f"--max-seq must be at most the model's context {limit}, got {max_seq}")
        tok = _tokenizer_for(src)
        tok_files = tokenizer_files(src, tok)
        dest = Path(out)
        stage = staging_dir(dest)
        step(f"build fp32 weights ({args.num_hidden_layers} layers, {args.num_parameters() / 1e6:.0f} M parameters)")
        wrapper = _wrapper(src, max_seq, functional=format == "onnx")
        runtime, model_file = RUNTIMES[format]
        if format == "executorch":
            io = _export_executorch(wrapper, src, stage / model_file, quant, max_chunk, step)
        else:
            io = _export_onnx(wrapper, stage / model_file, quant, max_chunk, step)
        step("write tokenizer, chat template and manifest (sha256)")
        for name, text in tok_files.items():
            write_file_atomic(stage / name, text)
        manifest = _manifest(src, tok, format, runtime, model_file, quant, max_seq, max_chunk, io, tok_files,
                             tokenizer_manifest(tok))
        path = finish_bundle(stage, dest, manifest)
        stage = None
        step(f"done: {path}")
        return path
    except EdgeRTError:
        raise
    except OSError as e:
        raise InvalidOptionError(f"cannot write the bundle to {out}: {one_line(e.strerror or e)}") from None
    except Exception as e:  # an exporter failure: the model uses something the toolchain can't lower
        raise UnsupportedModelError(f"the {format} exporter cannot handle this model: {one_line(e)}") from None
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)


def _wrapper(src, max_seq: int, functional: bool):
    from edge_rt.export.module import ExportLM
    from edge_rt.loading.weights import build_model

    net = build_model(src.args, src.tensors, torch.float32, torch.device("cpu"), max_seq, quantized=False)
    return ExportLM(net, max_seq, functional=functional).eval()


def _example(max_chunk: int):
    T = min(4, max_chunk)
    return torch.zeros(1, T, dtype=torch.long), torch.arange(T, dtype=torch.long)


def _dims(max_chunk: int):
    from torch.export import Dim

    # min=1 would let export specialize T == 1 away; the graph is valid for 1..max_chunk all the same
    T = Dim("T", min=1, max=max_chunk)
    return {"tokens": {1: T}, "input_pos": {0: T}}


def _io(args, max_seq: int, functional: bool) -> dict:
    """Input/output names and shapes for the manifest."""
    a = args
    cache = [1, a.num_key_value_heads, max_seq, a.head_dim]
    inputs = [{"name": "tokens", "dtype": "int64", "shape": [1, "T"]},
              {"name": "input_pos", "dtype": "int64", "shape": ["T"]}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": [1, "T", a.vocab_size]}]
    if functional:
        for i in range(a.num_hidden_layers):
            for kv in ("k", "v"):
                inputs.append({"name": f"{kv}_cache_{i}", "dtype": "float32", "shape": cache})
                outputs.append({"name": f"{kv}_cache_out_{i}", "dtype": "float32", "shape": cache})
    return {"inputs": inputs, "outputs": outputs,
            "state": "inputs/outputs" if functional else "mutable buffers in the program (one per layer, k and v)",
            "kv_cache_shape": cache}


def _export_executorch(wrapper, src, path: Path, quant: str, max_chunk: int, step) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    from edge_rt.export.et_quant import quantize_model

    counts = None
    if quant != "none":
        step(f"quantize linear layers and embedding: {QUANT_METHODS[('executorch', quant)]}")
        counts = quantize_model(wrapper.model, src, quant)
    step(f"torch.export (dynamic token count 1..{max_chunk})")
    with torch.no_grad():
        ep = torch.export.export(wrapper, _example(max_chunk), dynamic_shapes=_dims(max_chunk), strict=False)
    step("lower to XNNPACK (to_edge_transform_and_lower)")
    # One partitioner for fp32 and dynamically quantized ops: a quantized linear shares its
    # delegate with the ops that prepare its activation rows (et_quant.GridLinear).
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    step("to_executorch (memory planning, serialization)")
    # The caches start as zeros stored in the program: masked positions are multiplied by a zero
    # attention weight, and uninitialized memory could hold NaN bit patterns (0 * NaN = NaN).
    config = ExecutorchBackendConfig(passes=[InitializedMutableBufferPass(["k_cache", "v_cache"])])
    program = edge.to_executorch(config)
    write_file_atomic(path, program.buffer)
    io = _io(wrapper.model.args, wrapper.max_seq, functional=False)
    if counts is not None:
        io["quantized_matmuls"] = counts
    return io


def _export_onnx(wrapper, path: Path, quant: str, max_chunk: int, step) -> dict:
    args = wrapper.model.args
    io = _io(args, wrapper.max_seq, functional=True)
    names_in = [x["name"] for x in io["inputs"]]
    names_out = [x["name"] for x in io["outputs"]]
    caches = [torch.zeros(io["kv_cache_shape"]) for _ in range(2 * args.num_hidden_layers)]
    tokens, pos = _example(max_chunk)
    dims = _dims(max_chunk) | {"caches": [None] * len(caches)}
    step(f"torch.onnx.export (dynamo, dynamic token count 1..{max_chunk})")
    with torch.no_grad():
        program = torch.onnx.export(wrapper, (tokens, pos, caches), dynamo=True, input_names=names_in,
                                    output_names=names_out, dynamic_shapes=dims, optimize=True, verbose=False)
    fp32 = path if quant == "none" else path.with_name(path.stem + ".fp32.onnx")
    program.save(str(fp32))
    del program
    if quant != "none":
        step(f"quantize: {QUANT_METHODS[('onnx', quant)]}")
        io["quantized_matmuls"] = _quantize_onnx(fp32, path, quant, args.vocab_size)
        fp32.unlink()
    return io


def _quantize_onnx(src: Path, dst: Path, quant: str, vocab_size: int) -> dict:
    from edge_rt.export.onnx_quant import quantize_onnx_blockwise

    return quantize_onnx_blockwise(src, dst, quant, vocab_size)


def _manifest(src, tok, format, runtime, model_file, quant, max_seq, max_chunk, io, tok_files, tok_info) -> dict:
    args = src.args
    matrices = io.pop("quantized_matmuls", None)
    return {
        "bundle_format": FORMAT,
        "format_version": FORMAT_VERSION,
        "edge_rt_version": edge_rt.__version__,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "format": format,
        "runtime": runtime,
        "model_file": model_file,
        "architecture": args.model_type,
        "args": args.to_dict(),
        "vocab_size": args.vocab_size,
        "max_seq": max_seq,
        "max_chunk": max_chunk,
        "token_limits": f"each forward takes 1..{max_chunk} tokens at consecutive positions < {max_seq}; "
                        "a speculative draft of k tokens needs k + 1 <= max_chunk",
        "dtype": "float32",
        "quantization": {"mode": quant, "method": QUANT_METHODS.get((format, quant), "none"),
                         "group_size": None if quant == "none" else GROUP_SIZE,
                         "embedding": matrices.pop("embedding", "float32") if matrices else "float32",
                         "matrices": matrices},  # count per grid
        "io": io,
        "tokenizer": tok_info,
        "chat_template": "chat_template.jinja",
        "source": {"path": str(src.path), "format": src.format},
    }
