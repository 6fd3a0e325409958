#!/bin/bash
# The quadratic study's claim cells (issue 15): 3 seeds, bracketed grids, the diagonal oracle, on the issue's two
# spectra. On a positive definite quadratic |Delta| = Delta, so absdelta is stein-scalar-hinit there. Resumable.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
Q="nice -n 10 $PY benchmarks/curvature/quadratic.py --d 1000"
$Q --spectra lowrank loguniform --methods zosgd oracle-diag gsq scalar stein-scalar-hinit stein
# absdelta as the library runs it (step, then h: h = 1 in the first step) and with the curvature first
$Q --spectra lowrank loguniform blocks --methods absdelta absdelta-cf
$Q --summary --spectra lowrank loguniform blocks
