#!/bin/bash
# The schedule control for absdelta (issue 15: the ablation that would explain it away): DeComFL with absdelta's
# measured step-size schedule lr / h_t transplanted as a fixed schedule (fmnist_lab.py: absdelta_schedule), 3 seeds,
# grid extended until its best final lr is interior. Resumable (finished runs are skipped).
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
$PY benchmarks/curvature/fmnist_lab.py --seeds 0 1 2 --grid auto --methods decomfl-sched --difference central \
  --lrs 1.5e-3 3e-3 5e-3
$PY benchmarks/curvature/fmnist_lab.py --summary
