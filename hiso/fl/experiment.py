"""What a federated experiment runs on: the task, the model (initialised from the seed), the clients' partitions and
their batch streams. Shared by the in-process simulation (:mod:`hiso.fl.simulation`) and the Flower apps
(:mod:`hiso.integrations.flower`), so both train on the same data in the same order."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from ..data_splits import split_clients

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import ClassificationTask
    from .simulation import SimulationConfig


@dataclasses.dataclass
class Setup:
    task: ClassificationTask
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
                              num_eval=config.num_eval, seed=config.seed, template=config.template,
                              max_length=config.max_length)
    model = model.to(device=config.device, dtype=dtype)
    model.eval()  # ZO steps evaluate the same network twice: no dropout
    parts = split_clients(task.train_labels, config.n_clients, scheme=config.split, alpha=config.alpha,  # type: ignore[arg-type]
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


def client_streams(config: SimulationConfig, setup: Setup) -> list[BatchStream]:
    """One batch stream per client; client i's stream is seeded with ``seed * 1000 + i`` wherever it runs."""
    return [client_stream(config, setup, i) for i in range(len(setup.client_data))]


def client_stream(config: SimulationConfig, setup: Setup, client: int) -> BatchStream:
    return BatchStream(setup.task, setup.client_data[client], config.batch_size, config.seed * 1000 + client,
                       config.device)
