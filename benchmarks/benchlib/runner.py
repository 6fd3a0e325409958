"""The runner behind run_cpu.py / run_gpu.py: every (case, provider) of a plan, timed, probed and written."""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterable

import torch

from .cases import *
from .cases import _EXPECTED  # noqa: F401
from .measure import *
from .measure import _reset_peak_rss  # noqa: F401
from .providers import *
from .reporting import *
from .reporting import _fmt_bytes, _fmt_time


class Runner:
    """Measures cases on one device in one process: every provider of a case back to back, state shared."""

    def __init__(self, device: str, *, target_s: float, min_repeats: int, max_repeats: int, memory: Callable[[Case,
                 str], bool] = lambda c, p: False, budget_s: float | None = None, slow_s: float = 1.0, log=print):
        self.device = device
        self.slow_s = slow_s
        self.target_s = target_s
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.memory = memory
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.log = log

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, cases: Iterable[Case], skip: Callable[[Case, str], bool] = lambda c, p: False,
            defer: Callable[[Case, str], bool] = lambda c, p: False) -> list[dict]:
        """Measure every provider of every case; ``skip`` drops a (case, provider), ``defer`` moves it after all the
        others (expensive rows that should not starve the rest of a time budget)."""
        deferred: list[tuple[Case, str]] = []
        self._state_key = self._state = None
        for case in cases:
            provs = []
            for prov in providers(case, self.device):
                if skip(case, prov):
                    continue
                (deferred.append((case, prov)) if defer(case, prov) else provs.append(prov))
            self._run_case(case, provs)
        for case, prov in deferred:
            self._run_case(case, [prov])
        self._state_key = self._state = None
        return derive(self.rows)

    def _run_case(self, case: Case, provs: list[str]) -> None:
        if not provs:
            return
        if self.out_of_time():
            self.skipped.append(f"{case.label()} ({', '.join(provs)}): time budget exhausted")
            return
        key = (case.shape, case.dtype, case.uses_h)
        if self._state_key != key:
            self._state_key = self._state = None
            torch._dynamo.reset()  # compiled loops may keep the old tensors alive
            gc.collect()
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
            try:
                self._state = make_state(case, self.device)
            except (RuntimeError, MemoryError) as exc:  # e.g. torch.cuda.OutOfMemoryError: skip, keep going
                self.log(f"  {case.label():<45} state allocation FAILED: {type(exc).__name__}: {str(exc)[:120]}")
                self.skipped.append(f"{case.label()}: could not allocate the parameters ({type(exc).__name__})")
                return
            self._state_key = key
        params, hessian = self._state
        for prov in provs:
            if self.out_of_time():
                self.skipped.append(f"{case.label()} {prov}: time budget exhausted")
                continue
            self.rows.append(self.measure(case, prov, params, hessian))

    def measure(self, case: Case, prov: str, params, hessian) -> dict:
        t0 = time.perf_counter()
        extra: dict = {}
        try:
            if prov == "copy":
                fn, scale = make_copy(case.min_bytes, self.device)
                if scale != 1.0:
                    extra["note"] = f"copy measured on {_fmt_bytes(case.min_bytes / scale)}, scaled x{scale:.3g}"
            else:
                fn, scale = make_callable(case, prov, params, hessian, self.device), 1.0
            warm = time.perf_counter()
            fn()  # first call: compilation (torch.compile, Triton JIT), plan caches
            synchronize(self.device)
            first = time.perf_counter() - warm
            if prov == "compile":
                extra["note"] = f"first call (compile) {first:.1f} s"
            # slow providers (the eager loop over a whole model) get fewer repeats, so a full run stays affordable
            min_repeats = self.min_repeats if first * scale < self.slow_s else min(3, self.min_repeats)
            times = time_calls(fn, self.device, min_repeats=min_repeats, max_repeats=self.max_repeats,
                               target_s=self.target_s, warmup=1 if prov == "compile" else 0)
            times = [t * scale for t in times]
            stats = summarize(times)
            if self.memory(case, prov) and torch.device(self.device).type == "cuda":
                extra.update(cuda_peak_delta(fn, self.device))
            del fn
        except Exception as exc:  # a provider that fails is reported, not fatal (e.g. torch.compile on a bare box)
            self.log(f"  {case.label():<45} {prov:<22} FAILED: {type(exc).__name__}: {exc}")
            gc.collect()
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next provider a clean pool
            return row_for(case, prov, {"median_s": math.nan, "p20_s": math.nan, "p80_s": math.nan, "repeats": 0},
                           note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
        if self.memory(case, prov) and torch.device(self.device).type != "cuda":
            extra.update(memory_delta(case, prov, self.device))
        row = row_for(case, prov, stats, **extra)
        mem = f"  mem {_fmt_bytes(row.get('mem_delta_bytes'))}" if "mem_delta_bytes" in row else ""
        self.log(f"  {case.label():<45} {prov:<22} {_fmt_time(stats['median_s']):>10} "
                 f"[{_fmt_time(stats['p20_s'])}-{_fmt_time(stats['p80_s'])}] x{stats['repeats']}{mem}"
                 f"  ({time.perf_counter() - t0:.1f} s)")
        return row


def _probe_main(arg: str) -> None:
    spec = json.loads(arg)
    case = Case(**spec["case"])
    print(json.dumps(probe_memory_here(case, spec["provider"], spec["device"])))
