"""Client partitions: every example exactly once, no empty client, deterministic, and Dirichlet skew vs IID."""

from __future__ import annotations

import numpy as np
import pytest

from hiso.data_splits import (
    check_partition,
    dirichlet_split,
    iid_split,
    label_counts,
    label_skew,
    split_clients,
)


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    # 10 balanced classes, 6,000 examples, shuffled: a Fashion-MNIST-like label vector without the files
    return np.random.default_rng(123).permutation(np.repeat(np.arange(10), 600))


@pytest.mark.parametrize("num_clients", [1, 3, 7, 100])
def test_iid_sizes_and_cover(labels, num_clients):
    parts = iid_split(labels, num_clients, seed=0)
    check_partition(parts, len(labels))
    sizes = [len(p) for p in parts]
    assert len(parts) == num_clients
    assert max(sizes) - min(sizes) <= 1
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates


def test_iid_accepts_a_count():
    parts = iid_split(10, 3, seed=1)
    check_partition(parts, 10)
    assert [len(p) for p in parts] == [4, 3, 3]


@pytest.mark.parametrize("alpha", [0.05, 0.5, 10.0])
@pytest.mark.parametrize("num_clients", [2, 10, 50])
def test_dirichlet_cover_no_empty(labels, alpha, num_clients):
    parts = dirichlet_split(labels, num_clients, alpha, seed=0)
    check_partition(parts, len(labels))
    assert len(parts) == num_clients


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_deterministic_given_seed(labels, scheme):
    a = split_clients(labels, 8, scheme=scheme, alpha=0.3, seed=5)
    b = split_clients(labels, 8, scheme=scheme, alpha=0.3, seed=5)
    c = split_clients(labels, 8, scheme=scheme, alpha=0.3, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_dirichlet_skew_vs_iid(labels):
    iid = label_skew(labels, iid_split(labels, 10, seed=0))
    skewed = label_skew(labels, dirichlet_split(labels, 10, alpha=0.1, seed=0))
    mild = label_skew(labels, dirichlet_split(labels, 10, alpha=100.0, seed=0))
    assert iid < 0.08  # 600 examples per client: only sampling noise
    assert skewed > 0.5  # a few dominant classes per client
    assert mild < 0.08  # large alpha approaches IID
    # with alpha=0.1 most clients miss some classes entirely; IID clients see every class
    assert (label_counts(labels, dirichlet_split(labels, 10, 0.1, seed=0)) == 0).any(axis=1).mean() > 0.5
    assert (label_counts(labels, iid_split(labels, 10, seed=0)) > 0).all()


def test_dirichlet_fix_up_when_redraws_fail():
    # 2 classes, 40 clients, tiny alpha: almost every draw leaves clients empty; the fix-up must still cover all
    labels = np.repeat([0, 1], 50)
    parts = dirichlet_split(labels, 40, alpha=0.01, seed=0, min_size=2, max_redraws=3)
    check_partition(parts, len(labels))
    assert min(len(p) for p in parts) >= 2


def test_min_size_respected(labels):
    parts = dirichlet_split(labels, 20, alpha=0.2, seed=3, min_size=50)
    assert min(len(p) for p in parts) >= 50
    check_partition(parts, len(labels))


def test_split_on_real_task_labels():
    # the label arrays tasks expose are read-only int64: the splitters must accept them
    labels = np.repeat(np.arange(3), [100, 20, 5]).astype(np.int64)
    labels.flags.writeable = False
    check_partition(split_clients(labels, 5, scheme="dirichlet", alpha=0.5), len(labels))


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: iid_split(3, 4), ValueError),  # more clients than examples
        (lambda: iid_split([0, 1], 0), ValueError),
        (lambda: dirichlet_split([0, 1, 1], 2, alpha=0.0), ValueError),
        (lambda: dirichlet_split([0, 1, 1], 2, alpha=float("nan")), ValueError),
        (lambda: dirichlet_split([0, -1, 1], 2, alpha=1.0), ValueError),
        (lambda: dirichlet_split([0.5, 1.0], 2, alpha=1.0), TypeError),
        (lambda: dirichlet_split([[0, 1]], 1, alpha=1.0), ValueError),
        (lambda: dirichlet_split([0, 1, 1], 2, alpha=1.0, min_size=2), ValueError),
        (lambda: split_clients([0, 1], 2, scheme="pathological"), ValueError),
    ],
)
def test_bad_input(call, error):
    with pytest.raises(error):
        call()


def test_check_partition_rejects_bad_partitions():
    with pytest.raises(ValueError, match="exactly once"):
        check_partition([np.array([0, 1]), np.array([1, 2])], 3)
    with pytest.raises(ValueError, match="exactly once"):
        check_partition([np.array([0, 1])], 3)
    with pytest.raises(ValueError, match="no examples"):
        check_partition([np.array([0, 1, 2]), np.array([], dtype=np.int64)], 3)
