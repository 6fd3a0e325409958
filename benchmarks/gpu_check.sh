#!/usr/bin/env bash
# GPU check for a lent CUDA machine (sized for one H100, under 8 minutes):
#   1. build the CUDA extension in place (sm_90 only: the fastest build that runs on an H100)
#   2. the GPU correctness tests: tests/test_gpu.py (cuda and triton equal the cpu backend bit for bit) and the spec
#      vectors
#   3. the end-to-end MeZO step profile on SmolLM2-135M (benchmarks/profile_step.py --device cuda)
#   4. the GPU benchmark (benchmarks/run_gpu.py) with the time that is left; it writes what it measured even when
#      the budget runs out (the cases it skipped are listed in its JSON)
# A failing step is logged and the script goes on: a failed test still leaves the benchmark to look at.
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh        # $OUT: where logs and tables go (default benchmarks/results/gpu)
#
# Files written under $OUT (8 at most, none in subfolders): build-and-tests.log, profile.log, bench.log,
# <date>-<gpu>-check.{md,csv,json,png}, <date>-profile-cuda.md.  Environment: PYTHON (default python3), CHECK_BUDGET_S
# (default 460: total seconds for the whole script), HISO_CUDA_ARCH_LIST (default 90).
set -uo pipefail   # no -e: every step runs, failures are collected in the summary

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)   # absolute, before the cd below
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${CHECK_BUDGET_S:-460}
export PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
declare -a SUMMARY=()
note() { SUMMARY+=("$1"); echo ">>> $1"; }

LOG="$OUT/build-and-tests.log"
{
  echo "== gpu_check $(date -Iseconds)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
} | tee "$LOG"

# ---- 1. build (editable install; the native modules land in hiso_kernels/)
echo "== build" | tee -a "$LOG"
if HISO_BUILD_CUDA=1 HISO_REQUIRE_NATIVE=1 HISO_CUDA_ARCH_LIST=${HISO_CUDA_ARCH_LIST:-90} \
   timeout 300 "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tee -a "$LOG"; then
  note "build: ok ($(elapsed) s)"
else
  # pip's editable machinery failed (offline metadata step, old pip...): build the modules in place instead
  echo "== pip failed; trying setup.py build_ext --inplace" | tee -a "$LOG"
  if HISO_BUILD_CUDA=1 HISO_REQUIRE_NATIVE=1 HISO_CUDA_ARCH_LIST=${HISO_CUDA_ARCH_LIST:-90} \
     timeout 300 "$PY" setup.py build_ext --inplace 2>&1 | tee -a "$LOG"; then
    note "build: ok via build_ext --inplace ($(elapsed) s)"
  else
    note "build: FAILED (see build-and-tests.log); continuing with whatever imports"
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m hiso_kernels.info 2>&1 | tee -a "$LOG"
BACKENDS=$("$PY" -c "import hiso_kernels as hk; print(','.join(hk.available_backends('cuda')))" 2>/dev/null)
note "backends for cuda tensors: ${BACKENDS:-none}"

# ---- 2. correctness on the GPU
echo "== tests" | tee -a "$LOG"
timeout 180 "$PY" -m pytest tests/test_gpu.py tests/test_spec_vectors.py -q -p no:cacheprovider 2>&1 | tee -a "$LOG"
rc=$?
note "tests (test_gpu.py, test_spec_vectors.py): $([ $rc -eq 0 ] && echo passed || echo "FAILED rc=$rc") ($(elapsed) s): $(grep -E '[0-9]+ (passed|failed)' "$LOG" | tail -1)"

# ---- 3. end-to-end step profile (fixed, short)
timeout 120 "$PY" benchmarks/profile_step.py --device cuda --steps 5 --out "$OUT" 2>&1 | tee "$OUT/profile.log"
rc=$?
note "profile_step: $([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc") ($(elapsed) s): $(grep -E 'outside the two forwards' "$OUT/profile.log" | tail -1)"

# ---- 4. benchmark with the rest of the budget (30 s kept for the last measurement to finish and the write-out)
LEFT=$(( BUDGET - $(elapsed) - 30 ))
if [ "$LEFT" -lt 60 ]; then LEFT=60; fi
echo "== benchmark, budget $LEFT s" | tee "$OUT/bench.log"
# SIGTERM at the hard limit: run_gpu.py catches it and still writes what it measured
timeout -k 20 $(( LEFT + 30 )) "$PY" benchmarks/run_gpu.py --plan check --out "$OUT" --budget-s "$LEFT" 2>&1 | tee -a "$OUT/bench.log"
rc=$?
note "run_gpu.py: $([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc") ($(elapsed) s)"

echo
echo "================ gpu_check summary ($(elapsed) s) ================"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
echo "  targets (from bench.log):"
sed -n '/rows in/,/^wrote/p' "$OUT/bench.log" | sed 's/^/    /'
echo "  files: $(cd "$OUT" && ls | tr '\n' ' ')"
