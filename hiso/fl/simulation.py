"""In-process simulation of federated fine-tuning: n clients, m sampled per round, R rounds.

The simulation keeps one model, not n: between rounds every client's model is a pure function of the initial weights
and the log, so a sampled client that has caught up holds exactly the server's current parameters (the protocol
tests check this bit for bit with separate client replicas). Each sampled client therefore runs its K local steps on
the shared model, which comes back to its exact bits afterwards. Bytes are counted from the encoded messages a real
deployment would send: the round assignment with the client's missed records (download) and its reply (upload).

Methods: "hiso" and "decomfl" (scalar-only, :mod:`hiso.fl.protocol`), "mezo" (centralised ZO-SGD on the union of the
clients' data, one step per round) and "fedavg" (first-order local SGD; the model goes both ways: 4 d bytes plus a
12-byte header per transfer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Iterator

import numpy as np
import torch

from ..data_splits import split_clients
from ..optim import ZOSGD
from . import messages
from .protocol import AGGREGATIONS, FLConfig, Replica, Server, local_steps

METHODS = ("hiso", "decomfl", "mezo", "fedavg")


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
    curvature: str = "gsq"
    beta: float = 0.95
    h_min: float = 1e-8
    weight_decay: float = 0.0
    aggregation: str = "mean"
    difference: str = "central"
    distribution: str = "gaussian"
    model: str | None = None  # text tasks: a Hugging Face name or folder, or "smollm2-135m"
    data_dir: str | None = None
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
            curvature=self.curvature, beta=self.beta, h_min=self.h_min, weight_decay=self.weight_decay,
            backend=self.backend,
        )


@dataclasses.dataclass
class Setup:
    task: object
    model: torch.nn.Module
    client_data: list
    eval_batches: list


def build(config: SimulationConfig, *, with_eval: bool = True) -> Setup:
    """Task, model (initialised from the seed), client partitions and (``with_eval``) the evaluation batches."""
    from .. import tasks

    dtype = getattr(torch, config.dtype)
    if config.task == "fashion_mnist":
        task = tasks.get_task("fashion_mnist", config.data_dir, num_train=config.num_train,
                              num_eval=config.num_eval, seed=config.seed)
        torch.manual_seed(config.seed)
        model = tasks.SmallCNN()
    else:
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(config.model or "smollm2-135m", dtype=dtype)
        task = tasks.get_task(config.task, config.data_dir, tokenizer=tokenizer, num_train=config.num_train,
                              num_eval=config.num_eval, seed=config.seed)
    model = model.to(device=config.device, dtype=dtype)
    model.eval()  # ZO steps evaluate the same network twice: no dropout
    parts = split_clients(task.train_labels, config.n_clients, scheme=config.split, alpha=config.alpha,
                          seed=config.seed)
    client_data = [task.train_examples.subset(p) for p in parts]
    eval_batches = ([b.to(config.device) for b in task.make_batches(task.eval_examples, max(64, config.batch_size))]
                    if with_eval else [])
    return Setup(task, model, client_data, eval_batches)


class BatchStream:
    """Endless shuffled batches of one client's examples (reshuffled every epoch, deterministic)."""

    def __init__(self, task, examples, batch_size: int, seed: int, device: str):
        self.task, self.examples, self.batch_size, self.seed, self.device = task, examples, batch_size, seed, device
        self.epoch = 0
        self._it: Iterator = iter(())

    def next(self):
        try:
            return next(self._it)
        except StopIteration:
            batches = self.task.make_batches(self.examples, min(self.batch_size, len(self.examples)), shuffle=True,
                                             seed=self.seed * 100_003 + self.epoch)
            self.epoch += 1
            self._it = iter([b.to(self.device) for b in batches])
            return next(self._it)

    def next_closure(self, model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        """Draw the next batch; return the closure of the model's loss on it (what a ZO step evaluates 2P times)."""
        batch = self.next()
        return lambda: self.task.loss(model, batch)


def run(config: SimulationConfig, *, on_eval: Callable[[dict], None] | None = None,
        setup: Setup | None = None) -> list[dict]:
    """Run the simulation; returns one metrics dict per evaluation (also passed to ``on_eval``)."""
    setup = setup or build(config)
    task, model = setup.task, setup.model
    streams = [BatchStream(task, ex, config.batch_size, config.seed * 1000 + i, config.device)
               for i, ex in enumerate(setup.client_data)]
    metrics: list[dict] = []
    traffic = {"up": 0, "down": 0}  # bytes, all clients together
    start = time.perf_counter()
    train_losses: list[float] = []
    failures: list[tuple[int, int, str]] = []  # (round, client, reason) of clients that could not answer

    def evaluate(rnd: int):
        res = task.evaluate(model, setup.eval_batches)
        row = dict(round=rnd, method=config.method, accuracy=res.accuracy, eval_loss=res.loss,
                   train_loss=float(np.mean(train_losses)) if train_losses else math.nan,
                   bytes_up=traffic["up"], bytes_down=traffic["down"], client_failures=len(failures),
                   seconds=time.perf_counter() - start)
        train_losses.clear()
        metrics.append(row)
        if on_eval:
            on_eval(row)

    evaluate(0)
    if config.method in ("hiso", "decomfl"):
        fl = config.fl_config()
        replica = Replica(model.parameters(), fl)
        server = Server(fl, config.n_clients, config.clients_per_round, aggregation=config.aggregation,
                        replica=replica, sampling_seed=config.seed, experiment_seed=config.seed)
        for rnd in range(1, config.rounds + 1):
            for assignment in server.begin_round():
                traffic["down"] += len(assignment.encode())
                stream = streams[assignment.client]
                try:
                    scalars, curvature, loss = local_steps(replica, assignment.seeds, functools.partial(stream.next_closure, model))
                except ValueError as exc:  # e.g. a non-finite loss after divergence: this client sends nothing
                    failures.append((assignment.round, assignment.client, str(exc)))
                    continue
                reply = messages.ClientReply(assignment.round, assignment.client, scalars, curvature).encode()
                traffic["up"] += len(reply)
                server.submit(reply, sender=assignment.client)
                train_losses.append(loss)
            if server.end_round() is None and not all(torch.isfinite(p).all() for p in replica.params):
                evaluate(rnd)  # the model diverged (non-finite parameters): nothing more can happen
                metrics[-1]["diverged"] = True
                break
            if rnd % config.eval_every == 0 or rnd == config.rounds:
                evaluate(rnd)
    elif config.method == "mezo":
        union = BatchStream(task, task.train_examples, config.batch_size, config.seed, config.device)
        opt = ZOSGD(model.parameters(), lr=config.lr, mu=config.mu, num_directions=config.num_directions,
                    difference=config.difference, distribution=config.distribution,
                    weight_decay=config.weight_decay, seed=config.seed, backend=config.backend,
                    record_history=False)
        for rnd in range(1, config.rounds + 1):
            train_losses.append(opt.step(union.next_closure(model)))
            if rnd % config.eval_every == 0 or rnd == config.rounds:
                evaluate(rnd)
    else:
        run_fedavg(config, model, task, streams, train_losses, evaluate, traffic)
    return metrics


def run_fedavg(config, model, task, streams, train_losses, evaluate, traffic) -> None:
    """FedAvg (McMahan et al. 2017): each sampled client runs K local SGD steps from the global model; the server
    averages the clients' models. The communication baseline: the whole model crosses the network both ways."""
    import random

    params = [p for p in model.parameters() if p.requires_grad]
    model_bytes = messages.HEADER.size + sum(4 * p.numel() for p in params)  # fp32 model + header, each way
    sampler = random.Random(config.seed)
    for rnd in range(1, config.rounds + 1):
        start = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        clients = sorted(sampler.sample(range(config.n_clients), config.clients_per_round))
        for c in clients:
            traffic["down"] += model_bytes
            traffic["up"] += model_bytes
            opt = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
            for _ in range(config.local_steps):
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, streams[c].next())
                loss.backward()
                opt.step()
                train_losses.append(float(loss.detach()))
            with torch.no_grad():
                for t, p, s in zip(total, params, start):
                    t += p - s
                    p.copy_(s)
        with torch.no_grad():
            for p, t in zip(params, total):
                p += t / len(clients)
        model.zero_grad(set_to_none=True)
        if rnd % config.eval_every == 0 or rnd == config.rounds:
            evaluate(rnd)
