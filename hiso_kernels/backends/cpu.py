"""The ``cpu`` backend: C++ kernels (OpenMP across cores, SIMD within a core) in the compiled module ``_cpu``."""

from __future__ import annotations

import torch

from .._program import Program
from ..spec import Distribution
from .base import Backend, KernelLog, PlanCache, group_by_dtype, load_native, native_program_args

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
        threads = _threads(params, program)
        for p, h, o in group_by_dtype(params, hessian, offsets).values():
            plan = self._plans.get(p, h, o, GROUPS_PER_CHUNK, torch.device("cpu"))
            _native.run(**native_program_args(plan, program, h is not None), num_threads=threads)

    def log_support(self):
        if _native is None:
            return False, _IMPORT_ERROR
        if not hasattr(_native, "run_logged"):
            return False, "the built hiso_kernels._cpu predates the in-kernel undo log: rebuild it"
        return True, ("one pass; per-chunk logs kept by each thread, no capacity limit; the restore is put into the "
                      "final pass (run_patched)")

    def apply_logged(self, params, hessian, offsets, program: Program, n_apply: int, chunk=None) -> KernelLog:
        threads = _threads(params, program)
        parts = []
        for p, h, o in group_by_dtype(params, hessian, offsets).values():
            plan = self._plans.get(p, h, o, GROUPS_PER_CHUNK, torch.device("cpu"))
            args = native_program_args(plan, program, h is not None)
            for key in ("rule", "beta", "one_minus_beta", "h_min"):
                del args[key]
            buf = _native.run_logged(**args, n_slots=len(p), num_threads=threads, n_apply=n_apply)
            parts.append((buf, p, h, plan))
        return CpuLog(parts, threads)

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


def _threads(params, program: Program) -> int:
    work = sum(p.numel() for p in params) * max(1, program.n_terms)
    return torch.get_num_threads() if work >= PARALLEL_MIN_WORK else 1


class CpuLog(KernelLog):
    """Undo logs of the C++ kernel (one ``LogBuffer`` per dtype group), with the tensors they refer to and the launch
    plan they were made with (a patched run must use the same chunk table)."""

    def __init__(self, parts, threads: int):
        self._parts = parts  # (LogBuffer, params, hessian or None, plan): the tensors stay alive with the log
        self._threads = threads

    @property
    def numel(self) -> int:
        return sum(buf.size() for buf, *_ in self._parts)

    @property
    def nbytes(self) -> int:
        return sum(buf.nbytes() for buf, *_ in self._parts)

    def restore(self) -> None:
        for buf, *_ in self._parts:
            buf.restore(self._threads)

    def tensors(self) -> list[torch.Tensor]:
        return [p for _, ps, _, _ in self._parts for p in ps]

    def finish(self, bound, program: Program, n_chain: int) -> None:
        """The pass itself puts the logged elements' saved values in before round ``n_chain`` (``run_patched``,
        with the plan the log was made with): no sparse fix-up and no separate restore."""
        if not hasattr(_native, "run_patched"):  # a build from before the patched runs
            return super().finish(bound, program, n_chain)
        key = sorted((t.data_ptr(), t.numel(), str(t.dtype)) for t in self.tensors())
        if key != sorted((t.data_ptr(), t.numel(), str(t.dtype)) for t in bound.params):
            raise ValueError("the log was made on other tensors than the binding's")
        threads = _threads(self.tensors(), program)
        for buf, _, h, plan in self._parts:
            _native.run_patched(buf, n_chain, **native_program_args(plan, program, h is not None),
                                num_threads=threads)

    def advance(self, program: Program) -> None:
        for buf, _, h, _ in self._parts:
            _native.advance_log(
                buf, rule=int(program.rule), distribution=int(program.distribution), num_threads=self._threads,
                seeds=program.seeds.data_ptr(), dirs=program.dirs.data_ptr(), coef_x=program.coef_x.data_ptr(),
                coef_h=program.coef_h.data_ptr(), round_start=program.round_start.data_ptr(),
                round_wd=program.round_wd.data_ptr(), round_rseed=program.round_rseed.data_ptr(),
                round_flags=program.round_flags.data_ptr(), n_rounds=program.n_rounds, beta=program.beta,
                one_minus_beta=program.one_minus_beta, h_min=program.h_min, has_h=h is not None)
