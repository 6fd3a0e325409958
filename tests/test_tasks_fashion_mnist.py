"""Fashion-MNIST: IDX parsing, the real files (Debian package dataset-fashion-mnist), SmallCNN, task interface."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from hiso.data_splits import check_partition, split_clients
from hiso.tasks import get_task
from hiso.tasks.fashion_mnist import (
    DEFAULT_DIR,
    DIR_ENV,
    MEAN,
    STD,
    FashionMNISTTask,
    ImageExamples,
    SmallCNN,
    load_fashion_mnist,
    normalize,
    read_idx,
)


def _real_dir() -> Path | None:
    folder = Path(os.environ.get(DIR_ENV) or DEFAULT_DIR)
    return folder if (folder / "train-images-idx3-ubyte.gz").is_file() else None


needs_files = pytest.mark.skipif(
    _real_dir() is None,
    reason=f"Fashion-MNIST IDX files absent (apt-get install -y dataset-fashion-mnist, or set {DIR_ENV})",
)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _fake_dataset(folder: Path, compress: bool = True) -> None:
    """A stand-in with the real file names and the real sizes (IDX headers checked against 60k/10k)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if compress else ""
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", np.zeros((n, 28, 28), np.uint8), compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", rng.integers(0, 10, n), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x", array, compress)
    np.testing.assert_array_equal(read_idx(tmp_path / "x"), array)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="implies"):
        read_idx(tmp_path / "short")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1]) + (1).to_bytes(4, "big") + b"abcd")
    with pytest.raises(ValueError, match="unsigned bytes"):
        read_idx(tmp_path / "float")


def test_loader_path_override_and_env(tmp_path, monkeypatch):
    _fake_dataset(tmp_path / "fm", compress=False)
    images, labels = load_fashion_mnist("test", root=tmp_path / "fm")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    monkeypatch.setenv(DIR_ENV, str(tmp_path))  # a parent folder holding fashion-mnist/ also works
    (tmp_path / "fm").rename(tmp_path / "fashion-mnist")
    assert load_fashion_mnist("test")[0].shape[0] == 10_000


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=tmp_path)


@needs_files
def test_real_files():
    folder = _real_dir()
    train_x, train_y = load_fashion_mnist("train", folder)
    test_x, test_y = load_fashion_mnist("test", folder)
    assert train_x.shape == (60_000, 28, 28) and test_x.shape == (10_000, 28, 28)
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    # the published class balance: 6,000 per class in train, 1,000 in test
    assert torch.bincount(train_y).tolist() == [6000] * 10
    assert torch.bincount(test_y).tolist() == [1000] * 10
    x = normalize(train_x[:10_000])
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02  # the documented MEAN and STD
    assert (
        abs(float(train_x.float().mean() / 255) - MEAN) < 1e-3 and abs(float(train_x.float().std() / 255) - STD) < 1e-3
    )


@needs_files
def test_task_interface_and_cnn_on_real_data():
    task = get_task("fashion_mnist", num_train=2_000, num_eval=500, seed=0)
    assert isinstance(task, FashionMNISTTask)
    assert task.num_classes == 10 and len(task.train_examples) == 2_000 and len(task.eval_examples) == 500
    assert task.train_labels.shape == (2_000,) and task.train_labels.dtype == np.int64
    parts = split_clients(task.train_labels, 4, scheme="dirichlet", alpha=0.5, seed=0)
    check_partition(parts, 2_000)
    client = task.train_examples.subset(parts[0])
    batches = task.make_batches(client, 64, shuffle=True, seed=1)
    assert sum(len(b) for b in batches) == len(client)
    assert batches[0].x.shape[1:] == (1, 28, 28) and batches[0].x.dtype == torch.float32
    model = task.make_model(seed=0)
    with torch.no_grad():
        loss = task.loss(model, batches[0])
        acc = task.accuracy(model, task.make_batches(task.eval_examples, 128))
    assert loss.ndim == 0 and torch.isfinite(loss) and abs(float(loss) - np.log(10)) < 0.5  # untrained: ~ln 10
    assert 0.0 <= acc <= 1.0


def test_small_cnn_shapes_and_size():
    model = SmallCNN()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == 25_810  # documented: small enough for ZO training in minutes on 2 cores
    assert 20_000 <= n_params <= 30_000
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert sum(p.numel() for p in SmallCNN(hidden=0).parameters()) == 18_378


def test_make_model_deterministic_and_rng_neutral():
    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    task = FashionMNISTTask(
        ImageExamples(images, torch.tensor([0, 1, 2])), ImageExamples(images, torch.tensor([0, 1, 2]))
    )
    state = torch.random.get_rng_state()
    a, b, c = task.make_model(seed=1), task.make_model(seed=1), task.make_model(seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters(), strict=True))


def test_batching_shuffle_drop_last_and_losses():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (50, 28, 28), dtype=np.uint8))
    labels = torch.from_numpy(rng.integers(0, 10, 50)).long()
    task = FashionMNISTTask(ImageExamples(images, labels), ImageExamples(images[:10], labels[:10]))
    plain = task.make_batches(task.train_examples, 16)
    assert [len(b) for b in plain] == [16, 16, 16, 2]
    assert [len(b) for b in task.make_batches(task.train_examples, 16, drop_last=True)] == [16, 16, 16]
    shuffled = task.make_batches(task.train_examples, 16, shuffle=True, seed=3)
    again = task.make_batches(task.train_examples, 16, shuffle=True, seed=3)
    assert all(torch.equal(x.labels, y.labels) for x, y in zip(shuffled, again, strict=True))
    assert sorted(torch.cat([b.labels for b in shuffled]).tolist()) == sorted(labels.tolist())
    model = task.make_model()
    with torch.no_grad():
        per_batch = [float(task.loss(model, b)) for b in plain]
        result = task.evaluate(model, plain)
    expected = (
        sum(value * len(b) for value, b in zip(per_batch, plain, strict=True)) / 50
    )  # example-weighted, not batch-averaged
    assert result.loss == pytest.approx(expected, rel=1e-5) and result.num_examples == 50
    with pytest.raises(ValueError, match="batch_size"):
        task.make_batches(task.train_examples, 0)
    with pytest.raises(IndexError):
        task.train_examples.subset([0, 50])
    with pytest.raises(TypeError):
        normalize(images.float())
