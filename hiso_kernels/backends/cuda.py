"""The ``cuda`` backend: CUDA C++ kernels from ``csrc/cuda`` in the compiled module ``_cuda``."""

from __future__ import annotations

import torch

from .._program import Program
from ..spec import Distribution
from .base import DTYPE_CODES, Backend, PlanCache, group_by_dtype, load_native

_native, _IMPORT_ERROR = load_native("_cuda", "built only where nvcc and a CUDA torch or driver were found at install time; HISO_BUILD_CUDA=1 forces it")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


class CudaBackend(Backend):
    name = "cuda"
    description = "CUDA C++ kernels (hiso_kernels._cuda)"

    def __init__(self):
        self._plans = PlanCache()

    def availability(self):
        if _native is None:
            return False, _IMPORT_ERROR
        if not torch.cuda.is_available():
            return False, "built, but torch sees no CUDA device"
        return True, f"built, CUDA runtime {_native.runtime_version()}"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def apply(self, params, hessian, offsets, program: Program) -> None:
        device = params[0].device
        prog = program.to(device)
        with torch.cuda.device(device):
            stream = _stream(device)
            for p, h, o in group_by_dtype(params, hessian, offsets).values():
                plan = self._plans.get(p, h, o, _native.GROUPS_PER_CHUNK, device)
                _native.run(
                    plan.slots.data_ptr(),
                    plan.chunks.data_ptr(),
                    plan.n_chunks,
                    DTYPE_CODES[plan.dtype],
                    h is not None,
                    int(prog.rule),
                    int(prog.distribution),
                    prog.seeds.data_ptr(),
                    prog.dirs.data_ptr(),
                    prog.coef_x.data_ptr(),
                    prog.coef_h.data_ptr(),
                    prog.round_start.data_ptr(),
                    prog.round_wd.data_ptr(),
                    prog.round_rseed.data_ptr(),
                    prog.n_rounds,
                    prog.beta,
                    prog.one_minus_beta,
                    prog.h_min,
                    stream,
                )

    def directions(self, seed, direction, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel:
            with torch.cuda.device(out.device):
                _native.fill_directions(seed, direction, offset, numel, int(distribution), out.data_ptr(),
                                      _stream(out.device))
        return out

    def directions_sum(self, seed, n_dirs, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        """Generator-only benchmark kernel (per-block partial sums)."""
        blocks = -(-(((offset + numel + 3) >> 2) - (offset >> 2)) // _native.GROUPS_PER_CHUNK)
        partial = torch.empty(blocks, dtype=torch.float32, device=device)
        with torch.cuda.device(partial.device):
            _native.directions_sum(seed, n_dirs, offset, numel, int(distribution), partial.data_ptr(),
                                 _stream(partial.device))
        return partial
