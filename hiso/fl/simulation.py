"""In-process simulation of federated fine-tuning: n clients, m sampled per round, R rounds.

The simulation keeps one model, not n: between rounds every client's model is a pure function of the initial weights
and the log, so a sampled client that has caught up holds exactly the server's current parameters (the protocol
tests check this bit for bit with separate client replicas). Each sampled client therefore runs its K local steps on
the shared model, which comes back to its exact bits afterwards. Bytes are counted from the encoded messages a real
deployment would send: the round assignment with the client's missed records (download) and its reply (upload).

Methods: "hiso" and "decomfl" (scalar-only, :mod:`hiso.fl.protocol`), and the baselines of :mod:`hiso.fl.baselines`:
"mezo" (centralised ZO-SGD on the union of the clients' data, one step per round) and "fedavg" (first-order local
SGD; the model goes both ways: 4 d bytes plus a 12-byte header per transfer). The task, model and data come from
:mod:`hiso.fl.experiment`, the metrics rows from :mod:`hiso.fl.metrics`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable, Collection, Iterable

import torch

from ..optim.estimate import NonFiniteLossError
from . import messages, robust
from .baselines import run_fedavg, run_mezo
from .experiment import BatchStream, Setup, build, client_streams
from .metrics import RunMetrics
from .protocol import DivergedError, FLConfig, Replica
from .server import AGGREGATIONS, Server

METHODS = ("hiso", "decomfl", "mezo", "fedavg")

__all__ = ["METHODS", "BatchStream", "Setup", "SimulationConfig", "build", "params_sha256", "run", "run_scalar_only"]


@dataclasses.dataclass
class SimulationConfig:
    task: str = "fashion_mnist"
    method: str = "hiso"
    rounds: int = 100
    n_clients: int = 10
    clients_per_round: int = 5
    local_steps: int = 1
    num_directions: int = 5
    lr: float = 1e-3
    mu: float = 1e-3
    batch_size: int = 32
    split: str = "iid"
    alpha: float = 0.5
    eval_every: int = 10
    num_train: int | None = None
    num_eval: int | None = None
    seed: int = 0
    curvature_rule: str = "gsq"
    beta: float | None = dataclasses.field(default=None, metadata={
        "help": "EMA factor of the curvature estimate; default: the rule's (0.95; stein-tensor 0.99, absdelta 0.9)"})
    h_init: str | None = dataclasses.field(default=None, metadata={
        "help": "H before the first round: ones, or first-round (set from the first round's scalars); default: the "
                "rule's (first-round for absdelta and stein-tensor)"})
    h_min: float = 1e-8
    weight_decay: float = 0.0
    aggregation: str = robust.DEFAULT_AGGREGATION  # robust by default: survives one hostile reply per round
    trim: float = 0.1  # trimmed mean: drops max(1, floor(trim m)) of m >= 3 replies per side
    scalar_bound: float | None = None  # reject replies with any |scalar| (or second difference) above this
    norm_factor: float = robust.DEFAULT_NORM_FACTOR  # clip replies to this x the recent median norm (0: off)
    norm_window: int = robust.DEFAULT_NORM_WINDOW
    min_replies: int = 1  # fewer valid replies: the round is skipped (journaled, not applied)
    save_every: int = 0  # hiso train: also write the weights every N rounds (0: at the end only)
    difference: str = "central"
    distribution: str = "gaussian"
    model: str | None = None  # text tasks: a Hugging Face name or folder, or "smollm2-135m"
    data_dir: str | None = None
    template: str | None = None  # text tasks: a template of the task's spec (default: the spec's default)
    max_length: int | None = None  # text tasks: prompt tokens kept (default: the spec's)
    dtype: str = "float32"
    backend: str | None = None
    device: str = "cpu"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}")
        robust.check_settings(self.aggregation, self.trim, self.scalar_bound, self.norm_factor, self.norm_window)
        if not isinstance(self.min_replies, int) or not 1 <= self.min_replies <= self.clients_per_round:
            raise ValueError(f"min_replies must be in [1, clients_per_round], got {self.min_replies!r}")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise ValueError(f"save_every must be an integer >= 0, got {self.save_every!r}")
        for name in ("rounds", "n_clients", "clients_per_round", "local_steps", "num_directions", "batch_size",
                     "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.clients_per_round > self.n_clients:
            raise ValueError("clients_per_round cannot exceed n_clients")
        if self.split not in ("iid", "dirichlet"):
            raise ValueError("split must be 'iid' or 'dirichlet'")

    def fl_config(self) -> FLConfig:
        return FLConfig(
            method=self.method, lr=self.lr, mu=self.mu, local_steps=self.local_steps,
            num_directions=self.num_directions, difference=self.difference, distribution=self.distribution,
            curvature_rule=self.curvature_rule, beta=self.beta, h_init=self.h_init, h_min=self.h_min,
            weight_decay=self.weight_decay,
            backend=self.backend,
        )

    def make_server(self, replica: Replica | None = None, *, n_clients: int | None = None,
                    deterministic: bool = True) -> Server:
        """The protocol's server for these settings; ``deterministic``: keys derived from ``seed`` (experiments)."""
        return Server(self.fl_config(), n_clients or self.n_clients, self.clients_per_round,
                      aggregation=self.aggregation, trim=self.trim, scalar_bound=self.scalar_bound,
                      norm_factor=self.norm_factor, norm_window=self.norm_window, min_replies=self.min_replies,
                      replica=replica, sampling_seed=self.seed if deterministic else None,
                      experiment_seed=self.seed if deterministic else None)


def params_sha256(params) -> str:
    """SHA-256 (hex) of parameters' raw bytes in order: the fingerprint of a final model."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run(config: SimulationConfig, *, on_eval: Callable[[dict], None] | None = None, setup: Setup | None = None,
        journal: str | None = None, resume: bool = False, evaluated: Collection[int] = (), elapsed: float = 0.0,
        after_round: Callable[[int], None] | None = None,
        on_round: Callable[[int, float | None], None] | None = None,
        replica_factory: Callable[[Iterable[torch.Tensor], FLConfig], Replica] = Replica) -> list[dict]:
    """Run one method; returns one metrics row per evaluation (also passed to ``on_eval``).

    ``on_round(round, loss)`` is called after every round with that round's mean training loss (None if no client
    returned one): the progress bar.

    Scalar-only methods write their log to ``journal`` (a path) if given; ``resume`` continues from it instead
    (rounds whose rows exist, ``evaluated``, are not evaluated again; ``elapsed`` seconds carry over).
    ``after_round(r)`` is called after each round of a scalar-only method (e.g. to save weights).
    ``replica_factory(params, fl_config)`` makes the shared replica of a scalar-only method (a subclass can change how
    its clients probe and how records apply, e.g. another direction family in ``benchmarks/curvature``)."""
    setup = setup or build(config)
    metrics = RunMetrics(config.method)
    metrics.started -= elapsed
    rows: list[dict] = []
    consumed = 0  # training losses of the current evaluation interval already reported to on_round

    def evaluate(rnd: int, **extra) -> None:
        nonlocal consumed
        if rnd in evaluated and not extra:
            return
        res = setup.task.evaluate(setup.model, setup.eval_batches)
        row = metrics.row(rnd, res.accuracy, res.loss, **extra)
        consumed = 0
        rows.append(row)
        if on_eval:
            on_eval(row)

    def end_round(rnd: int, **extra) -> None:
        """The runners call this after every round: progress, then an evaluation every eval_every rounds."""
        nonlocal consumed
        if on_round is not None:
            new = metrics._train_losses[consumed:]
            consumed += len(new)
            on_round(rnd, sum(new) / len(new) if new else None)
        if extra or _eval_point(config, rnd):
            evaluate(rnd, **extra)

    if config.method in ("hiso", "decomfl"):
        run_scalar_only(config, setup, metrics, evaluate, end_round, journal=journal, resume=resume,
                        evaluated=evaluated, after_round=after_round, replica_factory=replica_factory)
        return rows
    if resume:
        raise ValueError(f"{config.method} keeps no journal and cannot resume; run it again")
    evaluate(0)
    runner = {"mezo": run_mezo, "fedavg": run_fedavg}
    runner[config.method](config, setup, metrics, end_round)
    return rows


def _eval_point(config: SimulationConfig, rnd: int) -> bool:
    return rnd == 0 or rnd % config.eval_every == 0 or rnd == config.rounds


def _resume_state(config: SimulationConfig, server: Server, streams: list[BatchStream], metrics: RunMetrics,
                  evaluate, evaluated: Collection[int]) -> int:
    """Bring the streams and metrics to the journal's head as the uninterrupted run had them (and write the head's
    evaluation row if it is due and missing); returns the head (rounds done)."""
    entries = server.entries()
    head = len(entries)
    due = _eval_point(config, head) and head not in evaluated
    # the training losses of the next row: rounds after the last written evaluation row
    last_row = max(r for r in range(head if due else head + 1) if _eval_point(config, r)) if head else 0
    for i, e in enumerate(entries):
        m = e.meta
        metrics.bytes_up += m.get("bytes_up", 0)
        metrics.bytes_down += m.get("bytes_down", 0)
        metrics.rejections += m.get("rejected", 0)
        for c, n in m.get("batches", {}).items():
            streams[int(c)].drawn += n
        if i + 1 > last_row:
            metrics._train_losses += m.get("losses", [])
    for stream in streams:
        stream.load_state_dict({"drawn": stream.drawn})
    if due:
        evaluate(head)
    return head


def run_scalar_only(config: SimulationConfig, setup: Setup, metrics: RunMetrics, evaluate: Callable[..., None],
                    end_round: Callable[..., None], *, journal: str | None = None, resume: bool = False,
                    evaluated: Collection[int] = (), after_round: Callable[[int], None] | None = None,
                    replica_factory: Callable[[Iterable[torch.Tensor], FLConfig], Replica] = Replica) -> None:
    """HiSo / DeComFL: the protocol's server and clients in one process, bytes counted from the encoded messages."""
    model = setup.model
    streams = client_streams(config, setup)
    fl = config.fl_config()
    replica = replica_factory(model.parameters(), fl)
    digest = params_sha256(replica.params)
    if resume:
        if journal is None:
            raise ValueError("resume needs the journal's path")
        server = Server.resume(journal, replica)
        if server.journal.header.get("initial_sha256") != digest:
            raise ValueError(f"the initial weights differ from those of the journal {journal}")
        start = _resume_state(config, server, streams, metrics, evaluate, evaluated) + 1
    else:
        server = config.make_server(replica)
        if journal is not None:
            server.create_journal(journal, initial_sha256=digest, simulation=dataclasses.asdict(config))
        evaluate(0)
        start = 1
    for rnd in range(start, config.rounds + 1):
        note: dict = {"bytes_up": 0, "bytes_down": 0, "losses": [], "batches": {}}
        rejected_before = len(server.rejections)
        for assignment in server.begin_round():
            note["bytes_down"] += len(assignment.encode())
            stream = streams[assignment.client]
            drawn = stream.drawn
            try:
                scalars, second, loss = replica.run_local_steps(assignment.seeds,
                                                                functools.partial(stream.next_closure, model))
            except NonFiniteLossError as exc:  # e.g. after divergence: this client sends nothing
                server.record_failure(assignment.client, str(exc))
                continue
            finally:
                note["batches"][str(assignment.client)] = stream.drawn - drawn
            reply = messages.ClientReply(assignment.round, assignment.client, scalars, second).encode()
            note["bytes_up"] += len(reply)
            server.submit(reply, sender=assignment.client)
            note["losses"].append(float(loss))
        note["rejected"] = len(server.rejections) - rejected_before
        diverged = False
        try:
            record = server.end_round(note)
        except DivergedError:
            record, diverged = None, True
        metrics.bytes_up += note["bytes_up"]
        metrics.bytes_down += note["bytes_down"]
        for loss in note["losses"]:
            metrics.add_train_loss(loss)
        metrics.rejections += note["rejected"]
        if after_round is not None:
            after_round(rnd)
        if diverged or (record is None and not all(torch.isfinite(p).all() for p in replica.params)):
            end_round(rnd, diverged=True)  # the model diverged (non-finite parameters): nothing more can happen
            break
        end_round(rnd)
