#!/usr/bin/env bash
# GPU throughput check of the dq pipeline: features, GradCAM++, MAE reconstruction, one training epoch.
# Prints images/s and peak GPU memory for each; about 5 minutes on one H100. Nothing is downloaded.
#   bash bench/gpu_check.sh [--quick] [--device auto|cpu|cuda] [--only features,cam,mae,train]
# --quick: tiny sizes and small models, for a smoke run on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
export HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
exec timeout 900 python -m bench.gpu_check "$@"
