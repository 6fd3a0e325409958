#!/bin/bash
# SST-2 / SmolLM2-135M: DeComFL's step along Sparse-MeZO directions (PREREGISTRATION.md, fifth section), in the
# follow-up's study folder (same settings.json), in priority order. Resumable: finished runs are skipped.
cd "$(dirname "$0")/../.."
source benchmarks/curvature/sst2_dev_settings.sh  # PY, DATA, H (the shared fl_claim call)
BEST=${SPARSE_BEST:-2e-4}  # seed 0's best lr (read 2026-12-02; the preregistered order: seeds 1, 2 there)
$H --pilot --seeds 0 --arms sparse-decomfl --lr-grid sparse-decomfl=1e-4,2e-4,4e-4
if [ -n "$BEST" ]; then
  for seed in 1 2; do
    $H --pilot --seeds $seed --arms sparse-decomfl --lr-grid sparse-decomfl=$BEST
  done
fi
