"""ONNX Runtime backend: runs a bundle's .onnx with the KV cache as graph inputs and outputs.

The host holds one [1, Hkv, max_seq, hd] fp32 array per layer for k and v; each call feeds them
with the tokens and positions and keeps the updated arrays the graph returns. IO binding keeps
the caches as ORT values between calls (no numpy round trip). See backends/_bundle_common.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from backends._bundle_common import StaticCacheBackend


class OnnxRuntimeBackend(StaticCacheBackend):
    name = "onnxruntime"

    def __init__(self, onnx_path: Path, manifest: dict, threads: int | None = None):
        super().__init__(manifest)
        import onnxruntime as ort  # lazy: optional dependency

        self.path = Path(onnx_path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self._ort = ort
        self._session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        io = manifest["io"]
        self._cache_in = [x["name"] for x in io["inputs"][2:]]
        self._cache_out = [x["name"] for x in io["outputs"][1:]]
        self._caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros(x["shape"], dtype=np.float32))
                        for x in io["inputs"][2:]]

    def _run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b = self._session.io_binding()
        b.bind_cpu_input("tokens", tokens)
        b.bind_cpu_input("input_pos", positions)
        for name, value in zip(self._cache_in, self._caches):
            b.bind_ortvalue_input(name, value)
        b.bind_output("logits")
        for name in self._cache_out:
            b.bind_output(name)
        self._session.run_with_iobinding(b)
        outs = b.get_outputs()
        self._caches = list(outs[1:])
        return outs[0].numpy()[0]  # [T, V]
