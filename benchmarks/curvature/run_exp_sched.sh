#!/bin/bash
# The parametric schedule control for absdelta (issue 15): DeComFL with an exponential lr decay by R over the run
# (fmnist_lab.py: decomfl-exp<R>; lr = the final lr), R in {0.3, 0.1, 0.03}, 3 seeds, each R's grid extended until
# its best lr is interior. The best (R, lr) is the tuned fixed schedule absdelta has to beat. Resumable.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 1 2 --grid auto --difference central"
$L --methods decomfl-exp0.3 --lrs 1.5e-3 3e-3 5e-3
$L --methods decomfl-exp0.1 --lrs 7.5e-4 1.5e-3 3e-3
$L --methods decomfl-exp0.03 --lrs 3.75e-4 7.5e-4 1.5e-3
$PY benchmarks/curvature/fmnist_lab.py --summary
