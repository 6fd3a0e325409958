"""The perturb / evaluate / restore cycle of one ZO step: the directional scalars c_p (and second differences).

    c_p     = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)              central difference (MeZO, arXiv 2305.17333), or
    c_p     = (f(x + mu z_p) - f(x)) / mu                           forward difference (DeComFL, arXiv 2405.15861)
    Delta_p = (f(x + mu z_p) + f(x - mu z_p) - 2 f(x)) / (2 mu^2)   second difference (the "stein" curvature rule)

with z_p = u(seed, p) / sqrt(H). Used by the optimizers (:mod:`hiso.optim.zo`) and the federated clients
(:mod:`hiso.fl.protocol`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import torch

import hiso_kernels as hk

from .exact_restore import DEFAULT_CHUNK, UndoLog, perturb_with_undo

Closure = Callable[[], "torch.Tensor | float"]


class NonFiniteLossError(ValueError):
    """The closure returned NaN or an infinity (the parameters were restored before this was raised)."""


@dataclasses.dataclass
class Estimate:
    """Directional scalars of one step: c_p, second differences (or None), the loss, undo-log size."""

    scalars: list[float]
    second_differences: list[float] | None
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
    offsets = hk.global_offsets(params)

    def shift(tensors, h, offset, p, alphas):
        """Perturb by each alpha in turn (one fused pass: one round per alpha)."""
        rounds = [hk.Round([seed], [p], [-a]) for a in alphas]
        hk.replay_(tensors, rounds, hessian=h, curvature_rule="none", offset=offset, **kw)

    def op(p, alphas):
        return lambda views, h_views, offset: shift(views, h_views, offset, p, alphas)

    central = difference == "central"
    f0 = evaluate_loss(closure) if (with_f0 or not central) else None
    scalars, second, losses = [], [], []
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
            f_plus = evaluate_loss(closure)
            if central:
                shift(params, hessian, 0, p, passes.pop(0))
                f_minus = evaluate_loss(closure)
        finally:
            for alphas in passes:
                shift(params, hessian, 0, p, alphas)
            if log is not None:
                log.apply(params)
        if central:
            scalars.append((f_plus - f_minus) / (2 * mu))
            if f0 is not None:
                second.append((f_plus + f_minus - 2 * f0) / (2 * mu * mu))
            losses.append(0.5 * (f_plus + f_minus))
        else:
            assert f0 is not None  # forward differences always evaluate f(x)
            scalars.append((f_plus - f0) / mu)
            losses.append(f_plus)
    loss = f0 if f0 is not None else sum(losses) / len(losses)
    return Estimate(scalars, second if (central and f0 is not None) else None, loss, undo)


def evaluate_loss(closure: Closure) -> float:
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
        raise NonFiniteLossError(f"the closure returned a non-finite loss ({value}); parameters were restored")
    return value
