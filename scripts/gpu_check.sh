#!/usr/bin/env bash
# The GPU check: edge-rt's CUDA tests (tests/test_cuda.py, the CUDA test of tests/test_endor.py)
# and the device tests (tests/test_devices.py) on a lent GPU machine, from the repo root.
#
# That machine has Python 3.12, torch (CUDA), numpy, pytest, hypothesis, tokenizers, jinja2,
# typer, psutil and safetensors, but no gguf and no network: the wheels of gguf and its one
# import-time dependency missing there (PyYAML) travel in .whl/ (not committed; see below).
# edge-rt itself is imported from the repo root (PYTHONPATH), not installed.
#
#   prepare (on a machine with network, from the repo root, gguf version as in the venv):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gguf==0.19.0 PyYAML==6.0.4
#   run:  bash scripts/gpu_check.sh        (the device tool: carry [".whl"])
#
# Env: OUT (log, junit.xml, cuda_report.json; default a temp dir), EDGE_RT_TEST_DEVICE (default cuda),
# GPU_CHECK_TIMEOUT (seconds for pytest, default 420), GPU_CHECK_PYTEST_ARGS (default -x),
# GPU_CHECK_SITE (where the wheels go, default /tmp/site).
# Exit status: pytest's (124 when the timeout stopped it; 3 when the wheels did not install).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
LOG="$OUT/log"
export PYTHONUNBUFFERED=1
export EDGE_RT_TEST_DEVICE="${EDGE_RT_TEST_DEVICE:-cuda}"
export EDGE_RT_TEST_REPORT="$OUT/cuda_report.json"
export EDGE_RT_HOME="$(mktemp -d)"  # nothing written under ~/.cache
SITE="${GPU_CHECK_SITE:-/tmp/site}"

{
  echo "== install .whl/ into $SITE"
  ls .whl/*.whl || { echo "no wheels in .whl/ (carry it)"; exit 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl || exit 3
} 2>&1 | tee "$LOG"
[ "${PIPESTATUS[0]}" -eq 0 ] || exit 3
export PYTHONPATH="$SITE:$PWD"

{
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi not found"; fi
  echo "== python, torch, imports"
  python3 - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda build", torch.version.cuda)
print("cuda available", torch.cuda.is_available(), "devices", torch.cuda.device_count())
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i}", torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
import edge_rt, gguf, yaml
print("edge_rt", edge_rt.__version__, edge_rt.__file__)
print("gguf", gguf.__file__, "yaml", yaml.__version__)
try:
    import pydoc_data.topics  # test_endor's calibration text
    print("pydoc_data: present")
except ImportError:
    print("pydoc_data: MISSING (tests/test_endor.py's CUDA test needs it; tests/test_cuda.py does not)")
from devices import resolve_device
print("device", resolve_device("auto").describe())
PY
} 2>&1 | tee -a "$LOG"

# every test of test_cuda.py and test_devices.py (their module names match), test_endor.py's CUDA test
cmd=(python3 -m pytest -q -rsxX ${GPU_CHECK_PYTEST_ARGS--x} -p no:cacheprovider --durations=15
     --junitxml="$OUT/junit.xml" tests/test_cuda.py tests/test_endor.py tests/test_devices.py -k "cuda or test_devices")
echo "== EDGE_RT_TEST_DEVICE=$EDGE_RT_TEST_DEVICE ${cmd[*]}" | tee -a "$LOG"
# SIGINT first: pytest stops, prints its summary and still writes the report
timeout -s INT -k 30 "${GPU_CHECK_TIMEOUT:-420}" "${cmd[@]}" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
{
  echo "== cuda report ($EDGE_RT_TEST_REPORT)"
  cat "$EDGE_RT_TEST_REPORT" 2>/dev/null || echo "(none written)"
  echo
  echo "== pytest exit status $status"
} 2>&1 | tee -a "$LOG"
exit "$status"
