# Sourced by run_sst2_dev.sh and run_sst2_sparse.sh: the SST-2 follow-up's fl_claim call (PREREGISTRATION.md, third
# and fifth sections), run from the repository root. Every run of benchmarks/results/claim-sst2-dev shares these.
PY=${PY:-.venv/bin/python}  # relative to the repository root
DATA=${HISO_DATA_DIR:-../shared/data}
export PYTHONPATH=$PWD
H="nice -n 19 $PY benchmarks/fl_claim.py --out benchmarks/results/claim-sst2-dev --task sst2 --model smollm2-135m
   --data-dir $DATA --target 0.65 --rounds 100 --eval-every 10 --n-clients 4 --clients-per-round 1
   --num-directions 1 --batch-size 8 --num-train 400 --num-eval 872 --aggregation mean --no-extend"
