"""Fashion-MNIST (Xiao et al. 2017): IDX loader, normalisation, a small CNN for ZO training, and the task.

The data are the original IDX files, as the Debian package ``dataset-fashion-mnist`` installs them
(``apt-get install -y dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,
labels-idx1}-ubyte.gz``). Another folder can be named by argument or by the ``HISO_FASHION_MNIST_DIR`` variable;
files may be gzipped or not.

DeComFL trains a two-convolution CNN on Fashion-MNIST with ZO; :class:`SmallCNN` follows that layout (without
batch norm, whose batch statistics would make the two evaluations of a ZO step see different functions) and stays
around 26k parameters so ZO training takes minutes on two CPU cores.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from .base import ClassificationTask, accuracy, as_index_array, batch_order, classification_loss, evaluate

__all__ = [
    "DEFAULT_DIR",
    "DIR_ENV",
    "LABEL_NAMES",
    "MEAN",
    "STD",
    "FashionMNISTTask",
    "ImageBatch",
    "ImageExamples",
    "SmallCNN",
    "accuracy",
    "classification_loss",
    "evaluate",
    "load_fashion_mnist",
    "load_fashion_mnist_task",
    "normalize",
    "read_idx",
]

DIR_ENV = "HISO_FASHION_MNIST_DIR"
DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
LABEL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Pixel mean and standard deviation of the 60,000 training images, scaled to [0, 1] (computed from the files).
MEAN = 0.2860
STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not: told apart by content, not name) of unsigned bytes into an array."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{raw[2]:02x}; only unsigned bytes (0x08) are supported")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but the header {shape} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _resolve_dir(root: str | os.PathLike[str] | None) -> Path:
    if root is None:
        root = os.environ.get(DIR_ENV) or DEFAULT_DIR
    base = Path(root).expanduser()
    stem = _FILES["train"][0]
    for folder in (base, base / "fashion-mnist", base / "fashion_mnist"):
        if any((folder / (stem + ext)).is_file() for ext in (".gz", "")):
            return folder
    raise FileNotFoundError(
        f"no Fashion-MNIST IDX files ({stem}[.gz], ...) in {base}. Install them with `{_APT_HINT}`, or point "
        f"root= or {DIR_ENV} at a folder holding them."
    )


def _find(folder: Path, stem: str) -> Path:
    for ext in (".gz", ""):
        if (folder / (stem + ext)).is_file():
            return folder / (stem + ext)
    raise FileNotFoundError(f"{folder}: missing {stem}.gz (or {stem})")


def load_fashion_mnist(
    split: Literal["train", "test"] = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 ``[N, 28, 28]``, labels int64 ``[N]``) of the ``"train"`` (60k) or ``"test"`` (10k) split.

    ``root``: folder of the IDX files; default ``$HISO_FASHION_MNIST_DIR``, else the Debian package's folder.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _resolve_dir(root)
    image_stem, label_stem, count = _FILES[split]
    images = read_idx(_find(folder, image_stem))
    labels = read_idx(_find(folder, label_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}/{image_stem}: expected [N, 28, 28] images, got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{folder}: {images.shape[0]} images but labels of shape {labels.shape}")
    if images.shape[0] != count:
        raise ValueError(f"{folder}: the {split} split has {images.shape[0]} images, Fashion-MNIST has {count}")
    if labels.max() >= len(LABEL_NAMES):
        raise ValueError(f"{folder}: label {labels.max()} out of range [0, {len(LABEL_NAMES)})")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 1, 28, 28]``, standardised with the training set's mean and std."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)


class SmallCNN(nn.Module):
    """conv5x5(1->c1) ReLU maxpool2, conv5x5(c1->c2) ReLU maxpool2, linear(16 c2->hidden) ReLU, linear(->10).

    Defaults (16, 32, 24) give 25,810 parameters; ``hidden=0`` drops the hidden layer (DeComFL's single linear).
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 24, num_classes: int = 10) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = c2 * 4 * 4  # 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4
        if hidden > 0:
            self.classifier = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ImageExamples:
    """Images (uint8 ``[N, 28, 28]``) and labels (int64 ``[N]``); implements :class:`hiso.tasks.base.Examples`."""

    images: torch.Tensor
    label_tensor: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.label_tensor.shape[0]:
            raise ValueError(f"{self.images.shape[0]} images but {self.label_tensor.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.label_tensor.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.label_tensor[i])

    @property
    def labels(self) -> np.ndarray:
        labels = self.label_tensor.numpy()
        labels.flags.writeable = False  # a view of the tensor: no in-place edits through it
        return labels

    def subset(self, indices) -> ImageExamples:
        idx = torch.from_numpy(as_index_array(indices, len(self)))
        return ImageExamples(self.images[idx], self.label_tensor[idx])


@dataclass(frozen=True)
class ImageBatch:
    """Normalised images ``[B, 1, 28, 28]`` and labels; ``class_logits(model)`` is ``model(x)``."""

    x: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> ImageBatch:
        return replace(self, x=self.x.to(device, non_blocking=True), labels=self.labels.to(device, non_blocking=True))

    def class_logits(self, model: nn.Module) -> torch.Tensor:
        param = next(model.parameters(), None)
        x = self.x if param is None else self.x.to(device=param.device, dtype=param.dtype)
        return model(x)


@dataclass
class FashionMNISTTask(ClassificationTask):
    """Fashion-MNIST classification: train (60k) and test (10k, the eval split) examples."""

    train_examples: ImageExamples
    eval_examples: ImageExamples
    name: str = "fashion_mnist"
    label_names: tuple[str, ...] = LABEL_NAMES
    source: str = ""

    def make_batches(
        self,
        examples: ImageExamples,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ) -> list[ImageBatch]:
        x = examples.images
        y = examples.label_tensor
        batches = []
        for idx in batch_order(len(examples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            index = torch.from_numpy(idx)
            batches.append(ImageBatch(normalize(x[index]), y[index]))
        return batches

    def make_model(self, seed: int = 0, **kwargs) -> SmallCNN:
        """A :class:`SmallCNN` initialised from ``seed`` without touching the global RNG state."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return SmallCNN(num_classes=self.num_classes, **kwargs)


def load_fashion_mnist_task(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    num_train: int | None = None,
    num_eval: int | None = None,
    seed: int = 0,
) -> FashionMNISTTask:
    """Fashion-MNIST as a task; ``num_train``/``num_eval`` keep a random subset (deterministic in ``seed``).

    ``data_dir`` is the IDX folder (or a folder holding ``fashion-mnist/``); see :func:`load_fashion_mnist`.
    """
    folder = _resolve_dir(data_dir)
    splits = []
    for split, n, stream in (("train", num_train, 0), ("test", num_eval, 1)):
        examples = ImageExamples(*load_fashion_mnist(split, folder))
        if n is not None and n < len(examples):
            if n < 1:
                raise ValueError(f"subset size must be positive, got {n}")
            rng = np.random.default_rng([seed, stream])
            examples = examples.subset(np.sort(rng.choice(len(examples), size=n, replace=False)))
        splits.append(examples)
    return FashionMNISTTask(train_examples=splits[0], eval_examples=splits[1], source=str(folder))
