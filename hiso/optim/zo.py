"""Zeroth-order optimizers on the fused kernels: ZO-SGD (MeZO, DeComFL) and HiSo.

One step with seed s and P directions (design section 1):

    c_p = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)        central difference (MeZO's default), or
    c_p = (f(x + mu z_p) - f(x)) / mu                      forward difference (DeComFL's)
    x  <- x - lr (1/P) sum_p c_p z_p - lr wd x              z_p = u(s, p) / sqrt(H)   (H = 1 for ZO-SGD)
    H  <- max(beta H + (1 - beta) v, h_min)                 HiSo only, with the H of before the step in z_p

Every perturbation, restore and update is one fused pass over the trainable parameters; directions are never stored.
A step is fully described by its :class:`ZOStep` record (seed and scalars), so :meth:`ZOOptimizer.replay` brings a
replica with the same initial parameters to the same bits in one pass for any number of steps.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, Iterable, Sequence

import torch

import hiso_kernels as hk
from hiso_kernels import spec

from .exact_restore import DEFAULT_CHUNK, UndoLog, perturb_with_undo

Closure = Callable[[], "torch.Tensor | float"]


@dataclasses.dataclass(frozen=True)
class ZOStep:
    """Everything needed to apply (or replay) one step: the seed, the P directional scalars c_p, the curvature
    scalars (second differences for the "stein" rule, else None), and each parameter group's lr and weight decay."""

    seed: int
    scalars: tuple[float, ...]
    curvature_scalars: tuple[float, ...] | None
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: the perturb / evaluate / restore cycle and the bookkeeping; subclasses choose the update."""

    uses_hessian = False

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
        offsets = []
        pos = 0
        for p in params:
            offsets.append(pos)
            pos += p.numel()
        return params, hessian, offsets, groups

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
    def step(self, closure: Closure | None = None, *, seed: int | None = None):  # noqa: D401
        """One ZO step. ``closure()`` must return the loss (a finite scalar) and must not call backward.
        Returns the loss at x (forward difference) or the mean of the two perturbed losses (central)."""
        if closure is None:
            if self.allow_noop_step:
                return None
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        params, hessian, offsets, groups = self._layout()
        if seed is None:
            seed = self.next_seed()
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= spec.SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        scalars, curvature, loss = self._estimate(closure, params, hessian, int(seed))
        record = ZOStep(
            seed=int(seed),
            scalars=tuple(scalars),
            curvature_scalars=None if curvature is None else tuple(curvature),
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
        return est.scalars, est.curvature, est.loss

    # ------------------------------------------------------------------ the update
    def _coefficients(self, record: ZOStep, group: int) -> tuple[list[float], list[float] | None, float]:
        """(x coefficients a_p, curvature coefficients b_p or None, weight-decay factor) of a record for a group.
        The single source of these numbers for both the step and the replay."""
        n = len(record.scalars)
        lr = record.lrs[group]
        a = [lr * c / n for c in record.scalars]
        return a, None, lr * record.weight_decays[group]

    def _apply(self, records: Sequence[ZOStep], params, hessian, groups) -> None:
        for gi, (lo, hi, offset) in enumerate(groups):
            if lo == hi:
                continue
            rounds = []
            for rec in records:
                a, b, wd = self._coefficients(rec, gi)
                rounds.append(hk.Round([rec.seed] * len(a), range(len(a)), a, b, weight_decay=wd))
            self._replay_group(params[lo:hi], None if hessian is None else hessian[lo:hi], rounds, offset)

    def _replay_group(self, params, hessian, rounds, offset) -> None:
        hk.replay_(params, rounds, hessian=hessian, curvature_rule="none", offset=offset, distribution=self.distribution,
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
                raise ValueError(f"a record has {len(rec.lrs)} parameter groups, this optimizer {len(self.param_groups)}")
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
    """HiSo (Li et al., ICLR 2026): directions scaled by a diagonal curvature estimate H, z_p = u_p / sqrt(H).

    ``curvature="gsq"`` is the authors' rule, H <- beta H + (1 - beta) g_hat^2 with g_hat = (1/P) sum_p c_p z_p;
    ``curvature="stein"`` uses second differences (one more loss per step), H <- beta H + (1 - beta) H (1/P)
    sum_p Delta_p (u_p^2 - 1), an unbiased estimate of diag(A) on a quadratic. H is floored at ``h_min``.
    """

    uses_hessian = True

    def __init__(self, params, lr: float = 1e-6, *, beta: float = 0.95, h_min: float = 1e-8,
                 curvature: str = "gsq", **kwargs):
        _check_real("beta", beta, minimum=0.0)
        if beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        _check_real("h_min", h_min, minimum=0.0, strict=True)
        if curvature not in ("gsq", "stein"):
            raise ValueError(f"curvature must be 'gsq' or 'stein', got {curvature!r}")
        if curvature == "stein" and kwargs.get("difference", "central") != "central":
            raise ValueError("the 'stein' curvature rule needs central differences")
        super().__init__(params, lr, **kwargs)
        self.beta = float(beta)
        self.h_min = float(h_min)
        self.curvature = curvature

    def _needs_f0(self) -> bool:
        return self.difference == "forward" or self.curvature == "stein"

    def _coefficients(self, record, group):
        a, _, wd = super()._coefficients(record, group)
        n = len(record.scalars)
        if self.curvature == "stein":
            if record.curvature_scalars is None:
                raise ValueError("a 'stein' step record needs curvature scalars")
            b = [d / n for d in record.curvature_scalars]
        else:
            b = [c / n for c in record.scalars]
        return a, b, wd

    def _replay_group(self, params, hessian, rounds, offset) -> None:
        hk.replay_(params, rounds, hessian=hessian, curvature_rule=self.curvature, beta=self.beta, h_min=self.h_min,
                   offset=offset, distribution=self.distribution, stochastic_rounding=self.stochastic_rounding,
                   backend=self.backend, check_hessian=False)

    def state_dict(self):
        sd = super().state_dict()
        sd["zo"].update(beta=self.beta, h_min=self.h_min, curvature=self.curvature)
        return sd


@dataclasses.dataclass
class Estimate:
    """Directional scalars of one step: c_p, second differences (or None), the loss, undo-log size."""

    scalars: list[float]
    curvature: list[float] | None
    loss: float
    undo_elements: int


def estimate_scalars(
    closure: Closure,
    params: Sequence[torch.Tensor],
    hessian: Sequence[torch.Tensor] | None,
    seed: int,
    *,
    mu: float,
    num_directions: int,
    difference: str = "central",
    with_f0: bool = False,
    distribution: str = "gaussian",
    stochastic_rounding: bool = False,
    backend: str | None = None,
    exact_restore: bool = True,
    restore_chunk: int = DEFAULT_CHUNK,
) -> Estimate:
    """Evaluate the losses around x for each direction z_p = u(seed, p) / sqrt(H) and bring x back.

    The central chain is +mu, eval, (-mu, -mu), eval, +mu: the middle two perturbations run as two rounds of one
    fused pass, so it costs three passes like MeZO's +mu, -2mu, +mu, but every perturbation is undone by its own
    opposite. That matters: in fp32 the chain +mu, -2mu, +mu leaves about half of the elements one ulp off,
    the paired chain a few percent (benchmarks/restore_drift.py). With exact restore those few are written back
    from a sparse undo log, and the parameters return to their exact bits, also when the closure fails.
    """
    kw = dict(distribution=distribution, stochastic_rounding=stochastic_rounding, backend=backend,
              check_hessian=False)
    offsets = _offsets(params)

    def shift(tensors, h, offset, p, alphas):
        """Perturb by each alpha in turn (one fused pass: one round per alpha)."""
        rounds = [hk.Round([seed], [p], [-a]) for a in alphas]
        hk.replay_(tensors, rounds, hessian=h, curvature_rule="none", offset=offset, **kw)

    def op(p, alphas):
        return lambda views, h_views, offset: shift(views, h_views, offset, p, alphas)

    central = difference == "central"
    f0 = _evaluate(closure) if (with_f0 or not central) else None
    scalars, curvature, losses = [], [], []
    undo = 0
    for p in range(num_directions):
        # the passes after the first one, in order; each is a list of perturbation sizes fused into one pass
        passes = [[-mu, -mu], [mu]] if central else [[-mu]]
        log: UndoLog | None = None
        if exact_restore:
            log = perturb_with_undo(params, offsets, hessian, op(p, [mu]), [op(p, a) for a in passes], restore_chunk)
            undo += log.numel
        else:
            shift(params, hessian, 0, p, [mu])
        try:
            f_plus = _evaluate(closure)
            if central:
                shift(params, hessian, 0, p, passes.pop(0))
                f_minus = _evaluate(closure)
        finally:
            for alphas in passes:
                shift(params, hessian, 0, p, alphas)
            if log is not None:
                log.apply(params)
        if central:
            scalars.append((f_plus - f_minus) / (2 * mu))
            if f0 is not None:
                curvature.append((f_plus + f_minus - 2 * f0) / (2 * mu * mu))
            losses.append(0.5 * (f_plus + f_minus))
        else:
            scalars.append((f_plus - f0) / mu)
            losses.append(f_plus)
    loss = f0 if f0 is not None else sum(losses) / len(losses)
    return Estimate(scalars, curvature if (central and f0 is not None) else None, loss, undo)


# ---------------------------------------------------------------------- helpers
def _offsets(params) -> list[int]:
    out, pos = [], 0
    for p in params:
        out.append(pos)
        pos += p.numel()
    return out


def _evaluate(closure: Closure) -> float:
    """Run the closure and return its loss as a Python float; reject non-scalar and non-finite losses."""
    value = closure()
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
        value = float(value.detach().reshape(()).item())
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    else:
        raise TypeError(f"the closure must return a scalar loss, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"the closure returned a non-finite loss ({value}); parameters were restored")
    return value


def _check_real(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value <= minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
