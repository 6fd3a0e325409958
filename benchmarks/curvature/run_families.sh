#!/bin/bash
# Reduced-dimension direction families on Fashion-MNIST (issue 15): Sparse-MeZO masks and LOZO low-rank directions
# with DeComFL's update (the comparison with DeComFL is the family's ablation), 3 seeds, grids extended until the
# best lr is interior. Resumable (one JSON per run). Usage: run_families.sh sparse|lozo|absdelta-sparse|absdelta-lozo
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}  # relative to the repository root (the script cds there)
export PYTHONPATH=$PWD
L="nice -n 19 $PY benchmarks/curvature/fmnist_lab.py --seeds 0 1 2 --grid auto"
case "$1" in
  sparse) $L --methods sparse --lrs 1e-2 2e-2 4e-2 ;;  # 25% of each matrix perturbed: lr ~4x DeComFL's 5e-3
  lozo) $L --methods lozo --lrs 5e-3 1e-2 2e-2 ;;
  absdelta-sparse) $L --methods absdelta-sparse --lrs 5e-5 1e-4 2e-4 ;;  # h falls with the mask: same lr scale
  absdelta-lozo) $L --methods absdelta-lozo --lrs 5e-5 1e-4 2e-4 ;;
  *) echo "usage: $0 sparse|lozo|absdelta-sparse|absdelta-lozo" >&2; exit 2 ;;
esac
