#!/bin/bash
# Second part of the main study (after run_main.sh's 3-seed block): the gsq ablation at 3 seeds, the quadratic
# study on the block spectrum, the remaining pilot rules (seed 0), then the other spectra. Resumable.
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py"
$L --seeds 0 1 2 --grid auto --methods absdelta --lrs 3e-5 5e-5 1e-4
$L --seeds 0 1 2 --grid auto --methods scalar --difference forward --lrs 3e-3 1e-2 2e-2
Q="nice -n 19 $PY benchmarks/curvature/quadratic.py --d 1000"
$Q --spectra blocks --methods zosgd bcd bcd-scalar oracle-block oracle-diag scalar
$Q --spectra blocks --methods gsq stein-scalar stein-block stein oracle-bcd bcd-adapt bcd-adapt-scalar
$L --seeds 0 --grid auto --methods decomfl --difference forward --lrs 2e-3 3e-3 5e-3
$L --seeds 0 --grid auto --methods bcd-adapt --lrs 0.15 0.3 0.6
$L --seeds 0 --grid auto --methods stein-scalar --lrs 1.5e-5 3e-5 6e-5
$L --seeds 0 --methods stein-tensor --lrs 1e-5 3e-5 --diag
$L --seeds 0 --methods stein --lrs 3e-3
$L --seeds 0 --grid auto --methods bcd-adapt-scalar --lrs 0.15 0.3 0.6
$Q --spectra lowrank loguniform --methods zosgd gsq scalar stein oracle-diag oracle-block bcd stein-scalar stein-block
$Q --spectra blocks --methods stein-scalar-hinit stein-block-hinit scalar-hinit gsq-hinit
