#!/usr/bin/env bash
# Set up edge-rt in ./.venv (created or reused) and fetch the default model.
#   ./setup.sh          runtime: torch (CPU build), edge-rt, the default model
#   ./setup.sh --dev    also the test tools, the llama-cpp-python extra (compiles ~10 min
#                       the first time on 2 cores; pip caches the wheel afterwards) and the
#                       export extra (executorch, torchao, onnx, onnxruntime)
set -euo pipefail
cd "$(dirname "$0")"
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
PIP="$VPY -m pip install --disable-pip-version-check -q"
# torch first, pinned: a bare requirement could pull a multi-GB CUDA build
if ! $VPY -c "import torch" 2>/dev/null; then
    echo "setup: installing ${EDGE_RT_TORCH_SPEC:-torch==2.13.0}" >&2
    $PIP "${EDGE_RT_TORCH_SPEC:-torch==2.13.0}"
fi
if [ "$DEV" = 1 ]; then
    echo "setup: installing edge-rt with test tools, llama-cpp-python (first build is slow) and export tools" >&2
    $PIP -e ".[test,llamacpp,export]"
else
    echo "setup: installing edge-rt" >&2
    $PIP -e .
fi
.venv/bin/edge-rt pull
echo "setup: done (.venv/bin/edge-rt)" >&2
