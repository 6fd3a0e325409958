"""The baselines ``hiso train`` runs beside the scalar-only methods, on the same task, split and evaluation.

* MeZO (Malladi et al., arXiv 2305.17333): centralised ZO-SGD on the union of the clients' data, one step per round.
* FedAvg (McMahan et al., arXiv 1602.05629): first-order local SGD on each sampled client; the server averages the
  models. The communication baseline: the whole model crosses the network both ways each round.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from ..optim import ZOSGD
from . import messages
from .experiment import BatchStream, Setup, client_streams
from .metrics import RunMetrics


def run_mezo(config, setup: Setup, metrics: RunMetrics, end_round: Callable[[int], None]) -> None:
    union = BatchStream(setup.task, setup.task.train_examples, config.batch_size, config.seed, config.device)
    opt = ZOSGD(setup.model.parameters(), lr=config.lr, mu=config.mu, num_directions=config.num_directions,
                difference=config.difference, distribution=config.distribution, weight_decay=config.weight_decay,
                seed=config.seed, backend=config.backend, record_history=False, process_group=False)
    for rnd in range(1, config.rounds + 1):
        metrics.add_train_loss(opt.step(union.next_closure(setup.model)))
        end_round(rnd)


def run_fedavg(config, setup: Setup, metrics: RunMetrics, end_round: Callable[[int], None]) -> None:
    model, task = setup.model, setup.task
    streams = client_streams(config, setup)
    params = [p for p in model.parameters() if p.requires_grad]
    model_bytes = messages.HEADER.size + sum(4 * p.numel() for p in params)  # fp32 model + header, each way
    sampler = random.Random(config.seed)
    for rnd in range(1, config.rounds + 1):
        start = [p.detach().clone() for p in params]
        total = [torch.zeros_like(p) for p in params]
        clients = sorted(sampler.sample(range(config.n_clients), config.clients_per_round))
        for c in clients:
            metrics.bytes_down += model_bytes
            metrics.bytes_up += model_bytes
            opt = torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
            for _ in range(config.local_steps):
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, streams[c].next())
                loss.backward()
                opt.step()
                metrics.add_train_loss(float(loss.detach()))
            with torch.no_grad():
                for t, p, s in zip(total, params, start):
                    t += p - s
                    p.copy_(s)
        with torch.no_grad():
            for p, t in zip(params, total):
                p.add_(t / len(clients))
        model.zero_grad(set_to_none=True)
        end_round(rnd)
