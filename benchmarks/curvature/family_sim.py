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

from fmnist_lab import masks_below, sparse_thresholds  # noqa: E402  (round 1's masks are the lab's)

import hiso_kernels as hk  # noqa: E402
from hiso.fl.experiment import Setup, build  # noqa: E402
from hiso.fl.protocol import FLConfig, Replica  # noqa: E402
from hiso.fl.simulation import SimulationConfig, run  # noqa: E402
from hiso.optim.estimate import NonFiniteLossError, scalars_from_losses  # noqa: E402

FAMILIES = ("full", "sparse")
#: Sparse-MeZO's share of each matrix left out of the direction (the lab's CNN study used the same, section 4)
DEFAULT_SPARSITY = 0.75


class FamilyReplica(Replica):
    """A DeComFL replica whose directions come from a family: the library's round loop
    (``hiso.fl.simulation.run(replica_factory=...)``) asks it for its clients' scalars (``run_local_steps``) and has
    it apply the records (``apply``). ``full`` is the library's replica unchanged. For ``sparse`` the masks belong to
    the model the replica holds: made at the round's first probe from the current weights and kept until a record
    is applied, so every client's probes and the update use the same z_p."""

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
        self.first_mask_fraction: float | None = None  # the share of matrix entries the first round moves
        self._masks_at = -1  # the number of applied records the masks belong to
        self._z: dict[tuple[int, int], list[torch.Tensor]] = {}  # the round's directions, drawn once
        # Sparse-MeZO's per-layer thresholds, fixed from the initial weights (every replica holds them); the mask is
        # recomputed from the current weights each round, as the paper's on-the-fly mask (one comparison per entry,
        # not a selection: 0.5 s a round on SmolLM2-135M on 2 busy cores, against 4.3 s for a selection per round)
        self.thresholds = sparse_thresholds(self.params, sparsity) if family == "sparse" else None

    def _current_masks(self) -> list[torch.Tensor | None]:
        if self._masks_at != self.applied:
            self.masks, self._masks_at, self._z = masks_below(self.params, self.thresholds), self.applied, {}
            if self.first_mask_fraction is None:
                kept = [m for m in self.masks if m is not None]
                self.first_mask_fraction = sum(float(m.sum()) for m in kept) / sum(m.numel() for m in kept)
        assert self.masks is not None
        return self.masks

    def direction(self, seed: int, p: int) -> list[torch.Tensor]:
        """z_p per tensor (float32): u(seed, p) with each tensor's global offset, times the matrix masks."""
        masks = self._current_masks()
        if (seed, p) not in self._z:
            z = []
            for t, off, m in zip(self.params, self.offsets, masks):
                u = hk.directions(seed, t.numel(), direction=p, offset=off, distribution=self.config.distribution,
                                  device=t.device).view_as(t)
                z.append(u if m is None else u * m)
            self._z[(seed, p)] = z
        return self._z[(seed, p)]

    @torch.no_grad()
    def run_local_steps(self, seeds: Sequence[int], next_batch) -> tuple[tuple, tuple | None, float]:
        """The client's (scalars, None, loss) of its one local step along the round's directions; the parameters
        come back exactly."""
        if self.family == "full":
            return super().run_local_steps(seeds, next_batch)
        c = self.config
        (seed,) = seeds
        closure = next_batch()
        central = c.difference == "central"
        x0 = [t.detach().clone() for t in self.params]
        losses = [] if central else [_loss(closure)]
        try:
            for p in range(c.num_directions):
                z = self.direction(int(seed), p)
                for sign in ((1.0, -1.0) if central else (1.0,)):
                    for t, x, zt in zip(self.params, x0, z):
                        t.copy_(x).add_(zt, alpha=sign * c.mu)
                    losses.append(_loss(closure))
        finally:
            for t, x in zip(self.params, x0):
                t.copy_(x)
        est = scalars_from_losses(losses, mu=c.mu, num_directions=c.num_directions, central=central,
                                  with_f0=not central)
        return (tuple(est.scalars),), None, est.loss

    @torch.no_grad()
    def apply(self, records: Sequence) -> None:
        if self.family == "full":
            return super().apply(records)
        if len(records) != 1:  # one shared model: the round just closed is the only record not yet applied
            raise ValueError("the family simulation applies one record per round")
        (record,) = records
        ((seed,), (scalars,)) = record.seeds, record.scalars
        for p, s in enumerate(scalars):
            a = self.config.lr * s / len(scalars)
            for t, zt in zip(self.params, self.direction(seed, p)):
                t.sub_(zt, alpha=a)
        self.applied += 1


def _loss(closure) -> float:
    value = float(closure())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"non-finite loss {value}")
    return value


def run_family(config: SimulationConfig, family: str, *, sparsity: float = DEFAULT_SPARSITY,
               setup: Setup | None = None, on_eval: Callable[[dict], None] | None = None) -> list[dict]:
    """``hiso.fl.simulation.run`` for method decomfl with the family's directions; the same metrics rows (for
    sparse, the first row after round 0 also holds ``mask_fraction``: the share of matrix entries round 1 moved)."""
    if config.method != "decomfl":  # before the model is loaded
        raise ValueError("the family simulation runs DeComFL's step (method decomfl)")
    replicas: list[FamilyReplica] = []

    def factory(params, fl: FLConfig) -> FamilyReplica:
        replicas.append(FamilyReplica(params, fl, family, sparsity))
        return replicas[-1]

    rows = run(config, setup=setup or build(config), on_eval=on_eval, replica_factory=factory)
    fraction = replicas[0].first_mask_fraction
    if fraction is not None and len(rows) > 1:
        rows[1]["mask_fraction"] = fraction
    return rows


__all__ = ["DEFAULT_SPARSITY", "FAMILIES", "FamilyReplica", "run_family"]
