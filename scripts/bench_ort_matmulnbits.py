"""ONNX Runtime's MatMulNBits on CPU: the cost of one product per weight layout.

Why edge_rt/export/onnx_quant.py writes every grid as 4-bit codes with the default zero point 8
(`fast_form`): this times one [1, K] x [K, N] product (SmolLM2's w13 input width and rows by
default) for 4-bit codes with no zero points, with uint8 zero points, with float zero points, and
8-bit codes, at accuracy_level 0 (fp32 activations) and 4 (int8). Random codes and scales: only the
kernel path is measured. Medians of --reps rounds of --calls calls, 2 intra-op threads.

Run (JSON on stdout):
    .venv/bin/python scripts/bench_ort_matmulnbits.py --out bench_results/ort_matmulnbits.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _bench_common import emit, invoked_command, machine_info, summarize

BLOCK = 32


def session(K: int, N: int, bits: int, zero_points: str, accuracy: int, threads: int, rng):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    q = rng.integers(0, 2**bits, (N, K // BLOCK, BLOCK)).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else q
    inits = [numpy_helper.from_array(packed, "B"),
             numpy_helper.from_array((rng.random(N * K // BLOCK) * 0.01).astype(np.float32), "S")]
    if zero_points == "float":
        inits.append(numpy_helper.from_array((rng.random(N * K // BLOCK) * (2**bits - 1)).astype(np.float32), "Z"))
    elif zero_points == "uint8":  # 4-bit zero points, two a byte, each row padded to whole bytes
        z = rng.integers(0, 16, (N, K // BLOCK)).astype(np.uint8)
        z = np.pad(z, ((0, 0), (0, z.shape[1] % 2)))
        inits.append(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1), "Z"))
    node = helper.make_node("MatMulNBits", ["X", "B", "S"] + (["Z"] if len(inits) == 3 else []), ["Y"],
                            domain="com.microsoft", K=K, N=N, bits=bits, block_size=BLOCK, accuracy_level=accuracy)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "T", K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "T", N])], inits)
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    layouts = {"4-bit, zero point 8 (no zero points)": (4, "none", 0),
               "4-bit, uint8 zero points": (4, "uint8", 0),
               "4-bit, float zero points": (4, "float", 0),
               "8-bit, zero point 128 (no zero points)": (8, "none", 0),
               "4-bit, float zero points, accuracy_level 4": (4, "float", 4),
               "4-bit, zero point 8, accuracy_level 4": (4, "none", 4)}
    sessions = {name: session(a.k, a.n, *cfg, a.threads, rng) for name, cfg in layouts.items()}
    x = rng.random((1, 1, a.k)).astype(np.float32)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(a.reps):
        for name, s in sessions.items():
            for _ in range(5):
                s.run(None, {"X": x})
            t0 = time.perf_counter()
            for _ in range(a.calls):
                s.run(None, {"X": x})
            samples[name].append((time.perf_counter() - t0) / a.calls * 1e6)
    emit({"benchmark": "ort_matmulnbits", "command": invoked_command(), "machine": machine_info(),
          "k": a.k, "n": a.n, "threads": a.threads, "us_per_call": {n: summarize(v) for n, v in samples.items()}}, a.out)


if __name__ == "__main__":
    main()
