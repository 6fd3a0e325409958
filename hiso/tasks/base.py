"""The task interface shared by text (prompt + verbaliser) and image classification.

Every task reduces a model and a batch to class logits of shape ``[batch, num_classes]``; loss and accuracy are
defined once on top of that. A federated trainer therefore treats SST-2 on a causal LM and Fashion-MNIST on a CNN
alike::

    loss = task.loss(model, batch)              # scalar tensor; fine under torch.no_grad() (ZO never calls backward)
    acc = task.accuracy(model, batches)         # float in [0, 1], example-weighted over all batches

The batch objects carry what they need to compute their logits (``batch.class_logits(model)``), so the loss closure
a ZO optimizer calls twice per direction is simply ``lambda: task.loss(model, batch)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Batch",
    "ClassificationTask",
    "EvalResult",
    "Examples",
    "accuracy",
    "classification_loss",
    "evaluate",
    "model_device",
]

E = TypeVar("E", bound="Examples")


@runtime_checkable
class Batch(Protocol):
    """A collated batch that knows how to turn a model into class logits."""

    labels: torch.Tensor  # int64 [B], class indices in ``task.label_names`` order

    def __len__(self) -> int: ...

    def to(self, device: torch.device | str) -> Batch: ...

    def class_logits(self, model: nn.Module) -> torch.Tensor:
        """Logits over the task's classes, ``[B, num_classes]``, float32."""
        ...


@runtime_checkable
class Examples(Protocol):
    """An indexable collection of labelled examples (a task's train or eval split, or a client's share of it)."""

    @property
    def labels(self) -> np.ndarray:
        """int64 class index per example, in order: what client partitioning splits on."""
        ...

    def __len__(self) -> int: ...

    def subset(self: E, indices: Sequence[int] | np.ndarray) -> E:
        """The examples at ``indices``, in that order."""
        ...


@dataclass(frozen=True)
class EvalResult:
    """Example-weighted mean loss and accuracy over a set of batches."""

    loss: float
    accuracy: float
    num_examples: int


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``batch.class_logits(model)`` against ``batch.labels`` (a scalar tensor).

    Computed in float32 whatever the model's dtype: ZO methods take differences of two nearby losses, and a bf16
    loss would round those differences away. Does not change the model's train/eval mode: put models with dropout in
    eval mode first so that the two evaluations of a ZO step see the same function.
    """
    logits = batch.class_logits(model)
    return F.cross_entropy(logits.float(), batch.labels.to(logits.device))


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch]) -> EvalResult:
    """Loss and accuracy over all examples in ``batches`` (each example counts once, whatever the batch sizes)."""
    total_loss = 0.0
    correct = 0
    count = 0
    for batch in batches:
        logits = batch.class_logits(model).float()
        labels = batch.labels.to(logits.device)
        total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == labels).sum())
        count += len(labels)
    if count == 0:
        raise ValueError("evaluate() got no examples: the batch list is empty")
    return EvalResult(loss=total_loss / count, accuracy=correct / count, num_examples=count)


def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Fraction of examples in ``batches`` whose highest class logit is the label (in [0, 1]); runs under no_grad."""
    return evaluate(model, batches).accuracy


class ClassificationTask(ABC):
    """A classification task: its data splits, its batching, and loss/accuracy with one interface for all tasks.

    Subclasses set ``name``, ``label_names``, ``train_examples`` and ``eval_examples`` and implement
    :meth:`make_batches`.
    """

    name: str
    label_names: tuple[str, ...]
    train_examples: Examples
    eval_examples: Examples

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def train_labels(self) -> np.ndarray:
        """Labels of the training split: the input of :mod:`hiso.data_splits`."""
        return self.train_examples.labels

    @abstractmethod
    def make_batches(
        self,
        examples: Examples,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> list[Batch]:
        """Collate ``examples`` into batches of ``batch_size`` (the last one smaller unless ``drop_last``).

        ``shuffle`` permutes the examples first with a generator seeded by ``seed`` (deterministic).
        """

    def eval_batches(self, batch_size: int) -> list[Batch]:
        """The evaluation split in batches (in an order that wastes least compute; the order does not matter)."""
        return self.make_batches(self.eval_examples, batch_size)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """See :func:`classification_loss`."""
        return classification_loss(model, batch)

    def accuracy(self, model: nn.Module, batches: Iterable[Batch]) -> float:
        """See :func:`accuracy`."""
        return accuracy(model, batches)

    def evaluate(self, model: nn.Module, batches: Iterable[Batch]) -> EvalResult:
        """See :func:`evaluate`."""
        return evaluate(model, batches)


def batch_order(n: int, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool) -> list[np.ndarray]:
    """Index arrays of the batches over ``n`` examples (shared by the tasks' ``make_batches``)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def as_index_array(indices: Sequence[int] | np.ndarray, length: int) -> np.ndarray:
    """``indices`` as an int64 array, checked to lie in ``[0, length)``."""
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"indices must be a 1-D sequence of integers, got dtype {idx.dtype} and shape {idx.shape}")
    if idx.min() < 0 or idx.max() >= length:
        raise IndexError(f"indices must lie in [0, {length}), got range [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64, copy=False)
