#!/bin/bash
# Main FMNIST study after the pilot: 3 seeds, bracketed grids (auto-extended until the best lr is interior),
# then the remaining pilot rules (seed 0), then the quadratic study. Resumable: finished runs are skipped.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py"
# finish the pilot's block ablation at seed 0
$L --seeds 0 --grid auto --methods bcd-scalar --lrs 0.03 0.1 0.3
# 3 seeds
$L --seeds 0 1 2 --grid auto --methods bcd --lrs 0.15 0.3 0.6
$L --seeds 0 1 2 --grid auto --methods decomfl --lrs 2e-3 3e-3 5e-3
$L --seeds 0 1 2 --grid auto --methods stein-scalar-hinit --lrs 1.5e-5 3e-5 5e-5
$L --seeds 0 1 2 --grid auto --methods bcd-scalar --lrs ${BCDS_LRS:-0.1 0.3 0.6}
$L --seeds 0 1 2 --grid auto --methods gsq --difference forward --lrs 3e-3 5e-3 1e-2
# remaining pilot rules, seed 0
$L --seeds 0 --grid auto --methods scalar --difference forward --lrs 3e-3 1e-2 2e-2
$L --seeds 0 --grid auto --methods decomfl --difference forward --lrs 2e-3 3e-3 5e-3
$L --seeds 0 --grid auto --methods bcd-adapt --lrs 0.15 0.3 0.6
$L --seeds 0 --grid auto --methods stein-scalar --lrs 1.5e-5 3e-5 6e-5
$L --seeds 0 --methods stein-tensor --lrs 1e-5 3e-5 --diag
$L --seeds 0 --methods stein --lrs 3e-3
$L --seeds 0 --grid auto --methods bcd-adapt-scalar --lrs 0.15 0.3 0.6
$L --seeds 1 2 --grid auto --methods scalar --difference forward --lrs 3e-3 1e-2 2e-2
D=1000 benchmarks/curvature/run_quadratic.sh
