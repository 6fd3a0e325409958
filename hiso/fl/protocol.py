"""Scalar-only federated zeroth-order training: the DeComFL framework (arXiv 2405.15861) with HiSo's curvature
(arXiv 2506.02370) on top.

Round r (``docs/architecture.md`` walks through it with the code):
1. The server samples m of n clients and draws K seeds from a cryptographic source (only the server chooses seeds).
2. Each sampled client catches up: it replays every round it missed from the log, x and H, in one fused pass.
3. It runs K local ZO steps on its own data with the round's seeds and returns its K x P scalars.
4. The server validates the replies, aggregates the scalars per (k, p) (mean, coordinate median or trimmed mean),
   appends (seeds, aggregated scalars) to its log and applies the round:
       x <- x - sum_k sum_p (lr c[k,p] / P) z_{k,p} - K lr wd x,      z_{k,p} = u(seed_k, p) / sqrt(H)
       H <- max(beta H + (1 - beta) v, h_min)  from the last local step's aggregated scalars (HiSo)
   Every replica (server model, clients, a fresh replica replaying the log) applies the same records with the same
   kernels, so they hold the same bits.

The log is the model: the initial weights plus the records determine every later model, so a server checkpoint is
its configuration and records (a few kilobytes), and a crashed server resumes exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import secrets
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence

import torch

import hiso_kernels as hk
from hiso_kernels import spec

from ..optim.estimate import estimate_scalars
from ..optim.exact_restore import perturb_with_undo
from ..optim.update import check_curvature_rule, needs_second_differences, step_round
from .messages import ClientReply, RoundAssignment, RoundRecord, is_finite_block

log = logging.getLogger("hiso.fl")

AGGREGATIONS = ("mean", "median", "trimmed_mean")


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
    curvature_rule: str = "gsq"  # HiSo's rule; "stein" sends second differences too
    beta: float = 0.95
    h_min: float = 1e-8
    weight_decay: float = 0.0
    stochastic_rounding: bool = False
    backend: str | None = None
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
        check_curvature_rule(self.curvature_rule, self.difference)
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
        return self.curvature_rule if self.uses_hessian else "none"

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


def record_round(config: FLConfig, record: RoundRecord) -> hk.Round:
    """The kernel round of a log record (:func:`hiso.optim.update.step_round`), the same for every replica."""
    return step_round(record.seeds, record.scalars, lr=config.lr, weight_decay=config.weight_decay,
                      curvature_rule=config.kernel_rule, second_differences=record.second_differences)


class Replica:
    """A model's trainable parameters and H, and how far along the log they are (server, clients, checkers)."""

    def __init__(self, params: Iterable[torch.Tensor], config: FLConfig):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.config = config
        self.hessian = ([torch.ones(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
                        if config.uses_hessian else None)
        self.applied = 0  # number of log records applied

    @torch.no_grad()
    def apply(self, records: Sequence[RoundRecord]) -> None:
        """Apply records (in order) in one fused pass over the parameters."""
        if not records:
            return
        c = self.config
        hk.replay_(self.params, [record_round(c, r) for r in records], hessian=self.hessian,
                   curvature_rule=c.kernel_rule, beta=c.beta, h_min=c.h_min,
                   distribution=c.distribution, stochastic_rounding=c.stochastic_rounding, backend=c.backend,
                   check_hessian=False)
        self.applied += len(records)

    def state_bits(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params] + ([h.clone() for h in self.hessian] if self.hessian else [])


class Client:
    """A client with its model resident in memory: catches up by one-pass replay, runs K local steps, replies.

    ``batches()`` returns the closure of the client's next local batch (a zero-argument callable returning the loss
    of the replica's model on that batch; it must not call backward).
    """

    def __init__(self, client_id: int, replica: Replica, batches: Callable[[], Callable[[], torch.Tensor]]):
        self.id = int(client_id)
        self.replica = replica
        self.next_batch = batches

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

    Local updates between steps (K > 1) are applied with an undo log and reverted in reverse order afterwards, so
    the replica stays at the last applied log record (it will apply the aggregated round like everyone else).
    """
    c = replica.config
    params, hessian = replica.params, replica.hessian
    offsets = hk.global_offsets(params)
    scalars, second, undo, losses = [], [], [], []
    kw = dict(distribution=c.distribution, stochastic_rounding=c.stochastic_rounding, backend=c.backend,
              check_hessian=False)

    def update_op(seed, coefs):
        def op(views, h_views, offset):
            hk.zo_update_(views, seed, range(len(coefs)), coefs, hessian=h_views, offset=offset, **kw)
        return op

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
                coefs = list(step_round([int(seed)], [est.scalars], lr=c.lr).coefficients)
                log_k = perturb_with_undo(params, offsets, hessian, update_op(int(seed), coefs),
                                          [update_op(int(seed), [-a for a in coefs])])
                undo.append((int(seed), coefs, log_k))
    finally:
        for seed, coefs, log_k in reversed(undo):
            hk.zo_update_(params, seed, range(len(coefs)), [-a for a in coefs], hessian=hessian,
                          distribution=c.distribution, stochastic_rounding=c.stochastic_rounding, backend=c.backend,
                          check_hessian=False)
            log_k.apply(params)
    return tuple(scalars), (tuple(second) if c.sends_second_differences else None), sum(losses) / len(losses)


def local_steps(replica: Replica, seeds: Sequence[int], next_batch) -> tuple[tuple, tuple | None, float]:
    """Deprecated name of :func:`run_local_steps`."""
    warnings.warn("hiso.fl.local_steps is deprecated; use run_local_steps", DeprecationWarning, stacklevel=2)
    return run_local_steps(replica, seeds, next_batch)


class Server:
    """Samples clients, draws seeds, validates and aggregates replies, keeps the append-only log.

    ``replica`` (optional) is a server-side model kept at the head of the log, for evaluation.
    """

    def __init__(
        self,
        config: FLConfig,
        n_clients: int,
        clients_per_round: int,
        *,
        aggregation: str = "mean",
        trim: float = 0.1,
        scalar_bound: float | None = None,
        replica: Replica | None = None,
        sampling_seed: int | None = None,
        experiment_seed: int | None = None,
    ):
        if not 1 <= clients_per_round <= n_clients:
            raise ValueError(f"need 1 <= clients_per_round <= n_clients, got {clients_per_round}, {n_clients}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not 0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        self.config = config
        self.n_clients = n_clients
        self.clients_per_round = clients_per_round
        self.aggregation = aggregation
        self.trim = trim
        self.scalar_bound = scalar_bound
        self.replica = replica
        self.records: list[RoundRecord] = []
        self.rejections: list[tuple[int, int, str]] = []  # (round, client, reason)
        self.client_round = [0] * n_clients  # records each client holds (as of its last assignment)
        # Seeds come from the operating system's cryptographic source: a client that could predict or choose seeds
        # could steer the model. experiment_seed derives them deterministically instead, for reproducible
        # experiments only; sampling_seed makes client sampling reproducible (not security relevant).
        self._sampler = secrets.SystemRandom() if sampling_seed is None else _Rng(sampling_seed)
        self.experiment_seed = experiment_seed
        self._open: tuple[int, list[int], tuple[int, ...]] | None = None
        self._replies: dict[int, ClientReply] = {}

    @property
    def round(self) -> int:
        return len(self.records)

    def begin_round(self) -> list[RoundAssignment]:
        if self._open is not None:
            raise RuntimeError("the previous round is still open")
        clients = sorted(self._sampler.sample(range(self.n_clients), self.clients_per_round))
        if self.experiment_seed is None:
            seeds = tuple(secrets.randbits(63) for _ in range(self.config.local_steps))
        else:
            seeds = tuple(spec.derive_seed(self.experiment_seed, self.round, k) for k in range(self.config.local_steps))
        self._open = (self.round, clients, seeds)
        self._replies = {}
        out = [RoundAssignment(self.round, c, seeds, tuple(self.records[self.client_round[c]:])) for c in clients]
        for c in clients:  # after this assignment the client holds every record so far (not yet this round's)
            self.client_round[c] = self.round
        return out

    def submit(self, reply: ClientReply | bytes, sender: int | None = None) -> bool:
        """Validate a reply; on rejection log the reason and return False (the round goes on without it).

        ``sender`` is the client identity the transport authenticated; a reply claiming another id is rejected.
        """
        if self._open is None:
            raise RuntimeError("no round is open")
        rnd, clients, _ = self._open
        reason = None
        decoded: ClientReply | None = None
        try:
            decoded = ClientReply.decode(bytes(reply)) if isinstance(reply, (bytes, bytearray)) else reply
        except ValueError as exc:
            reason = f"undecodable: {exc}"
        if decoded is not None:
            if sender is not None and decoded.client != sender:
                reason = f"client id {decoded.client} does not match the sender {sender}"
            else:
                reason = self._check(decoded, rnd, clients)
        if reason is not None or decoded is None:
            who = sender if sender is not None else (-1 if decoded is None else decoded.client)
            self.rejections.append((rnd, who, str(reason)))
            log.warning("round %d: rejected reply from client %d: %s", rnd, who, reason)
            return False
        self._replies[decoded.client] = decoded
        return True

    def record_failure(self, client: int, reason: str) -> None:
        """Log that a sampled client of the open round gave no usable answer (a transport error, a timeout)."""
        if self._open is None:
            raise RuntimeError("no round is open")
        self.rejections.append((self._open[0], int(client), reason))
        log.warning("round %d: no answer from client %d: %s", self._open[0], client, reason)

    def resync(self, client: int, applied: int) -> None:
        """Record how many log records a client reports it holds (a restarted client holds none).

        Only which catch-up records the client is sent next depends on it; the log and the model do not.
        """
        if not 0 <= client < self.n_clients:
            raise ValueError(f"client {client} is not in [0, {self.n_clients})")
        if not 0 <= applied <= self.round:
            raise ValueError(f"client {client} reports {applied} records; the log has {self.round}")
        self.client_round[client] = int(applied)

    def _check(self, reply: ClientReply, rnd: int, clients: list[int]) -> str | None:
        c = self.config
        if reply.round != rnd:
            return f"stale or future round {reply.round} (open round is {rnd})"
        if reply.client not in clients:
            return f"client {reply.client} was not sampled this round"
        if reply.client in self._replies:
            return "duplicate reply"
        if len(reply.scalars) != c.local_steps or any(len(r) != c.num_directions for r in reply.scalars):
            return (f"wrong number of scalars: expected {c.local_steps} x {c.num_directions}, "
                    f"got {len(reply.scalars)} x {[len(r) for r in reply.scalars]}")
        second = reply.second_differences
        if c.sends_second_differences and (second is None or len(second) != c.local_steps
                                           or any(len(r) != c.num_directions for r in second)):
            return "missing or malformed second differences"
        if not is_finite_block(reply.scalars) or (second is not None and not is_finite_block(second)):
            return "non-finite scalar"
        if self.scalar_bound is not None and any(abs(v) > self.scalar_bound for row in reply.scalars for v in row):
            return f"scalar beyond the bound {self.scalar_bound}"
        return None

    def end_round(self) -> RoundRecord | None:
        """Aggregate the accepted replies, append the record and apply it to the server's replica."""
        if self._open is None:
            raise RuntimeError("no round is open")
        rnd, _, seeds = self._open
        self._open = None
        if not self._replies:
            log.warning("round %d: no valid reply; the model is unchanged and the seeds are discarded", rnd)
            return None
        replies = [self._replies[c] for c in sorted(self._replies)]
        scalars = self._aggregate([r.scalars for r in replies])
        second = (self._aggregate([r.second_differences for r in replies])
                  if self.config.sends_second_differences else None)
        record = RoundRecord(rnd, seeds, scalars, second)
        # the record is what goes on the wire: round its floats to fp32 now, so everyone applies the same numbers
        record = RoundRecord.decode_from(record.encode())[0]
        self.records.append(record)
        if self.replica is not None:
            self.replica.apply(self.records[self.replica.applied:])
        return record

    def _aggregate(self, blocks) -> tuple[tuple[float, ...], ...]:
        k, p = self.config.local_steps, self.config.num_directions
        out = []
        for i in range(k):
            row = []
            for j in range(p):
                vals = sorted(b[i][j] for b in blocks)
                if self.aggregation == "mean":
                    row.append(math.fsum(vals) / len(vals))
                elif self.aggregation == "median":
                    row.append(statistics.median(vals))
                else:
                    cut = int(self.trim * len(vals))
                    kept = vals[cut:len(vals) - cut] or vals
                    row.append(math.fsum(kept) / len(kept))
            out.append(tuple(row))
        return tuple(out)

    # ------------------------------------------------------------------ checkpoint: configuration + log
    def checkpoint(self) -> bytes:
        head = json.dumps({"config": json.loads(self.config.to_json()), "n_clients": self.n_clients,
                           "clients_per_round": self.clients_per_round, "aggregation": self.aggregation,
                           "trim": self.trim, "scalar_bound": self.scalar_bound,
                           "client_round": self.client_round}).encode()
        body = b"".join(r.encode() for r in self.records)
        return len(head).to_bytes(4, "little") + head + len(self.records).to_bytes(4, "little") + body

    @classmethod
    def restore(cls, blob: bytes, replica: Replica | None = None) -> Server:
        """Rebuild a server from a checkpoint; a given replica (at the initial weights) replays the whole log."""
        n = int.from_bytes(blob[:4], "little")
        head = json.loads(blob[4:4 + n])
        pos = 4 + n
        count = int.from_bytes(blob[pos:pos + 4], "little")
        pos += 4
        records = []
        for _ in range(count):
            rec, pos = RoundRecord.decode_from(blob, pos)
            records.append(rec)
        server = cls(FLConfig(**head["config"]), head["n_clients"], head["clients_per_round"],
                     aggregation=head["aggregation"], trim=head["trim"], scalar_bound=head["scalar_bound"],
                     replica=replica)
        server.records = records
        server.client_round = list(head["client_round"])
        if replica is not None:
            replica.apply(records[replica.applied:])
        return server


class _Rng:
    """Reproducible client sampling for experiments (seeds still come from ``secrets``)."""

    def __init__(self, seed: int):
        import random

        self._r = random.Random(seed)

    def sample(self, population, k):
        return self._r.sample(list(population), k)

