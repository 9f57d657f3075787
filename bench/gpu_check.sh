#!/usr/bin/env bash
# The performance model on one CUDA GPU, torch alone: no Ray, MLflow or network needed (a bare GPU machine).
#   bash bench/gpu_check.sh            # writes gpu_check.txt / gpu_check.json to $OUT (or .shipyard/gpu_check)
# 9 cases of 60 small steps, sized to finish well inside 8 minutes on one H100 (not yet run on a GPU: no
# GPU machine was lent when it was written); see bench/gpu_check.py for what it measures.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
timeout 450 "$PY" bench/gpu_check.py "$@"
