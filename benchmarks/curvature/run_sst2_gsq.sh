#!/bin/bash
# SST-2 / SmolLM2-135M: the authors' rule (gsq) on the follow-up's setting (PREREGISTRATION.md, sixth section), in
# the follow-up's study folder (same settings.json), in priority order. Resumable: finished runs are skipped.
cd "$(dirname "$0")/../.."
source benchmarks/curvature/sst2_dev_settings.sh  # PY, DATA, H (the shared fl_claim call)
BEST=${GSQ_BEST:-3e-4}  # seed 0's best lr (read 2026-12-02: no lr reaches 0.65; 3e-4 has the best AUC, 1e-3 collapses)
$H --pilot --seeds 0 --arms hiso-gsq --lr-grid hiso-gsq=1e-4,3e-4,1e-3
if [ -n "$BEST" ]; then
  for seed in 1 2; do
    $H --pilot --seeds $seed --arms hiso-gsq --lr-grid hiso-gsq=$BEST
  done
fi
