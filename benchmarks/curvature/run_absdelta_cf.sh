#!/bin/bash
# absdelta with the curvature first (issue 15, docs/curvature.md section 8): h updated from the round's own
# |Delta_p| before the step (absdelta-cf: every round; absdelta-cf0: round 0 only), against the lagged order
# (the h of the rounds before; h = 1 in round 0), on Fashion-MNIST at 3 seeds with absdelta's grid, extended until
# interior. Resumable.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 1 2 --grid auto --methods absdelta-cf absdelta-cf0 --lrs 5e-5 1e-4 2e-4
$PY benchmarks/curvature/fmnist_lab.py --summary
