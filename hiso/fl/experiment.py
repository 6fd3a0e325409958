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
    tokenizer: object = None  # text tasks: what ``save_weights`` writes beside the model


def build_model(config: SimulationConfig):
    """The experiment's model at its initial weights (the CNN from the seed, or the named causal LM) and its
    tokenizer (None for the CNN), without loading any data: what ``hiso export`` needs besides the journal."""
    from .. import tasks

    dtype = getattr(torch, config.dtype)
    tokenizer = None
    if config.task == "fashion_mnist":
        torch.manual_seed(config.seed)
        model = tasks.SmallCNN()
    else:
        from ..models import load_causal_lm

        model, tokenizer = load_causal_lm(config.model or "smollm2-135m", dtype=dtype)
    model = model.to(device=config.device, dtype=dtype)
    model.eval()  # ZO steps evaluate the same network twice: no dropout
    return model, tokenizer


def build(config: SimulationConfig, *, with_eval: bool = True) -> Setup:
    """Task, model (initialised from the seed), client partitions and (``with_eval``) the evaluation batches."""
    from .. import tasks

    if config.task == "fashion_mnist":
        task = tasks.get_task("fashion_mnist", config.data_dir, num_train=config.num_train,
                              num_eval=config.num_eval, seed=config.seed)
        model, tokenizer = build_model(config)
    else:
        model, tokenizer = build_model(config)
        task = tasks.get_task(config.task, config.data_dir, tokenizer=tokenizer, num_train=config.num_train,
                              num_eval=config.num_eval, seed=config.seed, template=config.template,
                              max_length=config.max_length)
    parts = split_clients(task.train_labels, config.n_clients, scheme=config.split, alpha=config.alpha,  # type: ignore[arg-type]
                          seed=config.seed)
    client_data = [task.train_examples.subset(p) for p in parts]
    # task.eval_batches: the split in the task's cheapest order (text tasks batch prompts of similar length: on
    # SST-2 with SmolLM2-135M that halves the padding, 46 s instead of 81 s for the 872-sentence dev set on 2 cores)
    eval_batches = ([b.to(config.device) for b in task.eval_batches(max(64, config.batch_size))]
                    if with_eval else [])
    return Setup(task, model, client_data, eval_batches, tokenizer)


class BatchStream:
    """Endless shuffled batches of one client's examples (reshuffled every epoch, deterministic).

    The stream is a pure function of how many batches it has drawn (``drawn``): :meth:`state_dict` /
    :meth:`load_state_dict` save and restore that position, so a resumed run or a restarted Flower node reads on
    exactly where it stopped."""

    def __init__(self, task, examples, batch_size: int, seed: int, device: str):
        self.task, self.examples, self.batch_size, self.seed, self.device = task, examples, batch_size, seed, device
        self.epoch = 0
        self.drawn = 0
        self._it: Iterator = iter(())

    def _epoch_batches(self, epoch: int) -> list:
        return self.task.make_batches(self.examples, min(self.batch_size, len(self.examples)), shuffle=True,
                                      seed=self.seed * 100_003 + epoch)

    def next(self):
        try:
            batch = next(self._it)
        except StopIteration:
            batches = self._epoch_batches(self.epoch)
            self.epoch += 1
            self._it = iter([b.to(self.device) for b in batches])
            batch = next(self._it)
        self.drawn += 1
        return batch

    @property
    def batches_per_epoch(self) -> int:
        size = min(self.batch_size, len(self.examples))
        return -(-len(self.examples) // size)

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state["drawn"]`` batches (building only the current epoch's batches)."""
        drawn = state["drawn"]
        if not isinstance(drawn, int) or isinstance(drawn, bool) or drawn < 0:
            raise ValueError(f"drawn must be an integer >= 0, got {drawn!r}")
        epoch, into = divmod(drawn, self.batches_per_epoch)
        if into == 0:
            self.epoch, self._it = epoch, iter(())
        else:
            batches = self._epoch_batches(epoch)
            self.epoch, self._it = epoch + 1, iter([b.to(self.device) for b in batches[into:]])
        self.drawn = drawn

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
