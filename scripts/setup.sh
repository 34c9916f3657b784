#!/usr/bin/env bash
# Create .venv with PyTorch and certkd (editable) if not there yet. Idempotent.
#
# PyTorch comes first, so that installing certkd never resolves torch itself (pyproject's torch>=2.1 is
# then satisfied and left alone). Its version is [tool.certkd] torch-version in pyproject.toml, the one
# place it is written (CERTKD_TORCH_VERSION overrides it). Which build:
#   - an NVIDIA GPU (nvidia-smi lists one): the default build from the package index (CUDA on Linux);
#   - otherwise a CPU build: torch==V+cpu where the index or a local wheel folder has it, else torch==V
#     from the CPU-only index https://download.pytorch.org/whl/cpu. Never the default Linux wheel, which
#     brings several GB of CUDA libraries a CPU machine cannot use.
# CERTKD_TORCH_BUILD=cpu or =default forces one of the two (default on a CPU machine: several GB, but it runs).
# pip's errors are shown. `bash scripts/setup.sh --dry-run` prints the torch commands it would run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu

torch_version() {
  if [ -n "${CERTKD_TORCH_VERSION:-}" ]; then echo "$CERTKD_TORCH_VERSION"; return; fi
  local v
  v=$(sed -n 's/^torch-version *= *"\([^"]*\)".*/\1/p' pyproject.toml)
  if [ -z "$v" ]; then echo "setup.sh: no torch-version in pyproject.toml's [tool.certkd]" >&2; exit 1; fi
  echo "$v"
}

has_nvidia_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q "^GPU"
}

V=$(torch_version)
BUILD=${CERTKD_TORCH_BUILD:-auto}
case "$BUILD" in
  auto) if has_nvidia_gpu; then BUILD=default; WHY="NVIDIA GPU found"; else BUILD=cpu; WHY="no NVIDIA GPU"; fi ;;
  cpu|default) WHY="CERTKD_TORCH_BUILD=$BUILD" ;;
  *) echo "setup.sh: CERTKD_TORCH_BUILD must be auto, cpu or default, not '$BUILD'" >&2; exit 2 ;;
esac
if [ "$BUILD" = default ]; then
  TORCH_CMDS=("pip install torch==$V")
else
  TORCH_CMDS=("pip install torch==$V+cpu" "pip install torch==$V --index-url $CPU_INDEX")
fi

if [ "${1:-}" = "--dry-run" ]; then
  echo "# $WHY: $BUILD build"
  printf '%s\n' "${TORCH_CMDS[@]}"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  installed=0
  for cmd in "${TORCH_CMDS[@]}"; do
    echo "setup.sh: $cmd" >&2
    # shellcheck disable=SC2086  # the command is a list of words
    if "$VPY" -m $cmd; then installed=1; break; fi
    echo "setup.sh: that failed; trying the next way" >&2
  done
  if [ "$installed" != 1 ]; then
    echo "setup.sh: could not install torch $V, $BUILD build (pip's errors are above)." >&2
    if [ "$BUILD" = cpu ]; then
      echo "setup.sh: no CPU build was reachable: point pip at one (PIP_FIND_LINKS=/folder/of/wheels or" \
           "PIP_INDEX_URL=...), or accept the default build, CUDA libraries included (several GB): " \
           "CERTKD_TORCH_BUILD=default bash $0" >&2
    fi
    exit 1
  fi
fi
if ! "$VPY" -c "import certkd, pytest, xdist, sklearn, safetensors, highspy, onnx, matplotlib, tensorboard, optuna" >/dev/null 2>&1; then
  "$VPY" -m pip install -q -e ".[test,report,verify,tensorboard,tune]"
  "$VPY" -c "import certkd"
  "$VPY" -c "import torch; print(f'setup.sh: torch {torch.__version__} (CUDA: {torch.version.cuda or \"none, a CPU build\"})')" >&2
fi
