"""Measurement: timing, peak-memory probes (in a fresh process on the CPU) and the conditions of a run."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import torch

import hiso_kernels as hk
from hiso_kernels.backends import BACKENDS

from .cases import *
from .cases import _EXPECTED  # noqa: F401
from .providers import *


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: str, *, min_repeats: int = 5, max_repeats: int = 30,
               target_s: float = 1.0, warmup: int = 1) -> list[float]:
    """Seconds per call, repeated until ``min_repeats`` and ``target_s`` of measured time are reached (or
    ``max_repeats``). CPU: perf_counter around the call; GPU: CUDA events around the call, which include the host's
    launch time whenever the host is slower than the device (the eager loop's case)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < max_repeats:
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and sum(times) >= target_s:
            break
    return times


def percentile(data: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) without numpy."""
    xs = sorted(data)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "p20_s": percentile(times, 20), "p80_s": percentile(times, 80),
            "repeats": len(times)}


# ------------------------------------------------------------------------------------------------------ memory
def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``) to its current RSS. Without it a
    warm-up peak (torch.compile, first allocations) would hide the call's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM from /proc/self/status where it exists, else ru_maxrss.

    Both are the same high-water mark, but ru_maxrss also keeps the peak recorded when any thread of the process
    exited (Linux folds the address space's peak into the process's maxrss at each thread exit), so after a reset it
    can still report the warm-up's peak; VmHWM is reset by clear_refs alone.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def probe_memory_here(case: Case, provider: str, device: str) -> dict:
    """Peak-memory delta of one call, measured in this process (run it in a fresh one: see memory_delta)."""
    params, hessian = make_state(case, device)
    fn = make_callable(case, provider, params, hessian, device)
    fn()
    fn()  # warm-up: compilation, launch-plan caches, allocator pools
    synchronize(device)
    gc.collect()
    if torch.device(device).type == "cuda":
        return cuda_peak_delta(fn, device)
    reset = _reset_peak_rss()
    before = peak_rss_bytes()
    fn()
    after = peak_rss_bytes()
    method = "peak RSS (VmHWM), reset after warm-up" if reset else \
        "peak RSS, not resettable here: a warm-up peak may hide the call's"
    return {"mem_delta_bytes": after - before, "mem_method": method}


def cuda_peak_delta(fn: Callable[[], object], device: str) -> dict:
    """GPU peak-memory delta of one (warm) call, in this process: the caching allocator's own accounting."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return {"mem_delta_bytes": torch.cuda.max_memory_allocated(device) - base, "mem_method": "max_memory_allocated"}


def memory_delta(case: Case, provider: str, device: str, timeout_s: float = 600) -> dict:
    """CPU: a fresh subprocess per (case, provider), because a process's peak RSS only grows (the subprocess builds
    its own state). GPU: use :func:`cuda_peak_delta` on the state already allocated."""
    arg = json.dumps({"case": dataclasses.asdict(case), "provider": provider, "device": device})
    path = os.pathsep.join([HERE, os.path.dirname(HERE)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=path)
    try:
        out = subprocess.run([sys.executable, "-m", "benchlib", "--probe-memory", arg], capture_output=True,
                             text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"mem_delta_bytes": None, "mem_method": "timeout"}
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"mem_delta_bytes": None, "mem_method": f"probe failed: {why}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ conditions
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def conditions(device: str) -> dict:
    """What a reader needs to reproduce or discount the numbers."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "hiso_kernels": hk.__version__,
        "direction_spec": hk.SPEC_VERSION,
        "git_commit": _git_commit(),
        "backends": {name: BACKENDS[name].availability()[1] for name in hk.available_backends()},
        "platform": platform.platform(),
        "compile_dynamic": os.environ.get("HISO_BENCH_COMPILE_DYNAMIC", "") == "1",
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "cuda_runtime_torch": torch.version.cuda,
        })
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info
