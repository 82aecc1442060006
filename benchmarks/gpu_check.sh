#!/usr/bin/env bash
# The device check for a lent GPU (see docs/benchmarks.md): install this checkout into the machine's
# own Python (its torch/triton/transformers stay as they are), add Liger-Kernel when a wheel of it
# sits in $LIGER_WHEELS (default: shared/wheels), then run benchmarks/gpu_check.py: the CUDA suite
# and a quick benchmark, results in $OUT (or benchmarks/results/gpu-check-<date>/).
# Usage: bash benchmarks/gpu_check.sh [--smoke]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
t0=$(date +%s)
if [[ "${1:-}" != "--smoke" ]]; then
  $PY -m pip install --quiet --no-deps --no-build-isolation -e . || { echo "gpu_check: pip install -e . failed"; exit 2; }
  wheels=${LIGER_WHEELS:-shared/wheels}
  lk=$(ls "$wheels"/liger_kernel-*.whl 2>/dev/null | head -1)
  if [[ -n "$lk" ]]; then
    $PY -m pip install --quiet --no-deps "$lk" && echo "gpu_check: Liger-Kernel from $lk" \
      || echo "gpu_check: installing $lk failed; the liger_kernel variants are skipped"
  else
    echo "gpu_check: no liger_kernel-*.whl in $wheels; the liger_kernel variants are skipped"
  fi
  echo "gpu_check: install took $(( $(date +%s) - t0 )) s"
fi
exec $PY benchmarks/gpu_check.py "$@"
