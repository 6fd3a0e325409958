"""Classification tasks with one interface for text (causal LM + prompt + verbaliser) and images (small CNN).

>>> task = get_task("sst2", data_dir="path/to/data", tokenizer=tok, num_train=512)
>>> batches = task.make_batches(task.train_examples.subset(client_indices), batch_size=16, shuffle=True, seed=r)
>>> loss = task.loss(model, batches[0])           # scalar tensor, works under torch.no_grad()
>>> acc = task.accuracy(model, task.make_batches(task.eval_examples, 32))

Names: ``"sst2"``, ``"cb"``, ``"rte"`` (:mod:`hiso.tasks.text`) and ``"fashion_mnist"``
(:mod:`hiso.tasks.fashion_mnist`). Importing this package does not import transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .base import Batch, ClassificationTask, EvalResult, Examples, accuracy, classification_loss, evaluate
from .fashion_mnist import FashionMNISTTask, ImageBatch, ImageExamples, SmallCNN, load_fashion_mnist_task
from .text import TEMPLATES, PromptTemplate, TextBatch, TextClassificationTask, TextExamples, load_text_task

__all__ = [
    "TEMPLATES",
    "Batch",
    "ClassificationTask",
    "EvalResult",
    "Examples",
    "FashionMNISTTask",
    "ImageBatch",
    "ImageExamples",
    "PromptTemplate",
    "SmallCNN",
    "TextBatch",
    "TextClassificationTask",
    "TextExamples",
    "accuracy",
    "available_tasks",
    "classification_loss",
    "evaluate",
    "get_task",
    "load_fashion_mnist_task",
    "load_text_task",
    "register_task",
]

TaskFactory = Callable[..., ClassificationTask]

_REGISTRY: dict[str, TaskFactory] = {
    "sst2": lambda data_dir=None, **kw: load_text_task("sst2", data_dir, **kw),
    "cb": lambda data_dir=None, **kw: load_text_task("cb", data_dir, **kw),
    "rte": lambda data_dir=None, **kw: load_text_task("rte", data_dir, **kw),
    "fashion_mnist": load_fashion_mnist_task,
}


def get_task(name: str, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> ClassificationTask:
    """Load the task ``name`` (case-insensitive; ``-`` and ``_`` alike).

    Text tasks take ``tokenizer``, ``template``, ``max_length``, ``padding_side``, ``num_train``, ``num_eval``,
    ``seed``, ``hf_path``/``hf_config``/``cache_dir`` (see :func:`hiso.tasks.text.load_text_task`); their data come
    from ``data_dir``, else ``$HISO_DATA_DIR``, else the Hugging Face hub. Fashion-MNIST takes ``num_train``,
    ``num_eval``, ``seed``; its files come from ``data_dir``, else ``$HISO_FASHION_MNIST_DIR``, else the Debian
    package's folder.
    """
    key = name.lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; available: {available_tasks()}")
    return _REGISTRY[key](data_dir, **kwargs)


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Add a task: ``factory(data_dir=None, **kwargs)`` returns a :class:`ClassificationTask`."""
    key = name.lower().replace("-", "_")
    if key in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = factory


def available_tasks() -> list[str]:
    return sorted(_REGISTRY)
