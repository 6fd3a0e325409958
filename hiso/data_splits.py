"""Partition a training set over federated clients: IID, or label-skewed by a Dirichlet(alpha) draw per class.

Every function returns one sorted int64 index array per client; together they hold every example exactly once,
and no client is empty (or below ``min_size``). Results depend only on the inputs and ``seed``.

The non-IID scheme is the per-class Dirichlet split of Hsu, Qi & Brown 2019 ("Measuring the effects of
non-identical data distribution for federated visual classification", arXiv 1909.06335), which DeComFL also uses for
its non-IID experiments: for each class c, proportions p_c ~ Dir(alpha 1_n) divide that class's examples among the n
clients. Small alpha (0.1) gives clients a few dominant classes; large alpha (100) approaches IID.

>>> parts = split_clients(task.train_labels, num_clients=8, scheme="dirichlet", alpha=0.5, seed=0)
>>> client_examples = [task.train_examples.subset(p) for p in parts]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = [
    "check_partition",
    "dirichlet_split",
    "iid_split",
    "label_counts",
    "label_skew",
    "split_clients",
]

Scheme = Literal["iid", "dirichlet"]


def _as_labels(labels: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError("labels must be non-negative class indices")
    return arr.astype(np.int64, copy=False)


def _check_counts(num_examples: int, num_clients: int, min_size: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be at least 1, got {min_size}")
    if num_examples < num_clients * min_size:
        raise ValueError(f"{num_examples} examples cannot give {num_clients} clients at least {min_size} each")


def iid_split(
    labels_or_count: Sequence[int] | np.ndarray | int, num_clients: int, *, seed: int = 0
) -> list[np.ndarray]:
    """A uniformly random split into ``num_clients`` parts whose sizes differ by at most one."""
    n = int(labels_or_count) if isinstance(labels_or_count, (int, np.integer)) else len(labels_or_count)
    _check_counts(n, num_clients, 1)
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, num_clients)]


def dirichlet_split(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_size: int = 1,
    max_redraws: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each class divided among the clients in Dirichlet(alpha) proportions.

    A draw that leaves a client with fewer than ``min_size`` examples is redrawn (up to ``max_redraws`` times, as
    common implementations do); if that keeps failing (tiny alpha, many clients), examples are moved one at a time
    from the largest client to the smallest until all reach ``min_size``, which changes as little of the skew as
    possible.
    """
    y = _as_labels(labels)
    _check_counts(len(y), num_clients, min_size)
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_redraws + 1):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            break
    else:
        merged = _fill_small_clients(merged, min_size, rng)
    return [np.sort(p).astype(np.int64) for p in merged]


def _fill_small_clients(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts = [rng.permutation(p) for p in parts]
    sizes = np.array([len(p) for p in parts])
    while sizes.min() < min_size:
        small, large = int(sizes.argmin()), int(sizes.argmax())
        parts[small] = np.append(parts[small], parts[large][-1])
        parts[large] = parts[large][:-1]
        sizes[small] += 1
        sizes[large] -= 1
    return parts


def split_clients(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    *,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Dispatch to :func:`iid_split` (``alpha`` unused) or :func:`dirichlet_split`."""
    if scheme == "iid":
        parts = iid_split(labels, num_clients, seed=seed)
        if min(len(p) for p in parts) < min_size:
            raise ValueError(f"{len(labels)} examples cannot give {num_clients} clients at least {min_size} each")
        return parts
    if scheme == "dirichlet":
        return dirichlet_split(labels, num_clients, alpha, seed=seed, min_size=min_size)
    raise ValueError(f"scheme must be 'iid' or 'dirichlet', got {scheme!r}")


def check_partition(parts: Sequence[np.ndarray], num_examples: int) -> None:
    """Raise ``ValueError`` unless ``parts`` hold each of ``range(num_examples)`` exactly once, none empty."""
    if any(len(p) == 0 for p in parts):
        raise ValueError("a client has no examples")
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    if len(flat) != num_examples or not np.array_equal(np.sort(flat), np.arange(num_examples)):
        raise ValueError("the parts do not hold every example exactly once")


def label_counts(
    labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """``[num_clients, num_classes]`` counts of each label on each client."""
    y = _as_labels(labels)
    c = int(num_classes if num_classes is not None else y.max() + 1)
    return np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=c) for p in parts])


def label_skew(labels: Sequence[int] | np.ndarray, parts: Sequence[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one (0 = IID).

    In [0, 1). IID splits give a few hundredths for clients of a few thousand examples; Dirichlet(0.1) over 10
    classes gives about 0.7.
    """
    counts = label_counts(labels, parts)
    client = counts / counts.sum(axis=1, keepdims=True)
    overall = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(client - overall).sum(axis=1).mean())
