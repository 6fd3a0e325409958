#!/bin/bash
# Part 4 (issue 15 follow-up): the forward/central confound. absdelta needs central differences (it sends Delta_p),
# the authors' gsq and the scalar ablation ran forward, DeComFL central: the missing cells, 3 seeds, auto grids.
# Resumable (finished runs are skipped).
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py"
$L --seeds 0 1 2 --grid auto --methods scalar --difference central --lrs 3e-3 5e-3 1e-2
$L --seeds 0 1 2 --grid auto --methods decomfl --difference forward --lrs 3e-3 5e-3 7e-3
$L --seeds 0 1 2 --grid auto --methods gsq --difference central --lrs 3e-3 5e-3 1e-2
$L --summary
