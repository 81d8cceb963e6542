"""ExecuTorch backend: runs a bundle's .pte (XNNPACK delegate) through executorch.runtime.

The program keeps its KV cache as mutable buffers (static, max_seq positions); each call passes
the tokens and their positions. See backends/_bundle_common.py for the position bookkeeping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from backends._bundle_common import StaticCacheBackend


class ExecuTorchBackend(StaticCacheBackend):
    name = "executorch"
    # Measured: a T-token forward's rows equal T one-token forwards bit for bit (XNNPACK, fp32 and
    # 8da4w SmolLM2 bundles, 40 tokens; the tiny fixtures in tests/test_export.py), so speculative
    # decoding on a .pte is lossless.
    exact_verify = True

    def __init__(self, pte_path: Path, manifest: dict):
        super().__init__(manifest)
        from executorch.runtime import Runtime  # lazy: optional dependency

        self.path = Path(pte_path)
        self._program = Runtime.get().load_program(self.path)
        self._method = self._program.load_method("forward")

    def _run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        out = self._method.execute([torch.from_numpy(tokens), torch.from_numpy(positions)])
        return out[0][0].numpy()  # [T, V]
