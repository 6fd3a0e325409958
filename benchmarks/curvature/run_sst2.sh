#!/bin/bash
# SST-2 / SmolLM2-135M claim study at reduced CPU scale (PREREGISTRATION.md), in priority order. Resumable: every
# finished (arm, lr, seed) run is a file under benchmarks/results/claim-sst2/runs/ and is skipped on a rerun.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
DATA=${HISO_DATA_DIR:-../shared/data}
export PYTHONPATH=$PWD
H="nice -n 19 $PY benchmarks/fl_claim.py --out benchmarks/results/claim-sst2 --task sst2 --model smollm2-135m
   --data-dir $DATA --target 0.65 --rounds 100 --eval-every 20 --n-clients 4 --clients-per-round 1
   --num-directions 1 --batch-size 8 --num-train 400 --num-eval 200 --aggregation mean --no-extend"
# "absdelta" is curvature first since 2026-12-02 (docs/curvature.md section 8); the runs made before with the lagged
# order are the arm hiso-absdelta-lagged (its centre lr at three seeds and seed 0's neighbours)
for seed in 0 1 2; do  # the centre lrs, seed by seed, both arms
  $H --pilot --seeds $seed --arms decomfl hiso-absdelta --lr-grid decomfl=3e-5 hiso-absdelta=1e-9
done
for seed in 0 1 2; do  # DeComFL's neighbours
  $H --pilot --seeds $seed --arms decomfl --lr-grid decomfl=1e-5,1e-4
done
for seed in 0 1 2; do  # DeComFL's best was at the upper neighbour 1e-4 on seeds 0 and 1: bracket it
  $H --pilot --seeds $seed --arms decomfl --lr-grid decomfl=3e-4
done
for seed in 0 1 2; do
  $H --pilot --seeds $seed --arms hiso-absdelta --lr-grid hiso-absdelta=3e-10,3e-9
done
$H --report --seeds 0 1 2
