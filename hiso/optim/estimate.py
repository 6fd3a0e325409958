"""The perturb / evaluate / restore cycle of one ZO step: the directional scalars c_p (and second differences).

    c_p     = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)              central difference (MeZO, arXiv 2305.17333), or
    c_p     = (f(x + mu z_p) - f(x)) / mu                           forward difference (DeComFL, arXiv 2405.15861)
    Delta_p = (f(x + mu z_p) + f(x - mu z_p) - 2 f(x)) / (2 mu^2)   second difference (the "stein" curvature rule)

with z_p = u(seed, p) / sqrt(H). Used by the optimizers (:mod:`hiso.optim.zo`) and the federated clients
(:mod:`hiso.fl.protocol`). The step is two stages: :func:`_evaluate_chain` perturbs, runs the closure and restores
(the only stage that touches parameters), :func:`scalars_from_losses` turns losses into scalars; between them the
losses may be combined with other processes' (:mod:`hiso.optim.distributed`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

import hiso_kernels as hk

from .exact_restore import DEFAULT_CHUNK, UndoLog, perturb_with_undo
from .layout import Run, split_runs

Closure = Callable[[], "torch.Tensor | float | Sequence[torch.Tensor | float]"]


class NonFiniteLossError(ValueError):
    """The closure returned NaN or an infinity (the parameters were restored before this was raised)."""


@dataclasses.dataclass
class Estimate:
    """Directional scalars of one step: c_p, second differences (or None), the loss, undo-log size."""

    scalars: list[float]
    second_differences: list[float] | None
    loss: float
    undo_elements: int


class Exchange(Protocol):
    """Combines a step's local losses with other processes' (:class:`hiso.optim.distributed.LossExchange`)."""

    def __call__(self, local: Sequence[Sequence[float]]) -> list[float]: ...

    def abort(self) -> None: ...


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
    offsets: Sequence[int] | None = None,
    runs: Sequence[Run] | None = None,
    exchange: Exchange | None = None,
) -> Estimate:
    """Evaluate the losses around x for each direction z_p = u(seed, p) / sqrt(H), bring x back, and derive the
    scalars from the (combined) losses.

    ``offsets`` are the global indices of the tensors' first elements (default: one flat vector from 0) and ``runs``
    the kernel calls (default: by device and contiguity, :mod:`hiso.optim.layout`). The closure may return one loss
    or a list of m micro-batch losses; each evaluation's loss is then their ``math.fsum`` mean. With ``exchange``
    the local losses of the whole step are combined with the other ranks' instead (:mod:`hiso.optim.distributed`);
    a non-finite loss is then reported by the exchange on every rank rather than raised here alone.
    """
    offsets = hk.global_offsets(params) if offsets is None else list(offsets)
    runs = split_runs(params, offsets) if runs is None else list(runs)
    central = difference == "central"
    with_f0 = with_f0 or not central
    try:
        local, undo = _evaluate_chain(
            closure, params, hessian, seed, offsets, runs, mu=mu, num_directions=num_directions, central=central,
            with_f0=with_f0, strict=exchange is None, exact_restore=exact_restore, restore_chunk=restore_chunk,
            kernel_kwargs=dict(distribution=distribution, stochastic_rounding=stochastic_rounding, backend=backend,
                               check_hessian=False))
    except Exception:
        if exchange is not None:
            exchange.abort()  # the other ranks raise too instead of waiting for this rank's losses
        raise
    losses = exchange(local) if exchange is not None else [mean_loss(v) for v in local]
    return scalars_from_losses(losses, mu=mu, num_directions=num_directions, central=central, with_f0=with_f0,
                               undo_elements=undo)


def _evaluate_chain(closure, params, hessian, seed, offsets, runs, *, mu, num_directions, central, with_f0, strict,
                    exact_restore, restore_chunk, kernel_kwargs) -> tuple[list[list[float]], int]:
    """The losses in evaluation order: [f(x)] if ``with_f0``, then per direction f(x + mu z_p) and (central)
    f(x - mu z_p). The central chain is +mu, eval, (-mu, -mu), eval, +mu: the middle two perturbations run as two
    rounds of one fused pass, so it costs three passes like MeZO's +mu, -2mu, +mu, but every perturbation is undone
    by its own opposite. That matters: in fp32 the chain +mu, -2mu, +mu leaves about half of the elements one ulp
    off, the paired chain a few percent (benchmarks/restore_drift.py). With exact restore those few are written back
    from a sparse undo log, and the parameters return to their exact bits, also when the closure fails."""

    def shift_views(tensors, h, offset, p, alphas):
        """Perturb consecutive views by each alpha in turn (one fused pass: one round per alpha)."""
        rounds = [hk.Round([seed], [p], [-a]) for a in alphas]
        hk.replay_(tensors, rounds, hessian=h, curvature_rule="none", offset=offset, **kernel_kwargs)

    def shift(p, alphas):
        for r in runs:
            shift_views(params[r.start:r.stop], None if hessian is None else hessian[r.start:r.stop], r.offset, p,
                        alphas)

    def op(p, alphas):
        return lambda views, h_views, offset: shift_views(views, h_views, offset, p, alphas)

    def evaluate():
        values = evaluate_loss(closure, strict=strict)
        if out and len(values) != len(out[0]):
            raise ValueError(f"the closure returned {len(values)} losses, earlier in this step {len(out[0])}")
        out.append(values)

    out: list[list[float]] = []
    undo = 0
    if with_f0:
        evaluate()
    for p in range(num_directions):
        # the passes after the first one, in order; each is a list of perturbation sizes fused into one pass
        passes = [[-mu, -mu], [mu]] if central else [[-mu]]
        log: UndoLog | None = None
        if exact_restore:
            log = perturb_with_undo(params, offsets, hessian, op(p, [mu]), [op(p, a) for a in passes], restore_chunk,
                                    runs=runs)
            undo += log.numel
        else:
            shift(p, [mu])
        try:
            evaluate()
            if central:
                shift(p, passes.pop(0))
                evaluate()
        finally:
            for alphas in passes:
                shift(p, alphas)
            if log is not None:
                log.apply(params)
    return out, undo


def scalars_from_losses(losses: Sequence[float], *, mu: float, num_directions: int, central: bool, with_f0: bool,
                        undo_elements: int = 0) -> Estimate:
    """c_p, the second differences and the step's loss from the losses in evaluation order (see module doc)."""
    f0 = losses[0] if with_f0 else None
    rest = losses[1:] if with_f0 else losses
    scalars, second, around = [], [], []
    for p in range(num_directions):
        if central:
            f_plus, f_minus = rest[2 * p], rest[2 * p + 1]
            scalars.append((f_plus - f_minus) / (2 * mu))
            if f0 is not None:
                second.append((f_plus + f_minus - 2 * f0) / (2 * mu * mu))
            around.append(0.5 * (f_plus + f_minus))
        else:
            assert f0 is not None  # forward differences always evaluate f(x)
            scalars.append((rest[p] - f0) / mu)
            around.append(rest[p])
    loss = f0 if f0 is not None else sum(around) / len(around)
    return Estimate(scalars, second if (central and f0 is not None) else None, loss, undo_elements)


def evaluate_loss(closure: Closure, strict: bool = True) -> list[float]:
    """Run the closure and return its loss(es) as Python floats: one, or one per micro-batch when it returns a list
    or tuple. Non-scalar values are rejected; non-finite ones too, unless ``strict`` is False (then they are
    returned, for the distributed exchange to report on every rank)."""
    value = closure()
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise ValueError("the closure returned an empty list of losses")
    out = [_as_float(v) for v in items]
    if strict and not all(math.isfinite(v) for v in out):
        raise NonFiniteLossError(f"the closure returned a non-finite loss ({out}); parameters were restored")
    return out


def _as_float(value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"the closure must return a scalar loss, got {type(value).__name__}")


def mean_loss(values: Sequence[float]) -> float:
    """The loss of several equal-size micro-batches: the correctly rounded sum of their losses (``math.fsum``, which
    does not depend on their order) over their count. One value is returned as it is."""
    return math.fsum(values) / len(values)
