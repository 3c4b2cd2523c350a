#!/usr/bin/env bash
# Installs gkd and what its tests need into the active Python environment.
# Without a GPU, the CPU build of torch goes in first: a bare `torch` requirement would otherwise pull
# a CUDA build of several GB. With a GPU (nvidia-smi answers), pip's default CUDA build is right.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet torch
  else
    "$PYTHON" -m pip install --quiet "torch==${GKD_CPU_TORCH_VERSION:-2.13.0}"
  fi
fi
"$PYTHON" -m pip install --quiet -e ".[dev]"
