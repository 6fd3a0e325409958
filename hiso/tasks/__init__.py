"""Classification tasks with one interface for text (causal LM + prompt) and images (small CNN).

>>> task = get_task("boolq", data_dir="path/to/SuperGLUE", tokenizer=tok, num_train=512)
>>> batches = task.make_batches(task.train_examples.subset(client_indices), batch_size=16, shuffle=True, seed=r)
>>> loss = task.loss(model, batches[0])           # scalar tensor, works under torch.no_grad()
>>> acc = task.accuracy(model, task.make_batches(task.eval_examples, 32))

Names: the text tasks of :mod:`hiso.tasks.text` (``sst2``, ``cb``, ``rte``, ``boolq``, ``wic``, ``wsc``,
``multirc``, ``copa`` and any spec registered with :func:`register_task_spec`), a path to a task spec ``.toml``
file, and ``"fashion_mnist"`` (:mod:`hiso.tasks.fashion_mnist`). Importing this package does not import
transformers or datasets.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Batch, ClassificationTask, EvalResult, Examples, accuracy, classification_loss, evaluate
from .fashion_mnist import FashionMNISTTask, ImageBatch, ImageExamples, SmallCNN, load_fashion_mnist_task
from .text import (
    TASK_SPECS,
    TEMPLATES,
    PromptTemplate,
    TextBatch,
    TextClassificationTask,
    TextExamples,
    TextTaskSpec,
    load_text_task,
)
from .text import find_spec as _find_spec
from .text import get_spec as _get_spec
from .text import is_spec_file as _is_spec_file
from .text import register_spec as register_task_spec
from .text import resolve_data as _resolve_text_data

__all__ = [
    "TASK_SPECS",
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
    "TaskInfo",
    "TextBatch",
    "TextClassificationTask",
    "TextExamples",
    "TextTaskSpec",
    "accuracy",
    "available_tasks",
    "classification_loss",
    "evaluate",
    "get_task",
    "load_fashion_mnist_task",
    "load_text_task",
    "register_task",
    "register_task_spec",
    "task_info",
]

TaskFactory = Callable[..., ClassificationTask]

#: tasks built by code (factories); text tasks live in :data:`TASK_SPECS` and need no entry here
_REGISTRY: dict[str, TaskFactory] = {"fashion_mnist": load_fashion_mnist_task}


def _key(name: str) -> str:
    return name.lower().replace("-", "_")


def get_task(name: str, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> ClassificationTask:
    """Load the task ``name``: a registered name (case-insensitive; ``-`` and ``_`` alike) or a task spec file.

    Text tasks take ``tokenizer``, ``template``, ``max_length``, ``padding_side``, ``num_train``, ``num_eval``,
    ``seed``, ``hf_path``/``hf_config``/``cache_dir`` (see :func:`hiso.tasks.text.load_text_task`); their data come
    from ``data_dir``, else ``$HISO_DATA_DIR``, else the spec's own folder, else the Hugging Face hub. Fashion-MNIST
    takes ``num_train``, ``num_eval``, ``seed``; its files come from ``data_dir``, else ``$HISO_FASHION_MNIST_DIR``,
    else the Debian package's folder.
    """
    if _key(str(name)) in _REGISTRY:
        return _REGISTRY[_key(str(name))](data_dir, **kwargs)
    if _is_spec_file(name) or _find_spec(str(name)) is not None:
        return load_text_task(name, data_dir, **kwargs)
    raise ValueError(f"unknown task {name!r}; available: {available_tasks()}")


def register_task(name: str, factory: TaskFactory, *, overwrite: bool = False) -> None:
    """Add a task built by code: ``factory(data_dir=None, **kwargs)`` returns a :class:`ClassificationTask`.

    A text task needs no code: write a spec (TOML) and use :func:`register_task_spec` or pass its path as the name.
    """
    key = _key(name)
    if (key in _REGISTRY or _find_spec(name) is not None) and not overwrite:
        raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[key] = factory


def available_tasks() -> list[str]:
    return sorted(set(_REGISTRY) | set(TASK_SPECS))


@dataclass(frozen=True)
class TaskInfo:
    """What the command line needs to know about a task before loading anything heavy."""

    name: str
    kind: str  # "text" (needs a causal LM: takes --model) or "image" (its own model) or "custom"
    description: str
    spec: TextTaskSpec | None = None

    @property
    def takes_model(self) -> bool:
        return self.kind == "text"


def task_info(name: str) -> TaskInfo:
    """Name, kind and description of a task (``ValueError`` / ``FileNotFoundError`` if there is no such task)."""
    if _key(str(name)) == "fashion_mnist":
        return TaskInfo("fashion_mnist", "image", "Fashion-MNIST: 28x28 clothing images, 10 classes (SmallCNN)")
    if _key(str(name)) in _REGISTRY:
        return TaskInfo(_key(str(name)), "custom", "registered in code")
    if _is_spec_file(name) or str(name).endswith(".toml") or _find_spec(str(name)) is not None:
        spec = _get_spec(name)
        return TaskInfo(spec.name, "text", spec.description, spec)
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())} (or a task spec .toml file)")


def check_task_data(name: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Where the task's data would come from, checked without reading it (``FileNotFoundError`` if absent)."""
    info = task_info(name)
    if info.kind == "image":
        from .fashion_mnist import _resolve_dir

        return str(_resolve_dir(data_dir))
    if info.spec is not None:
        return _resolve_text_data(info.spec, data_dir)
    return str(data_dir or "")
