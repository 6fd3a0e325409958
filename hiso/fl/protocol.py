"""Scalar-only federated zeroth-order training: the DeComFL framework (arXiv 2405.15861) with HiSo's curvature
(arXiv 2506.02370) on top.

Round r (``docs/architecture.md`` walks through it with the code):
1. The server samples m of n clients and draws K seeds, a keyed PRF of (its secret run key, round)
   (:mod:`hiso.fl.keys`; only the server chooses seeds).
2. Each sampled client catches up: it replays every round it missed from the log, x and H, in one fused pass.
3. It runs K local ZO steps on its own data with the round's seeds and returns its K x P scalars.
4. The server (:mod:`hiso.fl.server`) validates the replies, aggregates the scalars per (k, p) (trimmed mean by
   default, coordinate median or mean; :mod:`hiso.fl.robust`), journals (seeds, aggregated scalars) and applies:
       x <- x - sum_k sum_p (lr c[k,p] / P) z_{k,p} - K lr wd x,      z_{k,p} = u(seed_k, p) / sqrt(H)
       H <- max(beta H + (1 - beta) v, h_min)  from the last local step's aggregated scalars (HiSo)
   (the curvature rules, some with a global or per-tensor h kept as Python floats: :mod:`hiso.optim.curvature`)
   Every replica (server model, clients, a fresh replica replaying the log) applies the same records with the same
   kernels, so they hold the same bits.

The log is the model: the initial weights plus the records determine every later model, so a server checkpoint is
its journal (:mod:`hiso.fl.journal`: configuration, keys and records, a few kilobytes, checksummed and fsync'd each
round), and a crashed server resumes exactly from it (:meth:`hiso.fl.server.Server.resume`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

import hiso_kernels as hk

from ..optim import curvature as curv
from ..optim.estimate import bind_runs, estimate_scalars
from ..optim.layout import split_runs
from ..optim.update import check_curvature_rule, needs_second_differences, step_round
from .messages import ClientReply, RoundAssignment, RoundRecord

log = logging.getLogger("hiso.fl")

class DivergedError(ValueError):
    """Applying records left a non-finite curvature estimate H: the model cannot train on (the log is intact)."""


@dataclasses.dataclass(frozen=True)
class FLConfig:
    """Hyperparameters shared by the server and every client (exchanged once, out of band)."""

    method: str = "hiso"  # "hiso" (curvature-scaled directions) or "decomfl" (H = 1)
    lr: float = 1e-3
    mu: float = 1e-3
    local_steps: int = 1  # K
    num_directions: int = 5  # P
    difference: str = "central"
    distribution: str = "gaussian"
    curvature_rule: str = "gsq"  # HiSo's rule; "stein", "stein-tensor", the absdelta rules send Delta_p too
    beta: float | None = None  # None: the rule's default (hiso.optim.curvature.DEFAULT_BETA)
    h_min: float = 1e-8
    weight_decay: float = 0.0
    stochastic_rounding: bool = False
    backend: str | None = None
    h_init: str | None = None  # "ones" or "first-round"; None: the rule's default
    #: deprecated name of ``curvature_rule`` (constructor only)
    curvature: dataclasses.InitVar[str | None] = None

    def __post_init__(self, curvature):
        if curvature is not None:
            warnings.warn("FLConfig(curvature=) is deprecated; use curvature_rule=", DeprecationWarning, stacklevel=3)
            object.__setattr__(self, "curvature_rule", curvature)
        if self.method not in ("hiso", "decomfl"):
            raise ValueError(f"method must be 'hiso' or 'decomfl', got {self.method!r}")
        if not (1 <= self.local_steps <= 255 and 1 <= self.num_directions <= 255):
            raise ValueError("local_steps and num_directions must be in [1, 255]")
        check_curvature_rule(self.curvature_rule, self.difference, self.h_init)
        if self.beta is None:
            object.__setattr__(self, "beta", curv.DEFAULT_BETA[self.curvature_rule])
        if self.h_init is None:
            object.__setattr__(self, "h_init", curv.DEFAULT_H_INIT[self.curvature_rule])
        for name in ("lr", "mu", "beta", "h_min", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.mu <= 0 or self.h_min <= 0 or self.beta > 1:
            raise ValueError("mu and h_min must be > 0 and beta <= 1")

    @property
    def uses_hessian(self) -> bool:
        return self.method == "hiso"

    @property
    def kernel_rule(self) -> str:
        """The kernels' curvature rule of a round: HiSo's rule, or "none" (DeComFL: H = 1, no H update)."""
        return curv.kernel_rule_of(self.curvature_rule) if self.uses_hessian else "none"

    @property
    def sends_second_differences(self) -> bool:
        return self.uses_hessian and needs_second_differences(self.curvature_rule)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FLConfig:
        values = json.loads(text)
        if "curvature" in values:  # written before 0.2
            values["curvature_rule"] = values.pop("curvature")
        return cls(**values)


def record_round(config: FLConfig, record: RoundRecord, *, kernel_rule: str | None = None,
                 divisor: float = 1.0) -> hk.Round:
    """The kernel round of a log record (:func:`hiso.optim.update.step_round`), the same for every replica.
    ``kernel_rule`` and ``divisor`` come from the replica's curvature state (default: the config's rule, 1)."""
    return step_round(record.seeds, record.scalars, lr=config.lr, weight_decay=config.weight_decay,
                      curvature_rule=config.kernel_rule if kernel_rule is None else kernel_rule,
                      second_differences=record.second_differences, divisor=divisor)


def _last_step(record: RoundRecord):
    second = record.second_differences
    return record.seeds[-1], record.scalars[-1], (None if second is None else second[-1])


class Replica:
    """A model's trainable parameters and H, and how far along the log they are (server, clients, checkers).

    ``curvature`` (HiSo only) is the rule's Python state (:class:`hiso.optim.curvature.CurvatureState`): a global or
    per-tensor h for "scalar", "absdelta", "stein-tensor", the round count for ``h_init``. ``hessian`` is None for
    DeComFL and for the absdelta rules (whose h divides the step instead of scaling the directions)."""

    def __init__(self, params: Iterable[torch.Tensor], config: FLConfig):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.config = config
        self.curvature = (curv.CurvatureState(config.curvature_rule, [p.numel() for p in self.params],
                                              beta=config.beta, h_min=config.h_min, h_init=config.h_init,
                                              distribution=config.distribution)
                          if config.uses_hessian else None)
        self.hessian = ([torch.ones(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
                        if config.uses_hessian and curv.uses_tensor_h(config.curvature_rule) else None)
        self.applied = 0  # number of log records applied

    def divisor(self) -> float:
        """The step divisor of the rounds applied so far (1 unless the rule divides the step by its h; with a
        curvature-first rule the next round divides by the h after its own update)."""
        return 1.0 if self.curvature is None else self.curvature.divisor()

    @torch.no_grad()
    def apply(self, records: Sequence[RoundRecord]) -> None:
        """Apply records (in order): one fused pass over the parameters per run of records with no H write
        between them (all of them for DeComFL, gsq, stein and the absdelta rules after the first round)."""
        if not records:
            return
        c = self.config
        kw: dict[str, Any] = dict(beta=c.beta, h_min=c.h_min, distribution=c.distribution,
                                  stochastic_rounding=c.stochastic_rounding, backend=c.backend, check_hessian=False)
        if self.curvature is None:
            hk.replay_(self.params, [record_round(c, r) for r in records], hessian=None, curvature_rule="none", **kw)
        else:
            state = copy.deepcopy(self.curvature)  # kept only when every segment applied
            for seg in curv.plan(state, records, _last_step):
                rounds = [record_round(c, r, kernel_rule=seg.kernel_rule, divisor=dv) for r, dv in seg.items]
                hk.replay_(self.params, rounds, hessian=self.hessian, curvature_rule=seg.kernel_rule, **kw)
                if seg.fill is not None and self.hessian is not None:
                    curv.fill_hessian(self.hessian, seg.fill)
            self.curvature = state
        self.applied += len(records)
        # the kernels skip their H checks on this hot path (check_hessian=False); one cheap pass keeps a NaN or an
        # infinity in H from spreading silently through every later round
        if self.hessian is not None and not all(bool(torch.isfinite(h).all()) for h in self.hessian):
            raise DivergedError(f"H is not finite after applying records up to {self.applied}")

    def load_curvature(self, saved: dict | None, records: Sequence[RoundRecord]) -> None:
        """Restore the rule's Python state from a snapshot (``CurvatureState.to_dict``), or, for a snapshot written
        before it was saved, recompute it from the ``records`` the snapshot's parameters have applied."""
        if self.curvature is None:
            return
        if saved is not None:
            self.curvature.load_dict(saved)
            return
        state = curv.CurvatureState(self.config.curvature_rule, [p.numel() for p in self.params],
                                    beta=self.config.beta, h_min=self.config.h_min, h_init=self.config.h_init,
                                    distribution=self.config.distribution)
        curv.plan(state, records, _last_step)
        self.curvature = state

    def run_local_steps(self, seeds: Sequence[int], next_batch) -> tuple[tuple, tuple | None, float]:
        """This replica's K local steps from its current x (:func:`run_local_steps`)."""
        return run_local_steps(self, seeds, next_batch)

    def state_bits(self) -> list[torch.Tensor]:
        out = [p.detach().clone() for p in self.params] + ([h.clone() for h in self.hessian] if self.hessian else [])
        if self.curvature is not None and self.curvature.rule in curv.SCALAR_STATE_RULES:
            out.append(torch.tensor(self.curvature.h, dtype=torch.float64))
        return out


class Client:
    """A client with its model resident in memory: catches up by one-pass replay, runs K local steps, replies.

    ``batches()`` returns the closure of the client's next local batch (a zero-argument callable returning the loss
    of the replica's model on that batch; it must not call backward).
    """

    def __init__(self, client_id: int, replica: Replica, batches: Callable[[], Callable[[], torch.Tensor]], *,
                 data_state=None):
        self.id = int(client_id)
        self.replica = replica
        self.next_batch = batches
        #: optional object with ``state_dict()`` / ``load_state_dict(d)`` (e.g. a BatchStream): where the client is
        #: in its data, saved with the model by the Flower node store so a restarted process reads on from there
        self.data_state = data_state

    @torch.no_grad()
    def handle(self, assignment: RoundAssignment) -> ClientReply:
        if assignment.client != self.id:
            raise ValueError(f"assignment for client {assignment.client} sent to client {self.id}")
        self.replica.apply(assignment.catch_up)
        if self.replica.applied != assignment.round:
            raise ValueError(f"client {self.id} is at round {self.replica.applied} after catch-up, "
                             f"the assignment is for round {assignment.round}")
        scalars, second, _ = run_local_steps(self.replica, assignment.seeds, self.next_batch)
        return ClientReply(assignment.round, self.id, scalars, second)


def run_local_steps(replica: Replica, seeds: Sequence[int], next_batch) -> tuple[tuple, tuple | None, float]:
    """K local ZO steps from the replica's current x, returning (scalars, second differences or None, mean loss);
    x and H come back exactly.

    Local updates between steps (K > 1) are applied by the kernels' logged run (exact restore in the kernel,
    :func:`hiso_kernels.bind`) and reverted in reverse order afterwards, so the replica stays at the last applied
    log record (it will apply the aggregated round like everyone else). A local update is divided by the rule's
    divisor of a local copy of the curvature state (:meth:`hiso.optim.curvature.CurvatureState.step_divisor`).
    """
    c = replica.config
    params, hessian = replica.params, replica.hessian
    local_curvature = None  # the local steps' copy of the curvature state, made at the first local update (K > 1)
    scalars, second, undo, losses = [], [], [], []
    bounds: list[hk.BoundParams] = []  # bound at the first local update (K > 1 only)
    try:
        for k, seed in enumerate(seeds):
            est = estimate_scalars(
                next_batch(), params, hessian, int(seed), mu=c.mu, num_directions=c.num_directions,
                difference=c.difference, with_f0=c.sends_second_differences, distribution=c.distribution,
                stochastic_rounding=c.stochastic_rounding, backend=c.backend,
            )
            scalars.append(tuple(est.scalars))
            losses.append(est.loss)
            if c.sends_second_differences:
                assert est.second_differences is not None  # with_f0 and central differences give them
                second.append(tuple(est.second_differences))
            if k < len(seeds) - 1:
                # the local update of step k (no weight decay, no H update: those come with the aggregated round)
                if local_curvature is None and replica.curvature is not None:
                    local_curvature = copy.deepcopy(replica.curvature)
                divisor = 1.0 if local_curvature is None else local_curvature.step_divisor(
                    int(seed), est.scalars, est.second_differences)
                coefs = list(step_round([int(seed)], [est.scalars], lr=c.lr, divisor=divisor).coefficients)
                if not bounds:
                    bounds = bind_runs(params, hessian, split_runs(params, hk.global_offsets(params)),
                                       distribution=c.distribution, stochastic_rounding=c.stochastic_rounding,
                                       backend=c.backend)
                terms = ([int(seed)] * len(coefs), list(range(len(coefs))))
                revert = hk.Round(*terms, [-a for a in coefs])
                for b in bounds:
                    log_k = b.apply_logged(b.program([hk.Round(*terms, coefs), revert], "none"), 1)
                    undo.append((b, revert, log_k))
    finally:
        for b, revert, log_k in reversed(undo):
            b.finish_logged(b.program([revert], "none"), log_k, 1)  # the revert and the restore in one pass
    return tuple(scalars), (tuple(second) if c.sends_second_differences else None), sum(losses) / len(losses)


def local_steps(replica: Replica, seeds: Sequence[int], next_batch) -> tuple[tuple, tuple | None, float]:
    """Deprecated name of :func:`run_local_steps`."""
    warnings.warn("hiso.fl.local_steps is deprecated; use run_local_steps", DeprecationWarning, stacklevel=2)
    return run_local_steps(replica, seeds, next_batch)


def __getattr__(name: str):
    """``Server`` and ``AGGREGATIONS`` moved to :mod:`hiso.fl.server` (still importable from here)."""
    if name in ("Server", "AGGREGATIONS"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
