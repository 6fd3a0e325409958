#!/bin/bash
# The library's own federated simulation (benchmarks/fl_claim.py, hiso.fl) on Fashion-MNIST at the lab's settings
# (SmallCNN, 10 clients, 3 per round, K = 1, P = 5, 300 rounds, mean aggregation, target 0.50): DeComFL, absdelta
# (curvature first since 2026-12-02) and absdelta-lagged (the earlier order), 3 seeds, grids centred on the lab's best
# lrs and extended until interior. The lab (fmnist_lab.py) draws clients and round seeds its own way, so its curves are
# other samples of the same experiment, not the same bits (docs/curvature.md section 2). Second call: the authors'
# rule (gsq), its one-scalar ablation and DeComFL forward at both difference schemes (PREREGISTRATION.md, seventh
# section). Resumable: one file per run; about 50 s a run on 2 cores.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
nice -n 19 $PY benchmarks/fl_claim.py --out benchmarks/results/claim-fmnist --task fashion_mnist --target 0.5 \
  --arms hiso-absdelta decomfl hiso-absdelta-lagged --seeds 0 1 2 --aggregation mean \
  --lr-grid hiso-absdelta=5e-5,1e-4,2e-4 decomfl=3e-3,5e-3,7e-3 hiso-absdelta-lagged=5e-5,1e-4,2e-4
nice -n 19 $PY benchmarks/fl_claim.py --out benchmarks/results/claim-fmnist --task fashion_mnist --target 0.5 \
  --arms hiso-gsq hiso-scalar decomfl --differences central forward --seeds 0 1 2 --aggregation mean \
  --lr-grid hiso-gsq=3e-3,5e-3,1e-2 hiso-scalar=3e-3,5e-3,1e-2 decomfl=3e-3,5e-3,7e-3
$PY benchmarks/fl_claim.py --out benchmarks/results/claim-fmnist --report
