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

from .exact_restore import DEFAULT_CHUNK
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
    bounds = bind_runs(params, hessian, runs, distribution=distribution, stochastic_rounding=stochastic_rounding,
                       backend=backend)
    est, pending = evaluate_step(closure, bounds, seed, mu=mu, num_directions=num_directions, difference=difference,
                                 with_f0=with_f0, exact_restore=exact_restore, restore_chunk=restore_chunk,
                                 exchange=exchange)
    pending.restore()
    return est


def bind_runs(params, hessian, runs: Sequence[Run], **settings) -> list[hk.BoundParams]:
    """One :func:`hiso_kernels.bind` per kernel run (the validation of a step's tensors, done once)."""
    return [hk.bind(params[r.start:r.stop], hessian=None if hessian is None else hessian[r.start:r.stop],
                    offset=r.offset, check_hessian=False, **settings) for r in runs]


def evaluate_step(closure: Closure, bounds: Sequence[hk.BoundParams], seed: int, *, mu: float, num_directions: int,
                  difference: str = "central", with_f0: bool = False, exact_restore: bool = True,
                  restore_chunk: int = DEFAULT_CHUNK, exchange: Exchange | None = None) -> tuple[Estimate, Pending]:
    """:func:`estimate_scalars` on bound runs, with the last direction's perturbation still in place: the caller
    undoes it with ``pending.restore()`` or fuses the undo with the update (``pending.finish``). If anything
    raises, the parameters are restored first."""
    central = difference == "central"
    with_f0 = with_f0 or not central
    try:
        local, undo, pending = _evaluate_chain(closure, bounds, seed, mu=mu, num_directions=num_directions,
                                               central=central, with_f0=with_f0, strict=exchange is None,
                                               exact_restore=exact_restore, restore_chunk=restore_chunk)
    except Exception:
        if exchange is not None:
            exchange.abort()  # the other ranks raise too instead of waiting for this rank's losses
        raise
    try:
        losses = exchange(local) if exchange is not None else [mean_loss(v) for v in local]
        est = scalars_from_losses(losses, mu=mu, num_directions=num_directions, central=central, with_f0=with_f0,
                                  undo_elements=undo)
    except BaseException:
        pending.restore()
        raise
    return est, pending


class Pending:
    """One direction's perturbation of every run, with what is left to undo it: the remaining perturbation sizes
    (each +alpha z_p) and, with exact restore, each run's undo log (:meth:`hiso_kernels.BoundParams.apply_logged`).

    The logged run applies the first size and simulates the whole chain in registers, in the same pass
    (``docs/kernels.md``, "Exact restore in the kernel"): the log holds only the elements the chain will not bring
    back, with their original bits.
    """

    def __init__(self, bounds: Sequence[hk.BoundParams], seed: int, p: int, chain: Sequence[float], exact: bool,
                 chunk: int):
        self._bounds = list(bounds)
        self._seed, self._p = seed, p
        self._remaining = list(chain[1:])
        self.logs: list = []  # one per run perturbed so far (None without exact restore)
        self.closed = False
        try:
            for b in self._bounds:
                if exact:
                    self.logs.append(b.apply_logged(b.shift_program(seed, p, chain), 1, chunk))
                else:
                    b.apply(b.shift_program(seed, p, chain[:1]))
                    self.logs.append(None)
        except BaseException:
            self.restore()  # the runs already perturbed
            raise

    @property
    def undo_elements(self) -> int:
        return sum(log.numel for log in self.logs if log is not None)

    def _rounds(self, alphas) -> list[hk.Round]:
        """x <- x + alpha z_p for each alpha, one round each (one pass); they read H and never write it."""
        return [hk.Round([self._seed], [self._p], [-a], update_hessian=False) for a in alphas]

    def shift(self, alphas: Sequence[float]) -> None:
        """Apply the next perturbations of the chain (``alphas`` must be its next sizes) in one pass per run."""
        if list(alphas) != self._remaining[:len(alphas)]:
            raise ValueError(f"the chain continues with {self._remaining}, not {list(alphas)}")
        for b in self._bounds[:len(self.logs)]:
            b.apply(b.shift_program(self._seed, self._p, alphas))
        del self._remaining[:len(alphas)]

    def restore(self) -> None:
        """Bring every perturbed run back to its exact bits: the rest of the chain in one pass, then the log."""
        self.finish(None)

    def finish(self, updates: Sequence[Sequence[hk.Round]] | None) -> None:
        """Undo the perturbation and apply ``updates[i]`` (rounds of run i's binding) in the same pass: the result
        equals, bit for bit, restoring and then updating (:meth:`hiso_kernels.BoundParams.finish_logged`: on the CPU
        the pass puts the logged elements' original bits in before the update's rounds; elsewhere the originals are
        advanced through the update first). ``None``: restore only."""
        if self.closed:
            return
        self.closed = True
        for i, (b, log) in enumerate(zip(self._bounds, self.logs)):
            extra = list(updates[i]) if updates is not None else []
            if extra:
                program = b.program(self._rounds(self._remaining) + extra)
            elif self._remaining:
                program = b.shift_program(self._seed, self._p, self._remaining)
            else:
                program = None
            if log is None:
                if program is not None:
                    b.apply(program)
            elif program is None:
                log.restore()
            else:  # one pass: the chain's rest, the logged elements' original bits, then the update
                b.finish_logged(program, log, len(self._remaining))


def _evaluate_chain(closure, bounds, seed, *, mu, num_directions, central, with_f0, strict, exact_restore,
                    restore_chunk) -> tuple[list[list[float]], int, Pending]:
    """The losses in evaluation order: [f(x)] if ``with_f0``, then per direction f(x + mu z_p) and (central)
    f(x - mu z_p); returns them, the undo-log sizes and the last direction's :class:`Pending` undo.

    The central chain is +mu, eval, (-mu, -mu), eval, +mu: the middle two perturbations run as two rounds of one
    fused pass, so it costs three passes like MeZO's +mu, -2mu, +mu, but every perturbation is undone by its own
    opposite. That matters: in fp32 the chain +mu, -2mu, +mu leaves about half of the elements one ulp off, the
    paired chain a few percent (benchmarks/restore_drift.py). With exact restore those few are written back from
    the undo log that the first pass recorded, and the parameters return to their exact bits, also when the closure
    fails. The last restore is left to the caller, to be fused with the update."""

    def evaluate():
        values = evaluate_loss(closure, strict=strict)
        if out and len(values) != len(out[0]):
            raise ValueError(f"the closure returned {len(values)} losses, earlier in this step {len(out[0])}")
        out.append(values)

    out: list[list[float]] = []
    undo = 0
    if with_f0:
        evaluate()
    chain = [mu, -mu, -mu, mu] if central else [mu, -mu]
    for p in range(num_directions):
        pending = Pending(bounds, seed, p, chain, exact_restore, restore_chunk)
        undo += pending.undo_elements
        try:
            evaluate()
            if central:
                pending.shift([-mu, -mu])
                evaluate()
        except BaseException:
            pending.restore()
            raise
        if p < num_directions - 1:
            pending.restore()
    return out, undo, pending


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
