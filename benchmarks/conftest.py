"""pytest-benchmark suite of hiso_kernels (``benchmarks/test_bench_*.py``).

Not part of the default test run (``testpaths = ["tests"]``; every test here is marked ``benchmark``, so
``-m "not benchmark"`` deselects them wherever they are collected). Run:

    python -m pytest benchmarks --benchmark-json=bench.json                 # quick sizes, device auto
    python -m pytest benchmarks --hiso-sizes=full --hiso-memory             # the full sweep, with peak memory
    python benchmarks/report.py bench.json --out benchmarks/results         # Markdown / CSV / PNG tables

Options (or environment variables): ``--hiso-sizes`` quick|full (HISO_BENCH_SIZES), ``--hiso-device`` cpu|cuda
(HISO_BENCH_DEVICE; default cuda when available), ``--hiso-dtypes`` (HISO_BENCH_DTYPES, default bf16),
``--hiso-memory`` (HISO_BENCH_MEMORY=1: add the peak-memory delta of model parameter lists to extra_info),
``--hiso-target-s`` seconds of measured time per benchmark (default 0.3 quick / 1.0 full).

Each test is one (case, provider): see benchmarks/benchlib.py for the providers and the byte model. Timings are
measured, never asserted.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def pytest_addoption(parser):
    group = parser.getgroup("hiso benchmarks")
    group.addoption("--hiso-sizes", choices=("quick", "full"), default=os.environ.get("HISO_BENCH_SIZES", "quick"))
    group.addoption("--hiso-device", choices=("cpu", "cuda"), default=os.environ.get("HISO_BENCH_DEVICE") or (
        "cuda" if torch.cuda.is_available() else "cpu"))
    group.addoption("--hiso-dtypes", default=os.environ.get("HISO_BENCH_DTYPES", "bf16"))
    group.addoption("--hiso-memory", action="store_true", default=os.environ.get("HISO_BENCH_MEMORY", "") == "1")
    group.addoption("--hiso-target-s", type=float, default=None)


def pytest_configure(config):
    # torch.compile's imports warn about torch.jit internals: noise in every benchmark report
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch.jit._script")


def pytest_generate_tests(metafunc):
    """Parametrize every ``case, provider`` test over the plan of its module's KERNELS."""
    if not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    opt = metafunc.config.getoption
    device = opt("--hiso-device")
    kernels = metafunc.module.KERNELS
    cases = [c for c in bl.plan(device, opt("--hiso-sizes"), opt("--hiso-dtypes").split(",")) if c.kernel in kernels]
    # ids avoid "^", which -k expressions reject: flat-2^20 -> flat-2pow20
    params = [pytest.param(c, p, id=f"{c.shape.replace('^', 'pow')}-{c.dtype}-x{c.terms}-{p}") for c in cases
              for p in bl.providers(c, device)]
    metafunc.parametrize("case,provider", params)


@pytest.fixture(scope="session")
def hiso_device(request):
    device = request.config.getoption("--hiso-device")
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("--hiso-device=cuda but torch sees no CUDA device")
    return device


class _StateCache:
    """One parameter state at a time: consecutive tests of a case (all its providers) share it, a new shape frees
    the old one first (a 7B model and its H fill most of a GPU)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, case: bl.Case, device: str):
        key = (case.shape, case.dtype, case.uses_h, device)
        if key != self.key:
            self.key = self.value = None
            torch._dynamo.reset()
            if device == "cuda":
                torch.cuda.empty_cache()
            self.value = bl.make_state(case, device)
            self.key = key
        return self.value


_STATE = _StateCache()


@pytest.fixture
def hiso_state(case, hiso_device):
    return _STATE.get(case, hiso_device)


@pytest.fixture
def run_case(benchmark, request, hiso_device, hiso_state):
    """``run_case(case, provider)``: time one provider of a case with pytest-benchmark and record the metrics."""
    opt = request.config.getoption
    quick = opt("--hiso-sizes") == "quick"
    target_s = opt("--hiso-target-s") or (0.3 if quick else 1.0)

    def run(case: bl.Case, provider: str) -> None:
        params, hessian = hiso_state
        scale = 1.0
        if provider == "copy":
            fn, scale = bl.make_copy(case.min_bytes, hiso_device)
        else:
            fn = bl.make_callable(case, provider, params, hessian, hiso_device)
        if hiso_device == "cuda":
            inner = fn

            def fn():  # pytest-benchmark times on the host: wait for the device
                inner()
                torch.cuda.synchronize()

        # the first call compiles (torch.compile, Triton) and fills caches; its time sizes the number of rounds
        import time

        t = time.perf_counter()
        fn()
        first = time.perf_counter() - t
        rounds = max(3, min(30, int(target_s / max(first, 1e-6))))
        benchmark.group = case.label()
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1 if provider == "compile" else 0)
        stats = getattr(benchmark, "stats", None)  # None under --benchmark-disable (one plain call, no timing)
        times = [x * scale for x in (stats.stats.data if stats else [first])]
        info = bl.row_for(case, provider, bl.summarize(times), first_call_s=first, device=hiso_device,
                          load_1m=os.getloadavg()[0])  # CPU timings are only as good as the machine is quiet
        if scale != 1.0:
            info["note"] = f"copy measured on {case.min_bytes / scale:.0f} bytes, scaled x{scale:.3g}"
        if opt("--hiso-memory") and not bl.is_flat(case.shape) and not provider.startswith("generator:") \
                and provider not in ("randn", "copy"):
            if hiso_device == "cuda":
                info.update(bl.cuda_peak_delta(fn, hiso_device))
            else:
                info.update(bl.memory_delta(case, provider, hiso_device))
        benchmark.extra_info.update(info)

    return run
