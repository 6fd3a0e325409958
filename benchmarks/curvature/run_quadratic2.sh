#!/bin/bash
# The quadratic study's claim cells (issue 15): 3 seeds, bracketed grids, the diagonal oracle, on the issue's two
# spectra. On a positive definite quadratic |Delta| = Delta, so absdelta is stein-scalar-hinit there. Resumable.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
Q="nice -n 10 $PY benchmarks/curvature/quadratic.py --d 1000"
$Q --spectra lowrank loguniform --methods zosgd oracle-diag gsq scalar stein-scalar-hinit stein
$Q --summary --spectra lowrank loguniform blocks
