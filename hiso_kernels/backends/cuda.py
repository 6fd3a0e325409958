"""The ``cuda`` backend: CUDA C++ kernels from ``csrc/cuda`` in the compiled module ``_cuda``."""

from __future__ import annotations

import functools

import torch

from .._program import Program
from ..spec import Distribution
from .base import (
    Backend,
    KernelLog,
    PlanCache,
    check_launch,
    device_guard,
    device_log,
    group_by_dtype,
    load_native,
    native_program_args,
)

_native, _IMPORT_ERROR = load_native(
    "_cuda", "built only where nvcc and a CUDA torch or driver were found at install time; HISO_BUILD_CUDA=1 forces it"
)


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


@functools.cache
def _probe(index: int) -> str:
    """'' if the build runs on device ``index``, else why not (loads the kernels once; launches nothing)."""
    why, _ = _native.probe(index)
    if not why:
        return ""
    major, minor = torch.cuda.get_device_capability(index)
    return (f"device {index} ({torch.cuda.get_device_name(index)}, sm_{major}{minor}) cannot run this build "
            f"(compiled for {_native.ARCHS}): {why}")


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA C++ kernels (hiso_kernels._cuda)"

    def __init__(self):
        self._plans = PlanCache()

    def availability(self):
        if _native is None:
            return False, _IMPORT_ERROR
        if _native.device_count() == 0:
            return False, ("built, but its CUDA runtime finds no device (no driver, or a driver older than the "
                           f"CUDA {_native.runtime_version()} runtime it links)")
        if not torch.cuda.is_available():
            return False, "built, but torch sees no CUDA device"
        why = _probe(torch.cuda.current_device())
        if why:
            return False, f"built, but {why}"
        return True, f"built for {_native.ARCHS}, CUDA runtime {_native.runtime_version()}"

    def supports(self, device: torch.device) -> bool:
        if device.type != "cuda":
            return False
        index = torch.cuda.current_device() if device.index is None else device.index
        return _probe(index) == ""

    def apply(self, params, hessian, offsets, program: Program) -> None:
        device = params[0].device
        with device_guard(device):
            prog = program.to(device)
            stream = _stream(device)
            for p, h, o in group_by_dtype(params, hessian, offsets).values():
                plan = self._plans.get(p, h, o, _native.GROUPS_PER_CHUNK, device)
                _native.run(**native_program_args(plan, prog, h is not None), stream=stream)
                check_launch(device, "cuda zo_program_kernel")

    #: capacity of a logged launch's log, as in the Triton backend (an overflowing warp's elements fall back)
    LOG_FRACTION = 8
    LOG_MIN = 4096

    def log_support(self):
        ok, why = self.availability()
        if not ok:
            return False, why
        if not hasattr(_native, "run_logged"):
            return False, "the built hiso_kernels._cuda predates the in-kernel undo log: rebuild it"
        return True, (f"one pass; an atomic reservation per warp in a log of 1/{self.LOG_FRACTION} of the "
                      "elements; a warp that overflows it falls back to the chunked path for its elements")

    def apply_logged(self, params, hessian, offsets, program: Program, n_apply: int, chunk=None,
                     capacity: int | None = None) -> KernelLog:
        from .reference import IndexLog

        device = params[0].device
        entries: list = []
        with device_guard(device):
            prog = program.to(device)
            stream = _stream(device)
            for p, h, o in group_by_dtype(params, hessian, offsets).values():
                plan = self._plans.get(p, h, o, _native.GROUPS_PER_CHUNK, device)
                cap = capacity if capacity is not None else \
                    max(self.LOG_MIN, sum(t.numel() for t in p) // self.LOG_FRACTION)
                index = torch.empty(cap, dtype=torch.int64, device=device)
                value = torch.empty(cap, dtype=torch.int32 if p[0].dtype == torch.float32 else torch.int16,
                                    device=device)
                counts = torch.zeros(2, dtype=torch.int64, device=device)
                skip = torch.zeros(plan.n_chunks * _native.WARPS_PER_CHUNK, dtype=torch.int8, device=device)
                args = native_program_args(plan, prog, h is not None)
                for key in ("rule", "beta", "one_minus_beta", "h_min"):
                    del args[key]
                _native.run_logged(**args, n_apply=n_apply, log_index=index.data_ptr(), log_value=value.data_ptr(),
                                   log_counts=counts.data_ptr(), log_skip=skip.data_ptr(), log_capacity=cap,
                                   stream=stream)
                check_launch(device, "cuda zo_logged_kernel")
                entries += device_log(self, p, h, o, plan, index, value, counts, skip, program, n_apply, chunk, 32)
        return IndexLog(entries)

    def directions(self, seed, direction, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel:
            with device_guard(out.device):
                _native.fill_directions(seed, direction, offset, numel, int(distribution), out.data_ptr(),
                                        _stream(out.device))
                check_launch(out.device, "cuda directions_kernel")
        return out

    def directions_sum(self, seed, n_dirs, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        """Generator-only benchmark kernel (per-block partial sums)."""
        blocks = -(-(((offset + numel + 3) >> 2) - (offset >> 2)) // _native.GROUPS_PER_CHUNK)
        partial = torch.empty(blocks, dtype=torch.float32, device=device)
        with device_guard(partial.device):
            _native.directions_sum(seed, n_dirs, offset, numel, int(distribution), partial.data_ptr(),
                                   _stream(partial.device))
            check_launch(partial.device, "cuda directions_sum_kernel")
        return partial
