#!/usr/bin/env bash
# Training throughput of herbens' step vs a bare timm loop (swinv2_b, convnext_b, effnetv2_s) on
# one GPU, in under 5 minutes. Prints images/s and the ratio; with $OUT set, also writes
# $OUT/gpu_train.json and $OUT/gpu_train.txt. Extra arguments go to bench/gpu_train.py, e.g.
#   bench/gpu_train.sh --recipes convnext_b --batch-size 48
#   bench/gpu_train.sh --device cpu --tiny        # smoke test without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  py="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  py=.venv/bin/python
else
  py=python3
fi
# A hard stop a little past the script's own 270 s budget: the summary matters more than the last model.
exec timeout 295 "$py" bench/gpu_train.py "$@"
