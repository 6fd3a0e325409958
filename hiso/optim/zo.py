"""Zeroth-order optimizers on the fused kernels: ZO-SGD (MeZO, DeComFL) and HiSo.

One step with seed s and P directions (MeZO, arXiv 2305.17333; DeComFL, arXiv 2405.15861; HiSo, arXiv 2506.02370):

    c_p = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)        central difference (MeZO's default), or
    c_p = (f(x + mu z_p) - f(x)) / mu                      forward difference (DeComFL's)
    x  <- x - lr (1/P) sum_p c_p z_p - lr wd x              z_p = u(s, p) / sqrt(H)   (H = 1 for ZO-SGD)
    H  <- max(beta H + (1 - beta) v, h_min)                 HiSo only, with the H of before the step in z_p

The scalars come from :func:`hiso.optim.estimate.estimate_scalars`, the update's coefficients from
:func:`hiso.optim.update.step_round` (the single source shared with the federated layer).

Every perturbation, restore and update is one fused pass over the trainable parameters; directions are never stored.
A step is fully described by its :class:`ZOStep` record (seed and scalars), so :meth:`ZOOptimizer.replay` brings a
replica with the same initial parameters to the same bits in one pass for any number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Iterable, Sequence

import torch

import hiso_kernels as hk
from hiso_kernels import spec

from .estimate import Closure, estimate_scalars
from .exact_restore import DEFAULT_CHUNK
from .update import check_curvature_rule, needs_second_differences, step_round


@dataclasses.dataclass(frozen=True)
class ZOStep:
    """Everything needed to apply (or replay) one step: the seed, the P directional scalars c_p, the second
    differences (for the "stein" rule, else None), and each parameter group's lr and weight decay."""

    seed: int
    scalars: tuple[float, ...]
    second_differences: tuple[float, ...] | None
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]

    @property
    def curvature_scalars(self) -> tuple[float, ...] | None:
        """Deprecated name of :attr:`second_differences`."""
        warnings.warn("ZOStep.curvature_scalars is deprecated; use second_differences", DeprecationWarning,
                      stacklevel=2)
        return self.second_differences


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: the perturb / evaluate / restore cycle and the bookkeeping; subclasses choose the update."""

    uses_hessian = False
    mu: float
    num_directions: int
    difference: str
    distribution: str
    stochastic_rounding: bool
    base_seed: int
    steps_taken: int
    exact_restore: bool | None
    restore_chunk: int
    record_history: bool
    backend: str | None
    allow_noop_step: bool

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        *,
        mu: float = 1e-3,
        num_directions: int = 1,
        difference: str = "central",
        distribution: str = "gaussian",
        weight_decay: float = 0.0,
        stochastic_rounding: bool = False,
        seed: int = 0,
        exact_restore: bool | None = None,
        restore_chunk: int = DEFAULT_CHUNK,
        record_history: bool = True,
        backend: str | None = None,
    ):
        _check_real("lr", lr, minimum=0.0)
        _check_real("weight_decay", weight_decay, minimum=0.0)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        _check_real("mu", mu, minimum=0.0, strict=True)
        if isinstance(num_directions, bool) or not isinstance(num_directions, numbers.Integral) or num_directions < 1:
            raise ValueError(f"num_directions must be a positive integer, got {num_directions!r}")
        if difference not in ("central", "forward"):
            raise ValueError(f"difference must be 'central' or 'forward', got {difference!r}")
        hk.Distribution.parse(distribution)
        if not isinstance(seed, numbers.Integral) or not 0 <= seed <= spec.SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        if not isinstance(restore_chunk, numbers.Integral) or restore_chunk < 1:
            raise ValueError("restore_chunk must be a positive integer")
        self.mu = float(mu)
        self.num_directions = int(num_directions)
        self.difference = difference
        self.distribution = distribution
        self.stochastic_rounding = bool(stochastic_rounding)
        self.base_seed = int(seed)
        self.steps_taken = 0
        self.exact_restore = exact_restore
        self.restore_chunk = int(restore_chunk)
        self.record_history = record_history
        self.backend = backend
        self.history: list[ZOStep] = []
        self.last_undo_elements = 0  # elements the last step's exact restore had to write back
        # Trainers that call step() without a closure after having stepped through their own hook (the Hugging
        # Face integration) set this; otherwise a closure-less step is an error.
        self.allow_noop_step = False

    # ------------------------------------------------------------------ layout
    def _layout(self):
        """Trainable parameters in global order (group by group), each group's slice, global offset and H."""
        params, groups = [], []
        offset = 0
        for g in self.param_groups:
            ps = [p for p in g["params"] if p.requires_grad]
            groups.append((len(params), len(params) + len(ps), offset))
            params += ps
            offset += sum(p.numel() for p in ps)
        if not params:
            raise ValueError("the optimizer has no trainable parameters (requires_grad=True)")
        device = params[0].device
        if any(p.device != device for p in params):
            raise ValueError("all trainable parameters must be on one device")
        hessian = [self._hessian(p) for p in params] if self.uses_hessian else None
        return params, hessian, hk.global_offsets(params), groups

    def _hessian(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "hessian" not in state:
            state["hessian"] = torch.ones(p.shape, dtype=torch.float32, device=p.device)
        return state["hessian"]

    def _use_exact_restore(self, params) -> bool:
        if self.exact_restore is None:
            return all(p.dtype == torch.float32 for p in params)
        return bool(self.exact_restore)

    def next_seed(self) -> int:
        """The seed the next step draws when none is given (derived from the base seed and the step count)."""
        return spec.derive_seed(self.base_seed, self.steps_taken)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, seed: int | None = None):
        """One ZO step. ``closure()`` must return the loss (a finite scalar) and must not call backward.
        Returns the loss at x (forward difference) or the mean of the two perturbed losses (central)."""
        if closure is None:
            if self.allow_noop_step:
                return None
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        params, hessian, _, groups = self._layout()
        if seed is None:
            seed = self.next_seed()
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= spec.SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        scalars, second, loss = self._estimate(closure, params, hessian, int(seed))
        record = ZOStep(
            seed=int(seed),
            scalars=tuple(scalars),
            second_differences=None if second is None else tuple(second),
            lrs=tuple(float(g["lr"]) for g in self.param_groups),
            weight_decays=tuple(float(g["weight_decay"]) for g in self.param_groups),
        )
        self._apply([record], params, hessian, groups)
        if self.record_history:
            self.history.append(record)
        self.steps_taken += 1
        return loss

    def _needs_f0(self) -> bool:
        return self.difference == "forward"

    def _estimate(self, closure, params, hessian, seed):
        est = estimate_scalars(
            closure, params, hessian, seed, mu=self.mu, num_directions=self.num_directions,
            difference=self.difference, with_f0=self._needs_f0(), distribution=self.distribution,
            stochastic_rounding=self.stochastic_rounding, backend=self.backend,
            exact_restore=self._use_exact_restore(params), restore_chunk=self.restore_chunk,
        )
        self.last_undo_elements = est.undo_elements
        return est.scalars, est.second_differences, est.loss

    # ------------------------------------------------------------------ the update
    #: the kernel's curvature rule of this optimizer's update ("none": no H update)
    curvature_rule = "none"

    def _round(self, record: ZOStep, group: int) -> hk.Round:
        """The kernel round of a record for one parameter group (:func:`~hiso.optim.update.step_round`)."""
        second = None if record.second_differences is None else [record.second_differences]
        return step_round([record.seed], [record.scalars], lr=record.lrs[group],
                          weight_decay=record.weight_decays[group], curvature_rule=self.curvature_rule,
                          second_differences=second)

    def _apply(self, records: Sequence[ZOStep], params, hessian, groups) -> None:
        for gi, (lo, hi, offset) in enumerate(groups):
            if lo == hi:
                continue
            rounds = [self._round(rec, gi) for rec in records]
            hk.replay_(params[lo:hi], rounds, hessian=None if hessian is None else hessian[lo:hi],
                       offset=offset, **self._kernel_kwargs())

    def _kernel_kwargs(self) -> dict:
        return dict(curvature_rule=self.curvature_rule, distribution=self.distribution,
                    stochastic_rounding=self.stochastic_rounding, backend=self.backend, check_hessian=False)

    @torch.no_grad()
    def replay(self, history: Sequence[ZOStep]) -> None:
        """Apply recorded steps to this optimizer's parameters (a replica with the same initial values and the
        same parameter layout) in one fused pass per parameter group. Bit-identical to having taken the steps."""
        history = list(history)
        if not history:
            return
        for rec in history:
            if not isinstance(rec, ZOStep):
                raise TypeError(f"history entries must be ZOStep records, got {type(rec).__name__}")
            if len(rec.lrs) != len(self.param_groups):
                raise ValueError(f"a record has {len(rec.lrs)} parameter groups, "
                                 f"this optimizer {len(self.param_groups)}")
        params, hessian, _, groups = self._layout()
        self._apply(history, params, hessian, groups)
        if self.record_history:
            self.history.extend(history)
        self.steps_taken += len(history)

    # ------------------------------------------------------------------ state
    def state_dict(self):
        sd = super().state_dict()
        sd["zo"] = dict(base_seed=self.base_seed, steps_taken=self.steps_taken, mu=self.mu,
                        num_directions=self.num_directions, difference=self.difference,
                        distribution=self.distribution)
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        super().load_state_dict(state_dict)
        if zo is not None:
            self.base_seed = int(zo["base_seed"])
            self.steps_taken = int(zo["steps_taken"])


class ZOSGD(ZOOptimizer):
    """ZO-SGD: MeZO (Malladi et al. 2023) / DeComFL (Li et al. 2024) step, x <- x - lr (1/P) sum_p c_p u_p - lr wd x.

    Example::

        opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3, num_directions=1)
        for batch in data:
            loss = opt.step(lambda: loss_fn(model, batch))
    """


class HiSo(ZOOptimizer):
    """HiSo (Li et al., arXiv 2506.02370): directions scaled by a diagonal curvature estimate H, z_p = u_p / sqrt(H).

    ``curvature_rule="gsq"`` is the authors' rule, H <- beta H + (1 - beta) g_hat^2 with g_hat = (1/P) sum_p c_p z_p;
    ``curvature_rule="stein"`` uses second differences (one more loss per step), H <- beta H + (1 - beta) H (1/P)
    sum_p Delta_p (u_p^2 - 1), an unbiased estimate of diag(A) on a quadratic. H is floored at ``h_min``.
    ``curvature=`` is the deprecated name of ``curvature_rule=``.
    """

    uses_hessian = True

    def __init__(self, params, lr: float = 1e-6, *, beta: float = 0.95, h_min: float = 1e-8,
                 curvature_rule: str = "gsq", curvature: str | None = None, **kwargs):
        if curvature is not None:
            warnings.warn("HiSo(curvature=) is deprecated; use curvature_rule=", DeprecationWarning, stacklevel=2)
            curvature_rule = curvature
        _check_real("beta", beta, minimum=0.0)
        if beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        _check_real("h_min", h_min, minimum=0.0, strict=True)
        check_curvature_rule(curvature_rule, kwargs.get("difference", "central"))
        super().__init__(params, lr, **kwargs)
        self.beta = float(beta)
        self.h_min = float(h_min)
        self.curvature_rule = curvature_rule

    @property
    def curvature(self) -> str:
        """Deprecated name of :attr:`curvature_rule`."""
        warnings.warn("HiSo.curvature is deprecated; use curvature_rule", DeprecationWarning, stacklevel=2)
        return self.curvature_rule

    def _needs_f0(self) -> bool:
        return self.difference == "forward" or needs_second_differences(self.curvature_rule)

    def _kernel_kwargs(self) -> dict:
        return dict(super()._kernel_kwargs(), beta=self.beta, h_min=self.h_min)

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"].update(beta=self.beta, h_min=self.h_min, curvature_rule=self.curvature_rule)
        return sd


# ---------------------------------------------------------------------- helpers
def _check_real(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value <= minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
