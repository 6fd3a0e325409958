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
from collections.abc import Callable

import torch

from ..optim.estimate import NonFiniteLossError
from . import messages
from .baselines import run_fedavg, run_mezo
from .experiment import BatchStream, Setup, build, client_streams
from .metrics import RunMetrics
from .protocol import AGGREGATIONS, FLConfig, Replica, Server, run_local_steps

METHODS = ("hiso", "decomfl", "mezo", "fedavg")

__all__ = ["METHODS", "BatchStream", "Setup", "SimulationConfig", "build", "run", "run_scalar_only"]


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
    beta: float = 0.95
    h_min: float = 1e-8
    weight_decay: float = 0.0
    aggregation: str = "mean"
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
            curvature_rule=self.curvature_rule, beta=self.beta, h_min=self.h_min, weight_decay=self.weight_decay,
            backend=self.backend,
        )


def run(config: SimulationConfig, *, on_eval: Callable[[dict], None] | None = None,
        setup: Setup | None = None, on_round: Callable[[int, float | None], None] | None = None) -> list[dict]:
    """Run one method; returns one metrics row per evaluation (also passed to ``on_eval``). ``on_round(round, loss)``
    is called after every round with that round's mean training loss (None if no client returned one)."""
    setup = setup or build(config)
    metrics = RunMetrics(config.method)
    rows: list[dict] = []
    consumed = 0  # training losses of the current evaluation interval already reported to on_round

    def evaluate(rnd: int, **extra) -> None:
        nonlocal consumed
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
        if extra or rnd % config.eval_every == 0 or rnd == config.rounds:
            evaluate(rnd, **extra)

    evaluate(0)
    runner = {"hiso": run_scalar_only, "decomfl": run_scalar_only, "mezo": run_mezo, "fedavg": run_fedavg}
    runner[config.method](config, setup, metrics, end_round)
    return rows


def run_scalar_only(config: SimulationConfig, setup: Setup, metrics: RunMetrics,
                    end_round: Callable[..., None]) -> None:
    """HiSo / DeComFL: the protocol's server and clients in one process, bytes counted from the encoded messages."""
    model = setup.model
    streams = client_streams(config, setup)
    fl = config.fl_config()
    replica = Replica(model.parameters(), fl)
    server = Server(fl, config.n_clients, config.clients_per_round, aggregation=config.aggregation,
                    replica=replica, sampling_seed=config.seed, experiment_seed=config.seed)
    for rnd in range(1, config.rounds + 1):
        for assignment in server.begin_round():
            metrics.bytes_down += len(assignment.encode())
            stream = streams[assignment.client]
            try:
                scalars, second, loss = run_local_steps(replica, assignment.seeds,
                                                        functools.partial(stream.next_closure, model))
            except NonFiniteLossError as exc:  # e.g. after divergence: this client sends nothing
                server.record_failure(assignment.client, str(exc))
                continue
            reply = messages.ClientReply(assignment.round, assignment.client, scalars, second).encode()
            metrics.bytes_up += len(reply)
            server.submit(reply, sender=assignment.client)
            metrics.add_train_loss(loss)
        record = server.end_round()
        metrics.rejections = len(server.rejections)
        if record is None and not all(torch.isfinite(p).all() for p in replica.params):
            end_round(rnd, diverged=True)  # the model diverged (non-finite parameters): nothing more can happen
            break
        end_round(rnd)
