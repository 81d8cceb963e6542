"""What the ExecuTorch and ONNX Runtime backends share: position bookkeeping over a static cache.

An exported graph takes 1..max_chunk tokens at explicit positions and keeps a static
[1, Hkv, max_seq, hd] cache per layer, written at those positions and read under a mask built
from them. Rolling back is therefore only a smaller position: entries past it are masked out
until they are overwritten.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class StaticCacheBackend:
    """Backend protocol over a `_run(tokens [1, T] int64, positions [T] int64) -> logits [T, V]`."""

    name = "static"
    kv_dtype = torch.float32  # the exported caches are fp32 (LLM.info reads this)
    # Whether a T-token forward's rows equal T one-token forwards bit for bit (speculative decoding
    # refuses explicit methods where it is False). Set per runtime from measurements
    # (tests/test_export.py): ExecuTorch/XNNPACK yes; ONNX Runtime no (differences ~1e-5).
    exact_verify = False

    def __init__(self, manifest: dict):
        args = manifest["args"]
        self.manifest = manifest
        self.n_ctx = int(manifest["max_seq"])
        self.max_chunk = int(manifest["max_chunk"])
        self.vocab_size = int(manifest["vocab_size"])
        L, Hkv, hd = args["num_hidden_layers"], args["num_key_value_heads"], args["head_dim"]
        self._kv_bytes_full = 2 * L * Hkv * self.n_ctx * hd * 4  # fp32 k and v, allocated up front
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    def _run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def forward(self, tokens: Sequence[int], all_logits: bool = False) -> torch.Tensor:
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        if self._pos + ids.size > self.n_ctx:
            raise IndexError(f"{self._pos + ids.size} positions exceed the bundle's max_seq of {self.n_ctx}")
        outs = []
        for start in range(0, ids.size, self.max_chunk):
            chunk = ids[start : start + self.max_chunk]
            pos = np.arange(self._pos, self._pos + chunk.size, dtype=np.int64)
            logits = self._run(chunk[None], pos)  # [T, V]
            self._pos += chunk.size
            outs.append(logits if all_logits else logits[-1:])
        out = outs if all_logits else outs[-1:]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(out), dtype=np.float32))

    def verify(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append tokens; fp32 logits [T, V] (bit-identical to one-token forwards where exact_verify)."""
        return self.forward(tokens, all_logits=True)

    def trim(self, n: int) -> int:
        n = max(0, min(self._pos, int(n)))
        self._pos -= n
        return n

    def reset(self) -> None:
        self._pos = 0

    def kv_bytes(self) -> int:
        return self._kv_bytes_full

    def memory_info(self) -> dict:
        """Footprint facts LLM.info adds: the model file on disk and the static cache."""
        files = self.manifest.get("files", {})
        model = files.get(self.manifest.get("model_file"), {})
        return {"bundle_model_file_bytes": model.get("bytes"), "kv_cache_bytes": self._kv_bytes_full}
