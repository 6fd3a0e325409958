#!/usr/bin/env bash
# GPU check for a lent CUDA machine: builds, proves bit-identity on the device, then measures, in under 8 minutes.
# Made for torch 2.11+cu130, triton 3.6.0, nvcc 13.0, pytest-xdist and no network: it installs nothing (it needs
# setuptools and pybind11 to build, as any build of the package does).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh      # $OUT: logs and tables (default benchmarks/results/gpu)
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh   # on a machine without a GPU: the steps that need none
#
# Steps, with the expected wall time on one H100 / H200 and 16 cores (each step has its own hard limit):
#   0. environment: GPU, driver, torch / triton / nvcc versions                                  ~5 s   (limit 30 s)
#   1. in parallel: build the CPU and CUDA extensions in place (CUDA for this GPU's arch only)  ~90 s  (limit 240 s)
#      and compile every Triton kernel variant for this GPU (python -m hiso_kernels.aot): the
#      PTX checks, registers and spills, and a warm Triton cache for what follows              ~40 s  (limit 240 s)
#   2. correctness on the device, pytest -n 8 with HISO_SYNC_LAUNCHES=1 (a faulting launch is
#      named where it happens): tests/test_gpu.py (cuda and triton against the cpu backend, bit
#      for bit: every op, dtype, distribution and rounding mode; spec vectors; big[1:]; 2^31 + 5
#      elements; many small tensors) and tests/test_spec_vectors.py                            ~60 s  (limit 150 s)
#   3. benchmark (benchmarks/run_gpu.py --plan check) with the time left, most important rows
#      first: flat perturb fp32 and bf16 (2^28) with the copy roofline and the generator-only
#      rate, SmolLM2-135M perturb against eager MeZO and one torch.compile of it, then the other
#      kernels; it writes what it measured when the budget runs out                             ~200 s (the rest)
#   4. a one-screen summary; exit status 1 if any step failed, else 0                                  total ~6 min
#
# Files under $OUT (7): gpu_check.log (all output), aot.json, tests.log, <date>-<gpu>-check.{md,csv,json,png}.
# Environment: PYTHON (default python3), CHECK_BUDGET_S (default 450: the whole script), HISO_CUDA_ARCH_LIST (default:
# this GPU's), TEST_WORKERS (default 8), GPU_CHECK_TESTS (default "tests/test_gpu.py tests/test_spec_vectors.py"),
# GPU_CHECK_INJECT_FAILURE=<env|build|aot|tests|bench> (make that step fail: tests the exit status).
set -uo pipefail   # no -e: every step runs and reports; failures are collected for the summary and the exit status

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)   # absolute, before the cd below
cd "$ROOT"
PY=${PYTHON:-python3}
BUDGET=${CHECK_BUDGET_S:-450}
DRY=${GPU_CHECK_DRY_RUN:-0}
WORKERS=${TEST_WORKERS:-8}
JOBS=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the in-place build, whatever else is installed
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
elapsed() { echo $(( $(date +%s) - START )); }
declare -a SUMMARY=()
FAILED=0
say() { echo "$@" | tee -a "$LOG"; }

# result NAME RC SECONDS DETAIL: record one step's outcome (an injected failure counts as a failure)
result() {
  local name=$1 rc=$2 secs=$3 detail=${4:-}
  if [ "${GPU_CHECK_INJECT_FAILURE:-}" = "$name" ]; then rc=99; detail="failure injected (GPU_CHECK_INJECT_FAILURE)"; fi
  if [ "$rc" -eq 0 ]; then
    SUMMARY+=("$(printf '%-10s ok      %4ss  %s' "$name" "$secs" "$detail")")
  else
    SUMMARY+=("$(printf '%-10s FAILED  %4ss  rc=%s %s' "$name" "$secs" "$rc" "$detail")")
    FAILED=1
  fi
  say ">>> $name: rc=$rc after ${secs}s $detail"
}

# ---- 0. environment
t=$(date +%s)
{
  echo "== gpu_check $(date -Iseconds) on $(hostname)  dry run: $DRY"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 || true
  timeout 30 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'devices', torch.cuda.device_count())" 2>&1
  nvcc --version 2>&1 | tail -1
} | tee -a "$LOG"
ARCH=$(timeout 30 "$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null)
if [ -z "$ARCH" ]; then
  if [ "$DRY" = "1" ]; then ARCH=90; else ARCH=""; fi
fi
result env $([ -n "$ARCH" ] && echo 0 || echo 1) $(( $(date +%s) - t )) "sm_${ARCH:-?}"

# ---- 1. build the extensions || pre-compile the Triton kernels
t=$(date +%s)
say "== build (CUDA for sm_${ARCH:-90}, $JOBS jobs) and Triton AOT compile, in parallel"
( HISO_BUILD_CUDA=1 HISO_REQUIRE_NATIVE=1 HISO_CUDA_ARCH_LIST=${HISO_CUDA_ARCH_LIST:-${ARCH:-90}} HISO_BUILD_JOBS=$JOBS \
    timeout 240 "$PY" setup.py build_ext --inplace > "$OUT/.build.log" 2>&1 ) &
BUILD_PID=$!
( env -u TRITON_INTERPRET timeout 240 "$PY" -m hiso_kernels.aot --arch "${ARCH:-90}" --jobs "$JOBS" \
    --json "$OUT/aot.json" > "$OUT/.aot.log" 2>&1 ) &
AOT_PID=$!
wait $AOT_PID; AOT_RC=$?          # the shorter of the two: its time is its own
T_AOT=$(( $(date +%s) - t ))
wait $BUILD_PID; BUILD_RC=$?
T_BUILD=$(( $(date +%s) - t ))
cat "$OUT/.build.log" >> "$LOG"; tail -3 "$OUT/.build.log"
cat "$OUT/.aot.log" >> "$LOG"; tail -4 "$OUT/.aot.log"
rm -f "$OUT/.build.log" "$OUT/.aot.log"
result build $BUILD_RC $T_BUILD "$([ $BUILD_RC -eq 0 ] && ls hiso_kernels/_cuda*.so 2>/dev/null | head -1)"
result aot $AOT_RC $T_AOT "$(grep -E '^[0-9]+ variants' "$LOG" | tail -1)"
timeout 60 "$PY" -m hiso_kernels.info 2>&1 | tee -a "$LOG"
BACKENDS=$(timeout 60 "$PY" -c "import hiso_kernels as hk; print(','.join(hk.available_backends('cuda')))" 2>/dev/null)
say "backends for cuda tensors: ${BACKENDS:-none}"

# ---- 2. correctness on the device (a forced CUDA build without a usable cuda backend fails test_gpu.py)
t=$(date +%s)
say "== tests (pytest -n $WORKERS, HISO_SYNC_LAUNCHES=1)"
XDIST="-n $WORKERS"
"$PY" -c "import xdist" 2>/dev/null || XDIST=""
HISO_SYNC_LAUNCHES=1 HISO_EXPECT_GPU_BACKENDS=$([ "$DRY" = "1" ] && echo "" || echo "cuda,triton") \
  timeout 150 "$PY" -m pytest ${GPU_CHECK_TESTS:-tests/test_gpu.py tests/test_spec_vectors.py} -q -p no:cacheprovider $XDIST \
  > "$OUT/tests.log" 2>&1
TEST_RC=$?
tail -15 "$OUT/tests.log" | tee -a "$LOG"
result tests $TEST_RC $(( $(date +%s) - t )) "$(grep -E '[0-9]+ (passed|failed|skipped)' "$OUT/tests.log" | tail -1)"

# ---- 3. benchmark with what is left (25 s kept for the write-out and the summary)
t=$(date +%s)
if [ "$DRY" = "1" ]; then
  SUMMARY+=("$(printf '%-10s skipped        (dry run: needs a GPU)' bench)")
else
  LEFT=$(( BUDGET - $(elapsed) - 25 ))
  if [ "$LEFT" -lt 45 ]; then LEFT=45; fi
  say "== benchmark, budget $LEFT s"
  # SIGTERM at the hard limit: run_gpu.py catches it and still writes what it measured
  timeout -k 10 $(( LEFT + 20 )) "$PY" benchmarks/run_gpu.py --plan check --out "$OUT" --budget-s "$LEFT" 2>&1 \
    | tee -a "$LOG"
  result bench "${PIPESTATUS[0]}" $(( $(date +%s) - t )) "$(grep -E 'rows in' "$LOG" | tail -1)"
fi

# ---- 4. summary
{
  echo
  echo "================ gpu_check summary: $(elapsed) s, $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'FAILED') ================"
  for line in "${SUMMARY[@]}"; do echo "  $line"; done
  echo "  Triton variants (aot.json): $(grep -E '^[0-9]+ variants' "$LOG" | tail -1)"
  if grep -q 'rows in' "$LOG"; then
    echo "  targets:"
    sed -n '/rows in/,/^wrote/p' "$LOG" | grep -v '^wrote' | head -14 | sed 's/^/    /'
  fi
  echo "  files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee -a "$LOG"
exit $FAILED
