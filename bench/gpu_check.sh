#!/usr/bin/env bash
# GPU check of weightlens + wadi_train at SD1.5 size on one CUDA GPU, in under 5 minutes
# (see bench/gpu_check.py for the stages and targets). Nothing downloads.
#
#   bash bench/gpu_check.sh [--data DIR] [--steps 20] [--json out.json]   # CUDA
#   bash bench/gpu_check.sh --device cpu --tiny                           # every stage, toy size
#
# Exit code: 0 all correctness checks passed, 1 one failed, 2 no CUDA (fails at once),
# 124 the whole check ran past GPU_CHECK_TIMEOUT seconds (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "$PY" bench/gpu_check.py "$@"
