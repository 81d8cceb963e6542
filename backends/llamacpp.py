"""llama.cpp as a backend, on llama-cpp-python's low-level API (written against 0.3.36).

One llama.cpp context holds one sequence (seq_id 0). `forward` fills a `llama_batch` with the
tokens at consecutive positions and asks for the logits of every position (all_logits) or of the
last one, then calls `llama_decode`; chunks longer than `n_batch` are decoded one after another.
`trim` removes positions from llama.cpp's KV cache with `llama_memory_seq_rm`, so speculative
decoding can drop the entries of rejected draft tokens.

Exact mode (the default): llama.cpp's one-row decode takes other kernel paths than a multi-row
batch (attention split over threads, other matmul paths), so a verify chunk's rows differ from
one-token forwards (measured in docs/NOTES.md: up to ~1 logit, argmax flips). A multi-row batch is
self-consistent, though: a row's logits and KV entries do not depend on how many rows share the
batch. So in exact mode no decode runs a single row after position 0: a one-token forward is widened
with the previous token (its KV entry is removed and recomputed, identically, in the same batch).
Every logit and KV entry then comes from the multi-row path, verify rows are bit-identical to
one-token forwards (`exact_verify`), and speculative decoding on this backend is lossless; the price
is a 2-row decode per plain token (measured by scripts/bench_verify_cost.py).

Every input is checked in Python before it reaches C (token ids against the vocabulary, positions
against the context), so bad input raises an `EdgeRTError` instead of aborting the process.
llama-cpp-python is an optional dependency: it is imported when a backend is built.
"""

from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from edge_rt.errors import (ContextOverflowError, DeviceError, EdgeRTError, InvalidOptionError,
                            ModelFormatError, ModelNotFoundError)

SEQ_ID = 0  # the one sequence a backend holds
DEFAULT_N_BATCH = 512  # llama_cpp.Llama's default: tokens per llama_decode call
KV_ELEMENT_BYTES = 2  # llama.cpp's default KV cache type is f16 (context_params.type_k/type_v)


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise DeviceError("the llamacpp backend needs llama-cpp-python: pip install -e '.[llamacpp]'"
                          f" ({e})") from None
    return llama_cpp


def _free_all(lib, batch, ctx, model) -> None:
    """Free the C objects in dependency order (batch, context, then model)."""
    if batch is not None:
        lib.llama_batch_free(batch)
    if ctx is not None:
        lib.llama_free(ctx)
    if model is not None:
        lib.llama_model_free(model)


class LlamaCppBackend:
    """The Backend protocol (backends/base.py) on a llama.cpp context.

    Args:
        path: a GGUF file.
        n_ctx: positions the backend holds.
        threads: CPU threads for decode and batches (default: the usable cores).
        n_batch: most tokens per llama_decode call; longer forwards are split.
        flash_attn: llama.cpp's flash-attention kernels (off by default, as in llama_cpp.Llama).
        exact: widen one-token forwards to two rows, so verify() is bit-exact (see the module doc;
            measured without flash_attn only, so exact_verify is False with it).
        gpu_layers: layers offloaded to a GPU (0: CPU only; -1: all), for GPU builds of llama.cpp.
        verbose: let llama.cpp print its log on stderr.
    Raises:
        ModelNotFoundError, ModelFormatError, InvalidOptionError, DeviceError.
    """

    name = "llamacpp"
    kv_dtype = torch.float16  # what LLM.info() reports for the KV cache

    def __init__(self, path: str | os.PathLike, n_ctx: int, *, threads: int | None = None,
                 n_batch: int = DEFAULT_N_BATCH, flash_attn: bool = False, exact: bool = True,
                 gpu_layers: int = 0, verbose: bool = False):
        checks = (("n_ctx", n_ctx, 1), ("n_batch", n_batch, 8), ("threads", 1 if threads is None else threads, 1))
        for opt, value, low in checks:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidOptionError(f"{opt} must be an integer >= {low}, got {value!r}")
        path = Path(path)
        _check_gguf(path)
        lib = _import_llama_cpp()
        from llama_cpp._logger import set_verbose

        set_verbose(verbose)  # llama-cpp-python's log filter (what Llama(verbose=...) sets)
        lib.llama_backend_init()
        self.lib = lib
        self.path = path
        self.n_ctx = n_ctx
        self.n_batch = max(8, min(n_batch, n_ctx))  # >= 3 keeps _chunk_bounds' chunks >= 2 rows
        self.threads = threads or _usable_cores()
        self.flash_attn = flash_attn
        # measured exact with llama.cpp's default attention only; flash attention's batched path is not
        self.exact_verify = bool(exact) and not flash_attn
        self._ids: list[int] = []  # the token ids in the KV cache, in order (position = len)
        self._narrow_tail = False  # the last cached position came from a one-row decode
        self.model = self.ctx = self.batch = None
        self._finalizer = None
        self._open(gpu_layers)

    # --- construction -------------------------------------------------------------------------

    def _open(self, gpu_layers: int) -> None:
        lib = self.lib
        mparams = lib.llama_model_default_params()
        mparams.n_gpu_layers = gpu_layers
        model = lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not model:
            raise ModelFormatError(f"{self.path}: llama.cpp could not load this GGUF file "
                                   "(corrupt, or an architecture or tensor type it does not know)")
        ctx = batch = None
        try:
            ctx = lib.llama_init_from_model(model, self._context_params())
            if not ctx:
                raise InvalidOptionError(f"llama.cpp could not create a context of {self.n_ctx} positions")
            batch = lib.llama_batch_init(self.n_batch, 0, 1)  # [n_batch] tokens, 1 sequence each
        except BaseException:
            _free_all(lib, None, ctx, model)
            raise
        self.model, self.ctx, self.batch = model, ctx, batch
        self._finalizer = weakref.finalize(self, _free_all, lib, batch, ctx, model)
        self.memory = lib.llama_get_memory(ctx)
        self.vocab_size = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self.n_ctx_cells = lib.llama_n_ctx(ctx)  # llama.cpp may round the context up
        if self.n_ctx_cells < self.n_ctx:
            self.close()
            raise InvalidOptionError(f"llama.cpp gave a context of {self.n_ctx_cells} positions, "
                                     f"{self.n_ctx} were asked for")
        self._views()

    def _context_params(self):
        p = self.lib.llama_context_default_params()
        p.n_ctx = self.n_ctx
        p.n_batch = self.n_batch
        p.n_ubatch = self.n_batch
        p.n_seq_max = 1
        p.n_threads = p.n_threads_batch = self.threads
        p.flash_attn_type = (self.lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attn
                             else self.lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        p.no_perf = True
        return p

    def _views(self) -> None:
        """numpy views on the batch's C arrays, so filling a batch is a few vector copies."""
        b, n = self.batch, self.n_batch
        self._tok = np.ctypeslib.as_array(b.token, shape=(n,))
        self._posv = np.ctypeslib.as_array(b.pos, shape=(n,))
        self._want = np.ctypeslib.as_array(b.logits, shape=(n,))
        np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
        for i in range(n):
            b.seq_id[i][0] = SEQ_ID

    def close(self) -> None:
        """Free llama.cpp's model, context and batch (also done when the object is collected)."""
        if self._finalizer is not None:
            self._finalizer()
        self.model = self.ctx = self.batch = None

    # --- the Backend protocol -----------------------------------------------------------------

    @property
    def position(self) -> int:
        return len(self._ids)

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        """Append `tokens` at `position`; return fp32 logits [T, V] (all_logits) or [1, V] (last)."""
        ids = self._checked_ids(tokens)  # [T]
        T = len(ids)
        if self.position + T > self.n_ctx:
            raise ContextOverflowError(f"{self.position + T} positions exceed the context of {self.n_ctx}")
        widen = self.exact_verify and self.position > 0 and (T == 1 or self._narrow_tail)
        if widen:  # recompute the previous token in the same batch (see the module doc)
            ids = np.concatenate([np.asarray(self._ids[-1:], dtype=np.int32), ids])
            self.trim(1)
        outs = []
        bounds = _chunk_bounds(len(ids), self.n_batch)
        for start, end in bounds:
            self._decode(ids[start:end], all_logits)
            if all_logits or end == len(ids):
                outs.append(self._logits(end - start if all_logits else 1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out[1:] if widen and all_logits else out

    def verify(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append tokens; fp32 logits [T, V] for every position (a speculative verify chunk)."""
        return self.forward(tokens, all_logits=True)

    def trim(self, n: int) -> int:
        """Drop the last n positions from llama.cpp's KV cache; return how many were dropped."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidOptionError(f"trim needs an integer count, got {n!r}")
        n = max(0, min(self.position, n))
        if n:
            self._require_open()
            if not self.lib.llama_memory_seq_rm(self.memory, SEQ_ID, self.position - n, -1):
                raise EdgeRTError(f"llama.cpp refused to remove positions {self.position - n}.. from its KV cache")
            del self._ids[-n:]
            self._narrow_tail = False  # only position 0 can come from a one-row decode
        return n

    def reset(self) -> None:
        self._require_open()
        self.lib.llama_memory_clear(self.memory, False)  # cells freed; the buffers need no zeroing
        self._ids = []
        self._narrow_tail = False

    def kv_bytes(self) -> int:
        """Bytes of llama.cpp's KV buffers: allocated for the whole context when it is created."""
        lib, m = self.lib, self.model
        if m is None:
            return 0
        head_dim = lib.llama_model_n_embd(m) // lib.llama_model_n_head(m)
        per_cell = 2 * lib.llama_model_n_layer(m) * lib.llama_model_n_head_kv(m) * head_dim  # K and V, all layers
        return per_cell * self.n_ctx_cells * KV_ELEMENT_BYTES

    def memory_info(self) -> dict:
        """What llama.cpp holds: weights (the file's own tensor types) and the KV cache, in bytes."""
        self._require_open()
        weights = self.lib.llama_model_size(self.model)
        kv = self.kv_bytes()
        return {"weights_bytes": weights, "kv_cache_bytes": kv, "kv_cache_dtype": "float16",
                "total_bytes": weights + kv, "activations_bytes": None}

    # --- helpers ------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self.ctx is None:
            raise InvalidOptionError("this llama.cpp backend is closed")

    def _checked_ids(self, tokens: Sequence[int]) -> np.ndarray:
        self._require_open()
        ids = []
        for t in tokens:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer, torch.Tensor)) or int(t) != t:
                raise InvalidOptionError(f"token id {t!r} is not an integer")
            ids.append(int(t))
        if not ids:
            raise InvalidOptionError("forward() needs at least one token")
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise InvalidOptionError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return np.asarray(ids, dtype=np.int32)

    def _decode(self, chunk: np.ndarray, all_logits: bool) -> None:
        """One llama_decode of len(chunk) <= n_batch tokens at the current position."""
        T, pos = len(chunk), self.position
        self._tok[:T] = chunk
        self._posv[:T] = np.arange(pos, pos + T, dtype=np.int32)
        self._want[:T] = 1 if all_logits else 0
        self._want[T - 1] = 1
        self.batch.n_tokens = T
        rc = self.lib.llama_decode(self.ctx, self.batch)
        if rc == 0:
            self._ids.extend(chunk.tolist())
            self._narrow_tail = T == 1
            return
        # on failure llama.cpp keeps whatever ubatches it finished: follow its memory state
        done = self.lib.llama_memory_seq_pos_max(self.memory, SEQ_ID) + 1 - pos
        self._ids.extend(chunk[: max(done, 0)].tolist())
        if rc == 1:
            raise ContextOverflowError(f"llama.cpp found no KV slot for {T} tokens at position {pos}")
        raise EdgeRTError(f"llama_decode failed with code {rc} ({T} tokens at position {pos})")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last decode's output rows, in batch order: fp32 [rows, V] (a copy)."""
        V = self.vocab_size
        ptr = self.lib.llama_get_logits_ith(self.ctx, -rows) if rows == 1 else self.lib.llama_get_logits(self.ctx)
        if not ptr:
            raise EdgeRTError("llama.cpp returned no logits")
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(rows, V)).copy())


def _chunk_bounds(n: int, n_batch: int) -> list[tuple[int, int]]:
    """[start, end) of the llama_decode calls for n tokens: at most n_batch each, none of one
    token unless n == 1 (a one-row decode takes llama.cpp's other kernel paths)."""
    bounds = [(s, min(s + n_batch, n)) for s in range(0, n, n_batch)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        (a, b), (_, e) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, b - 1), (b - 1, e)]
    return bounds


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_gguf(path: Path) -> None:
    """Refuse what is not a GGUF file before llama.cpp sees it."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ModelFormatError(f"{path}: the llamacpp backend needs a GGUF file, not a folder")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelFormatError(f"{path}: not a GGUF file (magic {magic!r}); the llamacpp backend reads only GGUF")
