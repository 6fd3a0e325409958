"""The library's federated simulation with a reduced-dimension direction family (issue 15): DeComFL's step along
Sparse-MeZO directions on any task of the library, the lab's way to try a family on an LLM before it goes into
the kernels.

Everything but the directions is the library's: ``hiso.fl.simulation.build`` (task, model, clients' partitions,
evaluation batches), the clients' batch streams, the protocol's ``Server`` (deterministic experiment keys, client
sampling, seeds, reply validation, norm clipping, aggregation, float32 records, journal) and ``RunMetrics``. Round r
(K = 1 local step, as in the SST-2 study):

1. the replica computes the round's masks from the parameters every replica holds (Sparse-MeZO, Liu et al., arXiv
   2402.15751: m_ij = 1 where |x_ij| <= h_i, the per-matrix threshold h_i the ``1 - sparsity`` quantile of the
   initial weights' magnitudes, so about that fraction of each matrix moves; vectors keep the full direction), so
   z_p = m * u(seed, p) is regenerated from the seed and the shared model, nothing more;
2. each sampled client draws its next batch, evaluates f(x + mu z_p) and f(x - mu z_p) (central; forward: f(x) and
   f(x + mu z_p)), brings x back exactly, and replies its P float32 scalars in the library's ``ClientReply`` (the
   reply's bytes are DeComFL's);
3. the server aggregates and journals; every replica applies x <- x - sum_p (lr c_p / P) z_p.

Family ``full`` (z_p = u(seed, p), through the library's ``estimate_scalars`` and ``Replica.apply``) equals
``hiso.fl.simulation.run`` with method ``decomfl`` bit for bit (``tests/test_family_sim.py``): the check that the loop
around the probes is the library's. ``sparse`` computes its probes and update in PyTorch (float32, masked
materialised directions): deterministic, not bit-identical to a kernel (none exists yet; the issue puts a family
in the kernels only once it is chosen). With sparsity 0 it equals ``full`` to float32 rounding (tested).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fmnist_lab import sparse_masks  # noqa: E402  (the thresholds: the first round's masks are the lab's)

import hiso_kernels as hk  # noqa: E402
from hiso.fl import messages  # noqa: E402
from hiso.fl.experiment import Setup, build, client_streams  # noqa: E402
from hiso.fl.metrics import RunMetrics  # noqa: E402
from hiso.fl.protocol import FLConfig, Replica  # noqa: E402
from hiso.fl.simulation import SimulationConfig, _eval_point  # noqa: E402
from hiso.optim.estimate import NonFiniteLossError, estimate_scalars, scalars_from_losses  # noqa: E402

FAMILIES = ("full", "sparse")
#: Sparse-MeZO's share of each matrix left out of the direction (the lab's CNN study used the same, section 4)
DEFAULT_SPARSITY = 0.75


class FamilyReplica(Replica):
    """A DeComFL replica whose directions come from a family; ``begin_round`` fixes the round's masks from the
    parameters before any probe, so clients and the update use the same z_p."""

    def __init__(self, params, config: FLConfig, family: str, sparsity: float = DEFAULT_SPARSITY):
        if config.method != "decomfl":
            raise ValueError("the family simulation runs DeComFL's step (method decomfl)")
        if config.local_steps != 1:
            raise ValueError("the family simulation runs K = 1 local step")
        if family not in FAMILIES:
            raise ValueError(f"unknown direction family {family!r}; known: {', '.join(FAMILIES)}")
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
        if family != "full" and config.weight_decay != 0:
            raise ValueError("the sparse family's update has no weight decay term (the studies run without)")
        super().__init__(params, config)
        self.family, self.sparsity = family, sparsity
        self.offsets = hk.global_offsets(self.params)
        self.masks: list[torch.Tensor | None] | None = None
        self._z: dict[tuple[int, int], list[torch.Tensor]] = {}  # the round's directions, drawn once
        # Sparse-MeZO's per-layer thresholds, fixed from the initial weights (every replica holds them); the mask is
        # recomputed from the current weights each round, as the paper's on-the-fly mask (one comparison per entry,
        # not a selection: 0.5 s a round on SmolLM2-135M on 2 busy cores, against 4.3 s for a selection per round)
        self.thresholds = ([None if m is None else _kth_abs(t, m) for t, m in
                            zip(self.params, sparse_masks(self.params, sparsity))] if family == "sparse" else None)

    def begin_round(self) -> None:
        self._z = {}
        if self.thresholds is None:
            self.masks = None
            return
        self.masks = [None if h is None else (t.detach().abs() <= h).to(t.dtype)
                      for t, h in zip(self.params, self.thresholds)]

    def mask_fraction(self) -> float | None:
        """The share of matrix entries the round's directions move (None for ``full``)."""
        if self.masks is None:
            return None
        kept = [m for m in self.masks if m is not None]
        return sum(float(m.sum()) for m in kept) / sum(m.numel() for m in kept)

    def direction(self, seed: int, p: int) -> list[torch.Tensor]:
        """z_p per tensor (float32): u(seed, p) with each tensor's global offset, times the matrix masks."""
        assert self.masks is not None, "begin_round first"
        if (seed, p) in self._z:
            return self._z[(seed, p)]
        out = []
        for t, off, m in zip(self.params, self.offsets, self.masks):
            u = hk.directions(seed, t.numel(), direction=p, offset=off, distribution=self.config.distribution,
                              device=t.device).view_as(t)
            out.append(u if m is None else u * m)
        self._z[(seed, p)] = out
        return out

    @torch.no_grad()
    def probe(self, closure: Callable[[], torch.Tensor], seed: int) -> tuple[list[float], float]:
        """(c_1..c_P, the step's loss) along the round's directions; the parameters come back exactly."""
        c = self.config
        if self.family == "full":
            est = estimate_scalars(closure, self.params, None, seed, mu=c.mu, num_directions=c.num_directions,
                                   difference=c.difference, distribution=c.distribution,
                                   stochastic_rounding=c.stochastic_rounding, backend=c.backend)
            return list(est.scalars), est.loss
        central = c.difference == "central"
        x0 = [t.detach().clone() for t in self.params]
        losses = [] if central else [_loss(closure)]
        try:
            for p in range(c.num_directions):
                z = self.direction(seed, p)
                for sign in ((1.0, -1.0) if central else (1.0,)):
                    for t, x, zt in zip(self.params, x0, z):
                        t.copy_(x).add_(zt, alpha=sign * c.mu)
                    losses.append(_loss(closure))
        finally:
            for t, x in zip(self.params, x0):
                t.copy_(x)
        est = scalars_from_losses(losses, mu=c.mu, num_directions=c.num_directions, central=central,
                                  with_f0=not central)
        return list(est.scalars), est.loss

    @torch.no_grad()
    def apply(self, records: Sequence) -> None:
        if self.family == "full":
            return super().apply(records)
        if len(records) != 1:  # one shared model: the round just closed is the only record not yet applied
            raise ValueError("the family simulation applies one record per round")
        (record,) = records
        c = self.config
        ((seed,), (scalars,)) = record.seeds, record.scalars
        for p, s in enumerate(scalars):
            a = c.lr * s / len(scalars)
            for t, zt in zip(self.params, self.direction(seed, p)):
                t.sub_(zt, alpha=a)
        self.applied += 1


def _kth_abs(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The largest |x| inside ``mask`` (the lab's threshold: the mask is exactly |x| <= it); infinity for a full
    mask (sparsity 0: every entry moves in every round, also one that grows past the initial maximum)."""
    if bool(mask.all()):
        return torch.tensor(math.inf, dtype=t.dtype, device=t.device)
    return t.detach().abs()[mask.bool()].max()


def _loss(closure) -> float:
    value = float(closure())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite loss {value}")
    return value


def run_family(config: SimulationConfig, family: str, *, sparsity: float = DEFAULT_SPARSITY,
               setup: Setup | None = None, on_eval: Callable[[dict], None] | None = None) -> list[dict]:
    """``hiso.fl.simulation.run`` for method decomfl with the family's directions; the same metrics rows (plus
    ``mask_fraction`` for sparse)."""
    if config.method != "decomfl":
        raise ValueError("the family simulation runs DeComFL's step (method decomfl)")
    setup = setup or build(config)
    model = setup.model
    streams = client_streams(config, setup)
    replica = FamilyReplica(model.parameters(), config.fl_config(), family, sparsity)
    server = config.make_server(replica)
    metrics = RunMetrics(config.method)
    rows: list[dict] = []

    def evaluate(rnd: int, **extra) -> None:
        res = setup.task.evaluate(model, setup.eval_batches)
        rows.append(metrics.row(rnd, res.accuracy, res.loss, **extra))
        if on_eval:
            on_eval(rows[-1])

    evaluate(0)
    pending: dict = {}
    for rnd in range(1, config.rounds + 1):
        replica.begin_round()
        note: dict = {"bytes_up": 0, "bytes_down": 0, "losses": [], "batches": {}}
        for assignment in server.begin_round():
            note["bytes_down"] += len(assignment.encode())
            closure = streams[assignment.client].next_closure(model)
            note["batches"][str(assignment.client)] = 1
            try:
                scalars, loss = replica.probe(closure, int(assignment.seeds[0]))
            except NonFiniteLossError as exc:  # e.g. after divergence: this client sends nothing (as the library)
                server.record_failure(assignment.client, str(exc))
                continue
            reply = messages.ClientReply(assignment.round, assignment.client, (tuple(scalars),)).encode()
            note["bytes_up"] += len(reply)
            server.submit(reply, sender=assignment.client)
            note["losses"].append(float(loss))
        record = server.end_round(note)
        metrics.bytes_up += note["bytes_up"]
        metrics.bytes_down += note["bytes_down"]
        for loss in note["losses"]:
            metrics.add_train_loss(loss)
        if rnd == 1 and replica.masks is not None:
            pending["mask_fraction"] = replica.mask_fraction()  # on the next evaluation row (no extra evaluation)
        if record is None and not all(bool(torch.isfinite(p).all()) for p in replica.params):
            evaluate(rnd, diverged=True, **pending)
            break
        if _eval_point(config, rnd):
            evaluate(rnd, **pending)
            pending = {}
    return rows


__all__ = ["DEFAULT_SPARSITY", "FAMILIES", "FamilyReplica", "run_family"]
