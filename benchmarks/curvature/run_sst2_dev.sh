#!/bin/bash
# SST-2 / SmolLM2-135M follow-up on the full 872-sentence dev set, evaluation every 10 rounds (PREREGISTRATION.md,
# third section), in priority order. Resumable: every finished (arm, lr, seed) run is a file under
# benchmarks/results/claim-sst2-dev/runs/ and is skipped on a rerun.
cd "$(dirname "$0")/../.."
source benchmarks/curvature/sst2_dev_settings.sh  # PY, DATA, H (the shared fl_claim call)
for seed in 0 1 2; do  # each arm's best lr in the preregistered study (both interior there), seed by seed
  $H --pilot --seeds $seed --arms decomfl hiso-absdelta --lr-grid decomfl=1e-4 hiso-absdelta=1e-9
done
for seed in 0 1 2; do  # the upper neighbours (absdelta's 3e-9 reached 0.65 at round 20 on seed 1 there)
  $H --pilot --seeds $seed --arms decomfl hiso-absdelta --lr-grid decomfl=3e-4 hiso-absdelta=3e-9
done
for seed in 0 1 2; do  # the lower neighbours
  $H --pilot --seeds $seed --arms decomfl hiso-absdelta --lr-grid decomfl=3e-5 hiso-absdelta=3e-10
done
$H --report --seeds 0 1 2
