#!/bin/bash
# FMNIST pilot (seed 0, coarse grids, auto-extended until the best lr is interior), then the quadratic study.
# Resumable: finished runs are skipped.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 --grid auto"
$L --methods decomfl --lrs 2e-3 3e-3 5e-3
$L --methods gsq --difference forward --lrs 1e-3 3e-3 1e-2 --diag
$L --methods stein-scalar-hinit --lrs 3e-5 1e-4 3e-4
$L --methods bcd --lrs 0.03 0.1 0.3 --diag
$L --methods bcd-scalar --lrs 0.03 0.1 0.3
$L --methods scalar --lrs 1e-3 3e-3 1e-2
$L --methods gsq --lrs 1e-3 3e-3 1e-2 --diag
$L --methods decomfl --difference forward --lrs 2e-3 3e-3 5e-3
$L --methods bcd-adapt --lrs 0.03 0.1 0.3
$L --methods stein-scalar --lrs 3e-5 1e-4 3e-4
$L --methods scalar --difference forward --lrs 1e-3 3e-3 1e-2
$L --methods bcd-adapt-scalar --lrs 0.03 0.1 0.3
nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 --methods stein-tensor --lrs 1e-5 1e-4 --diag
nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 --methods stein --lrs 1e-3 3e-3
D=1000 benchmarks/curvature/run_quadratic.sh
