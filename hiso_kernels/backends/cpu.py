"""The ``cpu`` backend: C++ kernels (OpenMP across cores, SIMD within a core) in the compiled module ``_cpu``."""

from __future__ import annotations

import torch

from .._program import Program
from ..spec import Distribution
from .base import Backend, PlanCache, group_by_dtype, load_native, native_program_args

_native, _IMPORT_ERROR = load_native("_cpu", "no C++ compiler at install time, or HISO_SKIP_NATIVE=1")

#: groups of 4 elements per chunk of work (16 Ki elements): large enough to amortise scheduling, small enough to
#: balance two to a few dozen threads on real parameter lists.
GROUPS_PER_CHUNK = 4096
#: below this much work (elements x terms) one thread is faster than waking a team: an OpenMP hand-off costs tens of
#: microseconds on an idle machine and milliseconds on a busy one
PARALLEL_MIN_WORK = 1 << 19


class CpuBackend(Backend):
    name = "cpu"
    description = "C++ kernels with OpenMP and SIMD (hiso_kernels._cpu)"

    def __init__(self):
        self._plans = PlanCache()

    def availability(self):
        if _native is None:
            return False, _IMPORT_ERROR
        return True, f"built, instruction set {_native.isa()}"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def apply(self, params, hessian, offsets, program: Program) -> None:
        work = sum(p.numel() for p in params) * max(1, program.n_terms)
        threads = torch.get_num_threads() if work >= PARALLEL_MIN_WORK else 1
        for p, h, o in group_by_dtype(params, hessian, offsets).values():
            plan = self._plans.get(p, h, o, GROUPS_PER_CHUNK, torch.device("cpu"))
            _native.run(**native_program_args(plan, program, h is not None), num_threads=threads)

    def directions(self, seed, direction, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        if numel:
            threads = torch.get_num_threads() if numel >= PARALLEL_MIN_WORK else 1
            _native.fill_directions(seed, direction, offset, numel, int(distribution), out.data_ptr(), threads)
        return out

    def directions_sum(self, seed, n_dirs, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        """Generator-only benchmark kernel: the sum of n_dirs directions (as a one-element tensor)."""
        total = _native.directions_sum(seed, n_dirs, offset, numel, int(distribution), torch.get_num_threads())
        return torch.tensor([total])
