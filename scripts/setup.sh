#!/usr/bin/env bash
# Create .venv with a CPU torch and certkd (editable) if not there yet. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  # Install torch first, and a CPU build: a bare 'pip install torch' would pull several GB of CUDA.
  "$VPY" -m pip install -q "torch==${CERTKD_TORCH_VERSION:-2.13.0}" 2>/dev/null \
    || "$VPY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if ! "$VPY" -c "import certkd, pytest, sklearn, safetensors, highspy, onnx, matplotlib" >/dev/null 2>&1; then
  "$VPY" -m pip install -q -e ".[test,report,verify]" 2>&1 | grep -v "is ignored" || true
  "$VPY" -c "import certkd" 
fi
