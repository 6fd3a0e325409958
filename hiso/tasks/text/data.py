"""Labelled text examples and where they come from: a local folder in the GLUE / SuperGLUE layouts (TSV or JSONL) or,
where a hub is reachable, a Hugging Face dataset (see ``hiso.tasks.text`` for the layouts and label orders)."""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import as_index_array
from .prompts import TEMPLATES

DATA_DIR_ENV = "HISO_DATA_DIR"


@dataclass(frozen=True)
class TextExample:
    """One labelled example: its text fields (already stripped), its class index, and its id in the source split."""

    fields: Mapping[str, str]
    label: int
    uid: str = ""


@dataclass(frozen=True)
class TextExamples:
    """An immutable, indexable split of :class:`TextExample` (implements :class:`hiso.tasks.base.Examples`)."""

    items: tuple[TextExample, ...]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TextExample:
        return self.items[i]

    def __iter__(self) -> Iterator[TextExample]:
        return iter(self.items)

    @functools.cached_property
    def labels(self) -> np.ndarray:
        labels = np.fromiter((ex.label for ex in self.items), dtype=np.int64, count=len(self.items))
        labels.flags.writeable = False  # shared by every caller: a stray in-place edit would corrupt splits
        return labels

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextExamples:
        idx = as_index_array(indices, len(self.items))
        return TextExamples(tuple(self.items[i] for i in idx))


@dataclass(frozen=True)
class TextTaskSpec:
    """Where a task's data lives (local files and Hugging Face dataset) and what its fields and labels are."""

    name: str
    label_names: tuple[str, ...]
    field_names: tuple[str, ...]
    local_files: tuple[str, str]  # (train, eval) file names inside the task folder
    hf_path: str
    hf_config: str
    hf_splits: tuple[str, str] = ("train", "validation")

    def __post_init__(self) -> None:
        for template in TEMPLATES.get(self.name, {}).values():
            assert len(template.verbalizer) == len(self.label_names), (self.name, template.name)
            assert set(template.field_names) <= set(self.field_names), (self.name, template.name)


TASK_SPECS: dict[str, TextTaskSpec] = {
    "sst2": TextTaskSpec("sst2", ("negative", "positive"), ("sentence",), ("train.tsv", "dev.tsv"), "glue", "sst2"),
    "cb": TextTaskSpec(
        "cb",
        ("entailment", "contradiction", "neutral"),
        ("premise", "hypothesis"),
        ("train.jsonl", "val.jsonl"),
        "super_glue",
        "cb",
    ),
    "rte": TextTaskSpec(
        "rte",
        ("entailment", "not_entailment"),
        ("premise", "hypothesis"),
        ("train.jsonl", "val.jsonl"),
        "super_glue",
        "rte",
    ),
}


def _label_index(value: Any, spec: TextTaskSpec, hf_label_names: Sequence[str] | None, where: str) -> int:
    """Normalise a label (name, integer, or integer string) to an index into ``spec.label_names``."""
    if isinstance(value, str):
        if value in spec.label_names:
            return spec.label_names.index(value)
        try:
            value = int(value)
        except ValueError:
            raise ValueError(
                f"{where}: unknown {spec.name} label {value!r}; expected one of {spec.label_names}"
            ) from None
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}: label must be a class name or an integer, got {value!r}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{where}: label {value} marks an unlabelled example (a test split?); use train/validation")
    if hf_label_names is not None:
        # Hugging Face ClassLabel integers: go through the dataset's own names so a different order cannot mislabel.
        if value >= len(hf_label_names):
            raise ValueError(f"{where}: label {value} out of range for the dataset's names {list(hf_label_names)}")
        return _label_index(hf_label_names[value], spec, None, where)
    if value >= len(spec.label_names):
        raise ValueError(f"{where}: label {value} out of range for {spec.name} labels {spec.label_names}")
    return value


def examples_from_records(
    spec: TextTaskSpec,
    records: Iterator[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    hf_label_names: Sequence[str] | None = None,
    origin: str = "",
) -> TextExamples:
    """Build examples from dict-like rows (a parsed file, or a Hugging Face split).

    ``hf_label_names`` are the source's names for its integer labels (``ds.features["label"].names``); without them
    integers are taken as indices into ``spec.label_names`` (true of the local SST-2 files).
    """
    items = []
    for i, row in enumerate(records):
        where = f"{origin or spec.name} row {i}"
        missing = [k for k in (*spec.field_names, "label") if k not in row]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}; has {sorted(row)}")
        fields = {k: str(row[k]).strip() for k in spec.field_names}
        label = _label_index(row["label"], spec, hf_label_names, where)
        uid = str(row["idx"]) if "idx" in row and row["idx"] is not None else str(i)
        items.append(TextExample(fields, label, uid))
    if not items:
        raise ValueError(f"{origin or spec.name}: no examples")
    return TextExamples(tuple(items))


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        # QUOTE_NONE: SST-2 sentences contain bare quotes (`` '' "), which the csv module would otherwise eat.
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        rows = []
        for line_no, cells in enumerate(reader, start=2):
            if not cells:
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated cells, got {len(cells)}")
            rows.append(dict(zip(header, cells, strict=True)))
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
    return rows


def _task_folder(spec: TextTaskSpec, data_dir: str | os.PathLike[str]) -> Path:
    """``data_dir`` itself if it holds the task's files, else ``data_dir/<task>`` (the shared-data root layout)."""
    root = Path(data_dir).expanduser()
    for folder in (root, root / spec.name):
        if all((folder / name).is_file() for name in spec.local_files):
            return folder
    raise FileNotFoundError(
        f"no {spec.name} data in {root}: expected {' and '.join(spec.local_files)} there or in {root / spec.name}"
    )


def load_text_examples(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hf_path: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | None = None,
) -> tuple[TextExamples, TextExamples, str]:
    """(train, eval, source) for task ``name``.

    Source order: ``data_dir``; else the ``HISO_DATA_DIR`` environment variable; else the Hugging Face hub through
    ``datasets.load_dataset(hf_path, hf_config)`` (defaults from :data:`TASK_SPECS`; ``cache_dir`` is passed on).
    ``data_dir`` may be the task folder itself or a root holding ``<task>/``.
    """
    spec = _spec(name)
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        folder = _task_folder(spec, data_dir)
        splits = []
        for file_name in spec.local_files:
            path = folder / file_name
            rows = _read_tsv(path) if path.suffix == ".tsv" else _read_jsonl(path)
            splits.append(examples_from_records(spec, rows, origin=str(path)))
        return splits[0], splits[1], str(folder)
    return _load_from_hub(spec, hf_path or spec.hf_path, hf_config or spec.hf_config, cache_dir)


def _load_from_hub(
    spec: TextTaskSpec, path: str, config: str, cache_dir: str | None
) -> tuple[TextExamples, TextExamples, str]:
    try:
        import datasets  # optional: only needed where a hub is reachable
    except ImportError:
        raise ImportError(
            f"task {spec.name!r}: no local data given and the `datasets` library is not installed. Pass data_dir= "
            f"(a folder with {' and '.join(spec.local_files)}), set {DATA_DIR_ENV}, or `pip install datasets` "
            "where the Hugging Face hub is reachable."
        ) from None
    splits = []
    for split in spec.hf_splits:
        try:
            ds = datasets.load_dataset(path, config, split=split, cache_dir=cache_dir)
        except Exception as exc:  # network, missing dataset, ...: say what to do instead
            raise RuntimeError(
                f"task {spec.name!r}: could not load {path}/{config} split {split!r} from the hub ({exc}). "
                f"Offline, pass data_dir= or set {DATA_DIR_ENV} to a local copy."
            ) from exc
        names = getattr(ds.features.get("label"), "names", None)
        splits.append(examples_from_records(spec, ds, hf_label_names=names, origin=f"{path}/{config}:{split}"))
    return splits[0], splits[1], f"hub:{path}/{config}"


def _spec(name: str) -> TextTaskSpec:
    try:
        return TASK_SPECS[name]
    except KeyError:
        raise ValueError(f"unknown text task {name!r}; known: {sorted(TASK_SPECS)}") from None
