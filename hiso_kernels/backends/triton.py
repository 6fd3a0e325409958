"""The ``triton`` backend: the fused round as a Triton kernel (GPUs; on the CPU under ``TRITON_INTERPRET=1``).

The generator is ``_triton_generator.py``, the kernels ``_triton_kernels.py``; this file chooses and launches them.
One program instance handles one chunk (``BLOCK_GROUPS`` groups of 4 elements) of one tensor, as a ``[groups, 4]``
block: Philox runs once per group and term and its four words go to the four lanes in registers. Tensors whose
offset, size and addresses allow it run the ``ALIGNED`` variant (vector loads and stores, a mask per group).
IEEE semantics: launches pass ``enable_fp_fusion=False`` (no contraction), division and square root use the
correctly rounded ``div_rn`` / ``sqrt_rn``, and bf16 is rounded with integer operations.
"""

from __future__ import annotations

import os

import torch

from .._codes import DTYPE_CODES
from .._program import Program
from ..spec import CurvatureRule, Distribution
from .base import Backend, KernelLog, PlanCache, check_launch, device_guard, device_log, group_for_launch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = exc


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
    from . import _triton_generator, _triton_kernels
    from ._triton_kernels import directions_kernel, directions_sum_kernel, zo_program_kernel

    #: modules whose @triton.jit kernels hiso_kernels.aot compiles ahead of time
    KERNEL_MODULES = (_triton_generator.__name__, _triton_kernels.__name__)


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)"

    #: groups per program: 256 (1 Ki elements, 4 warps) on GPUs; larger under the interpreter, whose cost is per
    #: program instance rather than per element.
    GPU_BLOCK_GROUPS = 256
    INTERPRETER_BLOCK_GROUPS = 4096
    NUM_WARPS = 4

    def __init__(self):
        self._plans = PlanCache()

    def availability(self):
        if triton is None:
            return False, f"triton is not installed ({_IMPORT_ERROR})"
        if interpreter_enabled():
            return True, f"triton {triton.__version__} (interpreter: TRITON_INTERPRET=1)"
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return False, f"triton {triton.__version__} installed but no GPU (set TRITON_INTERPRET=1 to run on the CPU)"
        return True, f"triton {triton.__version__}"

    def supports(self, device: torch.device) -> bool:
        if interpreter_enabled():
            return device.type == "cpu"
        return device.type == "cuda"

    def _block_groups(self, max_elements: int) -> int:
        if not interpreter_enabled():
            return self.GPU_BLOCK_GROUPS
        # the interpreter pays per element of the block, masked or not: fit the block to the largest tensor
        groups = (max_elements + 3) // 4 + 1
        return min(self.INTERPRETER_BLOCK_GROUPS, max(16, 1 << (groups - 1).bit_length()))

    #: capacity of a logged run's log: 1/LOG_FRACTION of the elements (at least LOG_MIN); fp32 chains leave a few
    #: percent of the elements off, and an overflowing program falls back to the chunked path for its chunk only
    LOG_FRACTION = 8
    LOG_MIN = 4096

    def apply(self, params, hessian, offsets, program: Program) -> None:
        self._launch(params, hessian, offsets, program)

    def _launch(self, params, hessian, offsets, program: Program, n_apply: int = 0, capacity: int | None = None):
        """Run the program kernel on every launch group; with ``n_apply`` > 0 the logged variant, returning per
        group (params, hessian, offsets, plan, log index, log values, counters, skip flags)."""
        device = params[0].device
        logs = []
        with device_guard(device):  # launch on the tensors' device, not the current one
            prog = program.to(device)
            block = self._block_groups(max(p.numel() for p in params))
            for (dtype, aligned), (p, h, o) in group_for_launch(params, hessian, offsets, split_aligned=True).items():
                plan = self._plans.get(p, h, o, block, device)
                if n_apply:
                    cap = capacity if capacity is not None else \
                        max(self.LOG_MIN, sum(t.numel() for t in p) // self.LOG_FRACTION)
                    index = torch.empty(cap, dtype=torch.int64, device=device)
                    value = torch.empty(cap, dtype=torch.int32 if dtype == torch.float32 else torch.int16,
                                        device=device)
                    counts = torch.zeros(2, dtype=torch.int64, device=device)
                    skip = torch.zeros(plan.n_chunks, dtype=torch.int8, device=device)
                    logs.append((p, h, o, plan, index, value, counts, skip))
                else:
                    cap = 0
                    index = value = counts = skip = plan.chunks  # unused by the plain variant
                zo_program_kernel[(plan.n_chunks,)](
                    plan.slots, plan.chunks, prog.seeds, prog.dirs, prog.coef_x, prog.coef_h, prog.round_start,
                    prog.round_wd, prog.round_rseed, prog.round_flags, index, value, counts, skip, prog.n_rounds,
                    n_apply, cap, prog.beta, prog.one_minus_beta, prog.h_min,
                    BLOCK_GROUPS=block, DTYPE=int(DTYPE_CODES[dtype]), HAS_H=h is not None,
                    RULE=int(prog.rule) if h is not None and not n_apply else int(CurvatureRule.NONE),
                    DIST=int(prog.distribution), ALIGNED=aligned, LOG=bool(n_apply), num_warps=self.NUM_WARPS,
                    enable_fp_fusion=False,
                )
                check_launch(device, "triton zo_program_kernel")
        return logs

    def log_support(self):
        ok, why = self.availability()
        if not ok:
            return False, why
        return True, (f"one pass; an atomic reservation per program in a log of 1/{self.LOG_FRACTION} of the "
                      "elements; a program that overflows it falls back to the chunked path for its chunk")

    def apply_logged(self, params, hessian, offsets, program: Program, n_apply: int, chunk=None,
                     capacity: int | None = None) -> KernelLog:
        from .reference import IndexLog

        entries: list = []
        for p, h, o, plan, index, value, counts, skip in self._launch(params, hessian, offsets, program, n_apply,
                                                                       capacity):
            entries += device_log(self, p, h, o, plan, index, value, counts, skip, program, n_apply, chunk,
                                  plan.groups_per_chunk)
        return IndexLog(entries)

    def directions_sum(self, seed, n_dirs, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        """Generator-only benchmark kernel: per-program partial sums of n_dirs directions."""
        block = self._block_groups(numel)
        n_groups = ((offset + numel + 3) >> 2) - (offset >> 2)
        grid = (triton.cdiv(n_groups, block),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=device)
        with device_guard(partial.device):
            directions_sum_kernel[grid](
                partial, seed, n_dirs, offset, numel, BLOCK_GROUPS=block, DIST=int(distribution),
                num_warps=self.NUM_WARPS, enable_fp_fusion=False,
            )
            check_launch(partial.device, "triton directions_sum_kernel")
        return partial

    def directions(self, seed, direction, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel == 0:
            return out
        block = self._block_groups(numel)
        n_groups = ((offset + numel + 3) >> 2) - (offset >> 2)
        grid = (triton.cdiv(n_groups, block),)
        with device_guard(out.device):
            directions_kernel[grid](
                out, seed, direction, offset, numel, BLOCK_GROUPS=block, DIST=int(distribution),
                num_warps=self.NUM_WARPS, enable_fp_fusion=False,
            )
            check_launch(out.device, "triton directions_kernel")
        return out
