#!/bin/bash
# SST-2 / SmolLM2-135M: DeComFL's step along Sparse-MeZO directions (PREREGISTRATION.md, fifth section), in the
# follow-up's study folder (same settings.json), in priority order. Resumable: finished runs are skipped.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
DATA=${HISO_DATA_DIR:-../shared/data}
export PYTHONPATH=$PWD
H="nice -n 19 $PY benchmarks/fl_claim.py --out benchmarks/results/claim-sst2-dev --task sst2 --model smollm2-135m
   --data-dir $DATA --target 0.65 --rounds 100 --eval-every 10 --n-clients 4 --clients-per-round 1
   --num-directions 1 --batch-size 8 --num-train 400 --num-eval 872 --aggregation mean --pilot --no-extend"
BEST=${SPARSE_BEST:-}  # seed 0's best lr, set once seed 0's grid is read (the preregistered order)
$H --seeds 0 --arms sparse-decomfl --lr-grid sparse-decomfl=1e-4,2e-4,4e-4
if [ -n "$BEST" ]; then
  for seed in 1 2; do
    $H --seeds $seed --arms sparse-decomfl --lr-grid sparse-decomfl=$BEST
  done
fi
