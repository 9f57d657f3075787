#!/usr/bin/env bash
# Install Shipyard into a project virtualenv (.venv) on a fresh machine.
# torch is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU-only wheel where PyPI's default is CUDA
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
echo "[install] done: $("$VENV/bin/python" -c 'import torch, ray, mlflow; print(f"torch {torch.__version__}, ray {ray.__version__}, mlflow {mlflow.__version__}")')"
