#!/bin/bash
# The quadratic study in priority order (resumable: finished (spectrum, method, seed, lr) files are skipped).
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
Q="nice -n 19 $PY benchmarks/curvature/quadratic.py --d ${D:-1000}"
$Q --spectra blocks --methods zosgd gsq scalar oracle-diag oracle-block oracle-bcd bcd bcd-scalar bcd-adapt bcd-adapt-scalar stein-scalar stein-scalar-hinit stein-block stein-block-hinit stein scalar-hinit gsq-hinit
$Q --spectra lowrank loguniform --methods zosgd gsq scalar stein oracle-diag oracle-block stein-scalar bcd bcd-scalar stein-block
