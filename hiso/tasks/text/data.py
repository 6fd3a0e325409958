"""Labelled text examples and where they come from: a local folder in the GLUE / SuperGLUE layouts or a Hugging Face
dataset, both read through the ``datasets`` library (``load_dataset("json" | "csv", data_files=...)`` offline), then
turned into examples by the task's spec (:mod:`hiso.tasks.text.spec`): nested lists flattened, fields picked by
path, labels (strings, integers or booleans) mapped to class indices."""

from __future__ import annotations

import contextlib
import csv
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..base import as_index_array
from .spec import TextTaskSpec, normalize_name

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


# --------------------------------------------------------------------------------------------------------------------
# Records -> examples
# --------------------------------------------------------------------------------------------------------------------

_MISSING = object()


def _get(record: Any, path: str) -> Any:
    value = record
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _lookup(scopes: Sequence[Mapping[str, Any]], paths: Sequence[str]) -> Any:
    """The first path found, each tried from the innermost scope outwards (a MultiRC answer, its question, the row)."""
    for path in paths:
        for scope in scopes:
            value = _get(scope, path)
            if value is not _MISSING and value is not None:
                return value
    return _MISSING


def _flatten(row: Mapping[str, Any], explode: Sequence[str]) -> Iterator[list[Mapping[str, Any]]]:
    """Scope chains (innermost first) of the examples in ``row``: one per item of the nested lists in ``explode``
    (SuperGLUE's MultiRC: ``passage.questions`` then ``answers``); the row itself when it has no such list (the
    already-flat Hugging Face layout)."""
    chains: list[list[Mapping[str, Any]]] = [[row]]
    for path in explode:
        nxt = []
        for chain in chains:
            items = _get(chain[0], path)
            if items is _MISSING:
                nxt.append(chain)
            elif isinstance(items, list):
                nxt.extend([item, *chain] for item in items if isinstance(item, Mapping))
            else:
                raise ValueError(f"{path!r} must be a list, got {type(items).__name__}")
        chains = nxt
    yield from chains


def label_index(value: Any, spec: TextTaskSpec, hf_label_names: Sequence[str] | None = None, where: str = "") -> int:
    """Normalise a label (class name, integer, boolean, or their string forms) to an index into the spec's classes.

    ``hf_label_names`` are the source's names for integer labels (a Hugging Face ``ClassLabel``): integers then go
    through those names, so a source that orders its classes differently cannot mislabel.
    """
    where = where or spec.name
    values, names = spec.label_values, spec.label_names
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
        raise ValueError(f"{where}: label {value!r} marks an unlabelled example (a test split?); use train/validation")
    if isinstance(value, bool):
        if value in values and any(type(v) is bool for v in values):
            return values.index(value)
        return label_index(str(value), spec, None, where)
    if isinstance(value, (int, np.integer)):
        value = int(value)
        if hf_label_names is not None:
            if value >= len(hf_label_names):
                raise ValueError(f"{where}: label {value} out of range for the dataset's names {list(hf_label_names)}")
            return label_index(str(hf_label_names[value]), spec, None, where)
        if isinstance(values[0], bool) and value in (0, 1):
            return values.index(bool(value))
        if isinstance(values[0], int) and value in values:
            return values.index(value)
        if isinstance(values[0], str) and 0 <= value < len(values):  # an index into the class list (GLUE's SST-2)
            return value
        raise ValueError(f"{where}: label {value} out of range for {spec.name} labels {list(names)}")
    if isinstance(value, str):
        text = value.strip()
        for candidates in (names, [str(v) for v in values]):
            if text in candidates:
                return candidates.index(text)
        folded = text.lower()
        for candidates in (names, [str(v) for v in values]):
            lowered = [c.lower() for c in candidates]
            if folded in lowered:
                return lowered.index(folded)
        with contextlib.suppress(ValueError):
            return label_index(int(text), spec, None, where)
        raise ValueError(f"{where}: unknown {spec.name} label {value!r}; expected one of {list(names)}")
    raise TypeError(f"{where}: label must be a class name, an integer or a boolean, got {value!r}")


def _uid(scopes: Sequence[Mapping[str, Any]], fallback: int) -> str:
    ids = [str(s["idx"]) for s in reversed(scopes) if isinstance(s, Mapping) and s.get("idx") is not None]
    return "/".join(ids) if ids else str(fallback)


def examples_from_records(
    spec: TextTaskSpec,
    records: Iterator[Mapping[str, Any]] | Sequence[Mapping[str, Any]],
    *,
    hf_label_names: Sequence[str] | None = None,
    origin: str = "",
) -> TextExamples:
    """Build examples from dict-like rows (a parsed file, or a Hugging Face split), following ``spec``."""
    items = []
    count = 0
    for i, row in enumerate(records):
        for scopes in _flatten(row, spec.explode):
            where = f"{origin or spec.name} row {i}"
            fields = {}
            for name, source in spec.fields.items():
                value = _lookup(scopes, source.paths)
                if value is _MISSING:
                    raise ValueError(
                        f"{where}: missing field {name!r} (looked for {list(source.paths)}); has {sorted(scopes[-1])}"
                    )
                value = str(value).strip()
                if source.mapping is not None:
                    if value not in source.mapping:
                        raise ValueError(
                            f"{where}: field {name!r} value {value!r} not in its map {sorted(source.mapping)}"
                        )
                    value = source.mapping[value]
                fields[name] = value
            raw = _lookup(scopes, spec.label_paths)
            if raw is _MISSING:
                raise ValueError(
                    f"{where}: missing label (looked for {list(spec.label_paths)}); has {sorted(scopes[-1])}"
                )
            items.append(TextExample(fields, label_index(raw, spec, hf_label_names, where), _uid(scopes, count)))
            count += 1
    if not items:
        raise ValueError(f"{origin or spec.name}: no examples")
    return TextExamples(tuple(items))


# --------------------------------------------------------------------------------------------------------------------
# Files and the hub, through `datasets`
# --------------------------------------------------------------------------------------------------------------------


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "text tasks read their data with the `datasets` library: pip install datasets "
            '(or pip install ".[llm]" from the hiso source folder)'
        ) from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No "Generating train split" bars for a few kilobytes of local data; the caller's setting comes back."""
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def _task_folder(spec: TextTaskSpec, data_dir: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(folder, train file, eval file): ``data_dir`` itself if it holds the task's files, else its sub-folder named
    after the task (any case, "-"/"_" ignored: ``sst2``, ``SST-2``, ``BoolQ``, ``boolq``)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    wanted = {normalize_name(n) for n in (spec.name, *spec.aliases)}
    folders = [root] + sorted(p for p in root.iterdir() if p.is_dir() and normalize_name(p.name) in wanted)
    for folder in folders:
        train = next((folder / f for f in spec.train_files if (folder / f).is_file()), None)
        eval_ = next((folder / f for f in spec.eval_files if (folder / f).is_file()), None)
        if train is not None and eval_ is not None:
            return folder, train, eval_
    names = " or ".join(sorted({spec.name, *spec.aliases}))
    raise FileNotFoundError(
        f"no {spec.name} data in {root}: expected {'/'.join(spec.train_files)} and {'/'.join(spec.eval_files)} "
        f"there or in a sub-folder named {names} (any case)"
    )


def _read_file(datasets: Any, path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        builder, kwargs = "json", {}
    elif suffix in (".tsv", ".csv"):
        # QUOTE_NONE: SST-2 sentences contain bare quotes; no NA parsing: a sentence may read "null" or "n/a".
        sep = "\t" if suffix == ".tsv" else ","
        builder, kwargs = "csv", {"sep": sep, "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_filter": False}
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json, .tsv or .csv)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file")
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as exc:  # pyarrow / pandas parse errors arrive wrapped in DatasetGenerationError
        cause = exc.__cause__ or exc
        raise ValueError(f"{path}: could not be read as {builder.upper()} ({type(cause).__name__}: {cause})") from None
    return ds.to_list()


@functools.lru_cache(maxsize=32)
def _cached_rows(path: str, mtime: float, size: int) -> tuple[dict[str, Any], ...]:
    """A file's rows, read once per (path, modification time, size): the CLI checks the data before it loads the
    model, and the run then reads the same files again."""
    return tuple(_read_file(_datasets(), Path(path)))


def _split(spec: TextTaskSpec, path: Path) -> TextExamples:
    st = path.stat()
    return examples_from_records(spec, _cached_rows(str(path), st.st_mtime, st.st_size), origin=str(path))


def resolve_data(spec: TextTaskSpec, data_dir: str | os.PathLike[str] | None = None) -> str:
    """Where ``spec``'s examples would come from, checked without reading them: the task folder, or ``hub:...``.

    Raises ``FileNotFoundError`` (with what was expected) for a folder without the task's files.
    """
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV) or spec.data_dir
    if data_dir is not None:
        return str(_task_folder(spec, data_dir)[0])
    if spec.hf_path is None:
        raise FileNotFoundError(f"task {spec.name!r} has no hub dataset: give a data folder (--data-dir / data_dir=)")
    return f"hub:{spec.hf_path}" + (f"/{spec.hf_config}" if spec.hf_config else "")


def load_text_examples(
    spec: TextTaskSpec | str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    hf_path: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | None = None,
) -> tuple[TextExamples, TextExamples, str]:
    """(train, eval, source) for ``spec``.

    Source order: ``data_dir``; else ``$HISO_DATA_DIR``; else the spec's own ``data.dir``; else the Hugging Face hub
    (``datasets.load_dataset(hf_path, hf_config)``, defaults from the spec; ``cache_dir`` is passed on). A folder may
    be the task folder itself or a root holding it. Parsed splits are cached per file and modification time.
    """
    if not isinstance(spec, TextTaskSpec):
        from .registry import get_spec

        spec = get_spec(spec)
    if data_dir is None and hf_path is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or spec.data_dir
    if data_dir is not None:
        folder, train, eval_ = _task_folder(spec, data_dir)
        splits = [_split(spec, p) for p in (train, eval_)]
        return splits[0], splits[1], str(folder)
    path = hf_path or spec.hf_path
    if path is None:
        raise FileNotFoundError(f"task {spec.name!r} has no hub dataset: pass data_dir= (or set {DATA_DIR_ENV})")
    return _load_from_hub(spec, path, hf_config or spec.hf_config, cache_dir)


def _load_from_hub(
    spec: TextTaskSpec, path: str, config: str | None, cache_dir: str | None
) -> tuple[TextExamples, TextExamples, str]:
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"task {spec.name!r}: no local data given and the `datasets` library is not installed. Pass data_dir= "
            f"(a folder with {spec.train_files[0]} and {spec.eval_files[0]}), set {DATA_DIR_ENV}, or `pip install "
            "datasets` where the Hugging Face hub is reachable."
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
        label = getattr(ds, "features", {}).get(spec.label_paths[0])
        names = getattr(label, "names", None)
        splits.append(examples_from_records(spec, ds, hf_label_names=names, origin=f"{path}/{config}:{split}"))
    return splits[0], splits[1], f"hub:{path}/{config}"
