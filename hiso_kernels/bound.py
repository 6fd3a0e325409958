"""Parameters bound once for many kernel calls: the optimizers' fast path (no per-call validation or op dispatch).

``hk.replay_`` and friends check every argument and go through a ``torch.ops.hiso`` op on every call; for a small
model that Python work costs more than the kernels. :func:`bind` runs the checks once (tensor list, dtypes, devices,
contiguity, overlaps, H, offsets, backend) and returns a :class:`BoundParams` whose calls only check that the tensors
have not moved (their data pointers) and run the backend. It also exposes the *logged* run, the exact-restore
primitive (``docs/kernels.md``, "Exact restore in the kernel")::

    b = hk.bind(params)                                       # once
    prog = b.program([hk.Round([s], [p], [-mu]),              # +mu z: applied
                      hk.Round([s], [p], [mu]), hk.Round([s], [p], [mu]), hk.Round([s], [p], [-mu])])
    log = b.apply_logged(prog, 1)      # x <- x + mu z, and the log of the elements -2mu, +mu would not bring back
    ...                                 # evaluate, perturb, evaluate, restore (plain runs)
    log.restore()                       # those elements get their original bits back
    # or, in one pass: the chain's last rounds, the restore and an update (b.finish_logged(prog, log, n_chain))

The arithmetic is the same as the public functions' (the same programs run on the same backends).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _validate as v
from . import spec
from ._program import Program, Round, build_program, with_seed
from .backends import select_backend
from .backends.base import KernelLog
from .spec import CurvatureRule

__all__ = ["BoundParams", "KernelLog", "bind"]


def _fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device) for t in tensors)


class BoundParams:
    """A validated parameter list (and optional H) with its backend and program settings. See :func:`bind`."""

    def __init__(self, params, *, hessian=None, offset: int = 0, backend: str | None = None,
                 distribution: str = "gaussian", stochastic_rounding: bool = False, curvature_rule: str = "none",
                 beta: float = 0.95, h_min: float = 1e-8, check_hessian: bool = True):
        params = v.tensor_list("params", params)
        h_list = [] if hessian is None else v.tensor_list("hessian", hessian, allow_empty=True)
        device = v.check_params(params)
        h_views = v.check_hessian(h_list, params)
        self.offsets = v.global_offsets(params, offset)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a string or None, got {type(backend).__name__}")
        if not isinstance(stochastic_rounding, bool):
            raise TypeError(f"stochastic_rounding must be a bool, got {type(stochastic_rounding).__name__}")
        self.rule = CurvatureRule.parse(curvature_rule)
        if self.rule != CurvatureRule.NONE and h_views is None:
            raise ValueError(f"curvature rule {curvature_rule!r} updates H, so a hessian is required")
        # the settings every program of this binding is built with (checked here, once, by building one)
        self._settings: dict[str, Any] = dict(distribution=distribution, beta=beta, h_min=h_min,
                              stochastic_rounding=stochastic_rounding)
        build_program([Round([0], [0], [0.0])], rule=self.rule, **self._settings)
        self.backend = select_backend(device, backend)
        if h_views is not None and check_hessian:
            v.check_hessian_values(h_list)
        self.params = [p.detach() for p in params]
        self.hessian = None if h_views is None else [h.detach() for h in h_views]
        self.device = device
        self.empty = all(p.numel() == 0 for p in params)
        self._sources = list(params)  # the caller's tensors: a set_() or resize on them is seen by _check_unmoved
        self._ptrs = [p.data_ptr() for p in self.params]
        self._templates: dict[tuple, Program] = {}  # shift programs by (direction, sizes), seed 0
        self._key = _fingerprint(self.params + (self.hessian or []))

    # ------------------------------------------------------------------ validity
    def matches(self, params: Sequence[torch.Tensor], hessian: Sequence[torch.Tensor] | None = None) -> bool:
        """Whether ``params`` (and ``hessian``) are the bound tensors, unmoved: same storage address, shape, strides,
        dtype and device (what the checks of :func:`bind` depend on)."""
        if len(params) != len(self.params) or (hessian is None) != (self.hessian is None):
            return False
        h = [] if hessian is None else list(hessian)
        return _fingerprint(list(params) + h) == self._key

    def _check_unmoved(self) -> None:
        if [p.data_ptr() for p in self._sources] != self._ptrs:
            raise RuntimeError("a bound parameter was moved or resized since hiso_kernels.bind: bind again")

    # ------------------------------------------------------------------ programs and runs
    def program(self, rounds: Sequence[Round], curvature_rule: str | None = None) -> Program:
        """The program of ``rounds`` with this binding's settings (``curvature_rule`` overrides the bound rule, e.g.
        "none" for a perturbation of HiSo's parameters: it reads H and does not write it)."""
        rule = self.rule if curvature_rule is None else CurvatureRule.parse(curvature_rule)
        if rule != CurvatureRule.NONE and rule != self.rule:
            raise ValueError(f"this binding's curvature rule is {self.rule.name.lower()!r}")
        return build_program(list(rounds), rule=rule, **self._settings)

    def shift_program(self, seed: int, direction: int, alphas: Sequence[float]) -> Program:
        """x <- x + alpha u(seed, direction) / sqrt(H) for each alpha in turn (one round each; H read, not written):
        the perturbations of a ZO step. Built once per (direction, sizes) and re-seeded per call, so a step pays no
        program building for them (with stochastic rounding, whose rounding seeds follow the seed, built each time).
        On the CPU the returned program is valid until the next call (it is the re-seeded template)."""
        rounds = [Round([seed], [direction], [-a], update_hessian=False) for a in alphas]
        if self._settings["stochastic_rounding"]:
            return self.program(rounds, "none")
        v.check_int("seed", seed, 0, spec.SEED_MAX)
        key = (direction, tuple(alphas))
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= 64:
                self._templates.clear()
            template = self._templates[key] = self.program([Round([0], [direction], [-a], update_hessian=False)
                                                            for a in alphas], "none")
        if self.device.type == "cpu":  # the CPU kernels are synchronous: re-seed the template itself
            template.seeds.fill_(seed)
            return template
        return with_seed(template, seed)  # a copy: a GPU launch may still be reading the last one

    def apply(self, program: Program) -> None:
        """Run ``program`` in place (one pass over the bound tensors)."""
        self._check_unmoved()
        if not self.empty:
            self.backend.apply(self.params, self.hessian, self.offsets, program)

    def apply_logged(self, program: Program, n_apply: int, chunk: int | None = None) -> KernelLog:
        """Apply rounds ``[0, n_apply)`` of ``program`` and return the undo log of the elements that the remaining
        rounds (simulated, not stored) would not bring back to their bits from before this call. The program must
        not update H. After those rounds have really run (with this binding), ``log.restore()`` makes the tensors
        equal, bit for bit, to what they were; ``log.advance(q)`` before a run of ``rest + q`` (the rounds, then a
        program q in the same pass) makes ``log.restore()`` leave them at q applied to their original bits.
        ``chunk``: elements per scratch copy where the backend has no in-kernel log (see :attr:`log_support`)."""
        if isinstance(n_apply, bool) or not isinstance(n_apply, int) or not 1 <= n_apply < program.n_rounds:
            raise ValueError(f"n_apply must be in [1, {program.n_rounds}) (applied rounds, then simulated ones)")
        if program.updates_hessian():
            raise ValueError("a logged program must not update H (build its rounds with update_hessian=False or "
                             "curvature_rule='none')")
        self._check_unmoved()
        if self.empty:
            from .backends.reference import IndexLog

            return IndexLog([])
        return self.backend.apply_logged(self.params, self.hessian, self.offsets, program, n_apply, chunk)

    def finish_logged(self, program: Program, log: KernelLog, n_chain: int) -> None:
        """Finish a logged chain and restore in one pass: run ``program`` (built with this binding), whose rounds
        ``[0, n_chain)`` are the rest of the chain ``log`` was made for and whose other rounds are an update (they
        may update H). The tensors end, bit for bit, as after the chain's rounds, ``log.restore()`` and then the
        update rounds. The log is used up."""
        if isinstance(n_chain, bool) or not isinstance(n_chain, int) or not 0 <= n_chain <= program.n_rounds:
            raise ValueError(f"n_chain must be in [0, {program.n_rounds}] (the chain's rounds, then the update's)")
        self._check_unmoved()
        log.finish(self, program, n_chain)

    @property
    def log_support(self) -> tuple[bool, str]:
        """(whether logged runs happen inside this backend's kernel, how they run): ``hiso_kernels.info`` prints it."""
        return self.backend.log_support()


def bind(params, *, hessian=None, offset: int = 0, backend: str | None = None, distribution: str = "gaussian",
         stochastic_rounding: bool = False, curvature_rule: str = "none", beta: float = 0.95, h_min: float = 1e-8,
         check_hessian: bool = True) -> BoundParams:
    """Validate ``params`` (one device; the arguments of :func:`hiso_kernels.replay_`) once and return a
    :class:`BoundParams` for repeated runs. The tensors must stay where they are (a call checks their addresses);
    H's values are checked here only (``check_hessian``), not on every call."""
    return BoundParams(params, hessian=hessian, offset=offset, backend=backend, distribution=distribution,
                       stochastic_rounding=stochastic_rounding, curvature_rule=curvature_rule, beta=beta,
                       h_min=h_min, check_hessian=check_hessian)
