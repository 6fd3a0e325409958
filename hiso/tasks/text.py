"""Text classification with a causal LM as prompt + verbaliser (SST-2, CB, RTE), the setting of MeZO and DeComFL.

An example is rendered into a prompt; the model's next-token logits at the last prompt position, restricted to one
token per class (the verbaliser), are the class logits. Loss is cross-entropy over those few logits, as in MeZO's
classification objective (Malladi et al. 2023, arXiv 2305.17333) and DeComFL's LLM experiments (arXiv 2405.15861),
which restrict the last-position logits to the verbaliser token ids.

Templates (``TEMPLATES[task][name]``; ``"mezo"``, the default, is MeZO's ``large_models/templates.py``, which
takes CB and RTE from PromptSource; ``"gpt3"`` is the GPT-3 paper's question/answer style):

* sst2/mezo: ``{sentence} It was`` -> " terrible" | " great"
* cb/mezo: ``Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\\n`` -> "Yes" | "No" | "Maybe"
* cb/gpt3: ``{premise}\\nQuestion: {hypothesis} True, False, or Neither?\\nAnswer:`` -> " True" | " False" | " Neither"
* rte/mezo: ``{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?\\n`` -> "Yes" | "No"
* rte/gpt3: ``{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:`` -> " True" | " False"

Labels are SST-2 (negative, positive), CB (entailment, contradiction, neutral), RTE (entailment, not_entailment):
the Hugging Face ``ClassLabel`` orders, so a verbaliser lists one word per label in that order. Fields are stripped
of surrounding whitespace before rendering (GLUE's SST-2 sentences end with a space; MeZO strips them too).

Data comes from a local folder in the layout of the project's shared data (``sst2/train.tsv`` + ``dev.tsv`` with a
``sentence\\tlabel`` header; ``cb`` and ``rte`` as ``train.jsonl`` + ``val.jsonl`` with string labels), or, where a
hub is reachable and the ``datasets`` library is installed, from the Hugging Face datasets ``glue/sst2``,
``super_glue/cb`` and ``super_glue/rte`` (integer labels, normalised through the dataset's label names; ``hf_path``
and ``hf_config`` name another copy, e.g. a mirror with plain data files for ``datasets`` releases that no longer run
loading scripts).
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import os
import string
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .base import (
    ClassificationTask,
    accuracy,
    as_index_array,
    batch_order,
    classification_loss,
    evaluate,
    model_device,
)

__all__ = [
    "DATA_DIR_ENV",
    "TASK_SPECS",
    "TEMPLATES",
    "PromptTemplate",
    "TextBatch",
    "TextClassificationTask",
    "TextExample",
    "TextExamples",
    "TextTaskSpec",
    "accuracy",
    "classification_loss",
    "encode_prompts",
    "evaluate",
    "examples_from_records",
    "load_text_examples",
    "load_text_task",
    "verbalizer_logits",
    "verbalizer_token_ids",
]

DATA_DIR_ENV = "HISO_DATA_DIR"
PaddingSide = Literal["left", "right"]


# --------------------------------------------------------------------------------------------------------------------
# Examples and templates
# --------------------------------------------------------------------------------------------------------------------


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
class PromptTemplate:
    """A prompt pattern (``str.format`` over the example's fields) and one verbaliser word per class.

    A verbaliser word includes the whitespace that joins it to the prompt (" great" after "It was"; "Yes" after a
    newline), because that is how the model would write it next.
    """

    name: str
    pattern: str
    verbalizer: tuple[str, ...]
    source: str = ""

    @functools.cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None)

    @property
    def answer_context(self) -> str:
        """The literal text after the last field: the context the verbaliser word follows in every prompt.

        Verbaliser token ids are resolved in this context, so tokenizers that encode a word differently at the start
        of a text (SentencePiece's dummy prefix) than after other text still get the id the model actually predicts.
        """
        parts = list(string.Formatter().parse(self.pattern))
        literal, field_name, _, _ = parts[-1]
        return literal if field_name is None else ""

    def render(self, example: TextExample) -> str:
        """The prompt for ``example`` (without the answer)."""
        try:
            return self.pattern.format(**example.fields)
        except KeyError as exc:
            raise ValueError(
                f"template {self.name!r} needs field {exc.args[0]!r}; the example has {sorted(example.fields)}"
            ) from None


_MEZO = "MeZO (Malladi et al. 2023), large_models/templates.py"
_GPT3 = "GPT-3 (Brown et al. 2020) appendix G style, as in Zhao et al. 2021's few-shot-learning prompts"

TEMPLATES: dict[str, dict[str, PromptTemplate]] = {
    "sst2": {
        "mezo": PromptTemplate("mezo", "{sentence} It was", (" terrible", " great"), _MEZO),
    },
    "cb": {
        "mezo": PromptTemplate(
            "mezo",
            'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
            ("Yes", "No", "Maybe"),
            _MEZO,
        ),
        "gpt3": PromptTemplate(
            "gpt3",
            "{premise}\nQuestion: {hypothesis} True, False, or Neither?\nAnswer:",
            (" True", " False", " Neither"),
            _GPT3,
        ),
    },
    "rte": {
        "mezo": PromptTemplate(
            "mezo",
            '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
            ("Yes", "No"),
            _MEZO,
        ),
        "gpt3": PromptTemplate(
            "gpt3", "{premise}\nQuestion: {hypothesis} True or False?\nAnswer:", (" True", " False"), _GPT3
        ),
    },
}


# --------------------------------------------------------------------------------------------------------------------
# Task specifications and loading
# --------------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------------
# Tokenisation and collation
# --------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str | list[str], add_special_tokens: bool) -> Any:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def verbalizer_token_ids(
    tokenizer: Any, words: Sequence[str], *, context: str = "", allow_multi_token: bool = False
) -> list[int]:
    """The token id that starts each verbaliser word when it follows ``context``; distinct, one per word.

    Raises ``ValueError`` when a word is not a single token (unless ``allow_multi_token``, which scores the
    first token only), when two words share their first token (the classes would be indistinguishable), or
    when a word merges with the end of the context.
    """
    if not words:
        raise ValueError("verbaliser is empty")
    prefix = _encode(tokenizer, context, add_special_tokens=False) if context else []
    ids = []
    for word in words:
        full = _encode(tokenizer, context + word, add_special_tokens=False)
        if full[: len(prefix)] != prefix or len(full) == len(prefix):
            raise ValueError(f"verbaliser word {word!r} merges with the prompt's end {context!r} when tokenized")
        rest = full[len(prefix) :]
        if len(rest) != 1 and not allow_multi_token:
            pieces = (
                [tokenizer.convert_ids_to_tokens(t) for t in rest]
                if hasattr(tokenizer, "convert_ids_to_tokens")
                else rest
            )
            raise ValueError(
                f"verbaliser word {word!r} is {len(rest)} tokens {pieces} for this tokenizer; choose single-token "
                "words or pass allow_multi_token=True to score the first token only"
            )
        ids.append(int(rest[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"verbaliser words {list(words)} do not start with distinct tokens: {ids}")
    return ids


@dataclass(frozen=True)
class TextBatch:
    """Padded prompts, the position of each prompt's last token, labels, and the verbaliser's token ids.

    ``class_logits(model)`` gives the next-token logits at ``last_index`` restricted to ``verbalizer_ids``.
    """

    input_ids: torch.Tensor  # int64 [B, L]
    attention_mask: torch.Tensor  # int64 [B, L], 1 on prompt tokens
    last_index: torch.Tensor  # int64 [B]
    labels: torch.Tensor  # int64 [B]
    verbalizer_ids: torch.Tensor  # int64 [C]
    padding_side: PaddingSide = "right"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> TextBatch:
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return replace(
            self,
            input_ids=move(self.input_ids),
            attention_mask=move(self.attention_mask),
            last_index=move(self.last_index),
            labels=move(self.labels),
            verbalizer_ids=move(self.verbalizer_ids),
        )

    def class_logits(self, model: nn.Module) -> torch.Tensor:
        batch = self.to(model_device(model))
        return verbalizer_logits(
            model, batch.input_ids, batch.attention_mask, batch.last_index, batch.verbalizer_ids, batch.padding_side
        )


def _pad_token_id(tokenizer: Any) -> int:
    # Any valid id works: padded positions are masked out. Prefer the tokenizer's own pad, then EOS.
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def _truncate_left(ids: list[int], max_length: int, keep_prefix: int) -> list[int]:
    """Drop tokens from the start (after a BOS-like prefix): the question and answer cue sit at the end."""
    if len(ids) <= max_length:
        return ids
    return ids[:keep_prefix] + ids[len(ids) - (max_length - keep_prefix) :]


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    verbalizer_ids: Sequence[int],
    *,
    max_length: int = 512,
    padding_side: PaddingSide = "right",
) -> TextBatch:
    """Tokenize and pad ``prompts`` into a :class:`TextBatch`.

    Special tokens are added as the tokenizer does by default (BOS for Llama-2/OPT, none for SmolLM2). Prompts
    longer than ``max_length`` lose tokens from the start (after BOS), as DeComFL truncates, so the end of the prompt,
    which the answer follows, always survives. Right padding is the default: it needs no position-id bookkeeping
    and never yields a fully masked attention row; left padding is supported (position ids are passed then).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts but {len(labels)} labels")
    if not prompts:
        raise ValueError("no prompts to encode")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    encoded = _encode(tokenizer, list(prompts), add_special_tokens=True)
    bos = getattr(tokenizer, "bos_token_id", None)
    seqs = []
    for ids in encoded:
        if not ids:
            raise ValueError("a prompt encoded to no tokens")
        keep = 1 if bos is not None and ids[0] == bos else 0
        seqs.append(_truncate_left(list(ids), max_length, keep))
    width = max(len(s) for s in seqs)
    pad = _pad_token_id(tokenizer)
    input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(0, len(seq)) if padding_side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    last_index = lengths - 1 if padding_side == "right" else torch.full_like(lengths, width - 1)
    return TextBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        last_index=last_index,
        labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
        verbalizer_ids=torch.tensor(list(verbalizer_ids), dtype=torch.long),
        padding_side=padding_side,
    )


# --------------------------------------------------------------------------------------------------------------------
# Last-position verbaliser logits
# --------------------------------------------------------------------------------------------------------------------

# Per model: does the base-model + head shortcut reproduce the model's own logits? Checked once, on first use.
_FAST_PATH_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _forward_kwargs(
    module: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, padding_side: PaddingSide
) -> dict[str, Any]:
    params = _forward_params(type(module))
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "use_cache" in params:
        kwargs["use_cache"] = False  # a KV cache is only memory here
    if padding_side == "left" and "position_ids" in params:
        # Models count positions from the first column; left padding would shift absolute positions (OPT, GPT-2).
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return kwargs


def _fast_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(base model, LM head) for Hugging Face causal LMs, None for anything else."""
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if base is None or base is model or not isinstance(base, nn.Module) or get_head is None:
        return None
    head = get_head()
    return (base, head) if isinstance(head, nn.Linear) else None


def _fast_logits(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> torch.Tensor:
    base, head = _fast_parts(model)  # type: ignore[misc]
    out = base(**_forward_kwargs(base, input_ids, attention_mask, padding_side))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    last = hidden[rows, last_index]  # [B, H]: the LM head runs on B vectors, not B x L
    bias = head.bias[verbalizer_ids] if head.bias is not None else None
    return nn.functional.linear(last, head.weight[verbalizer_ids], bias)  # and only on C rows of the vocabulary


def _full_logits(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> torch.Tensor:
    out = model(**_forward_kwargs(model, input_ids, attention_mask, padding_side))
    logits = out.logits if hasattr(out, "logits") else out[0]
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_index][:, verbalizer_ids]


def _check_fast_path(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side) -> bool:
    """Compare the shortcut with the model's own forward on one short prompt.

    Some heads post-process logits (Gemma-2/3 soft-capping, Cohere's logit scale); rather than list them, test.
    """
    if _fast_parts(model) is None:
        return False
    row_ids = input_ids[0][attention_mask[0].bool()][-64:].unsqueeze(0)  # a cheap probe: the prompt's last 64 tokens
    mask = torch.ones_like(row_ids)
    last = torch.tensor([row_ids.shape[1] - 1], device=row_ids.device)
    was_training = model.training
    model.eval()  # dropout would make the two forwards differ
    try:
        with torch.no_grad():
            fast = _fast_logits(model, row_ids, mask, last, verbalizer_ids, "right").float()
            full = _full_logits(model, row_ids, mask, last, verbalizer_ids, "right").float()
    except Exception as exc:  # noqa: BLE001 -- an unusual base model: fall back to the plain forward
        warnings.warn(f"last-position logits shortcut failed ({exc!r}); using the full forward", stacklevel=3)
        return False
    finally:
        model.train(was_training)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tolerance = (3e-2 if half else 2e-3) * float(full.abs().max().clamp_min(1.0))  # TF32 matmuls stay inside 2e-3
    diff = float((fast - full).abs().max())
    if diff > tolerance:
        warnings.warn(
            f"{type(model).__name__}: base model + LM head differs from the model's logits by {diff:.3g}; "
            "computing full logits (slower)",
            stacklevel=3,
        )
        return False
    return True


def verbalizer_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    last_index: torch.Tensor,
    verbalizer_ids: torch.Tensor,
    padding_side: PaddingSide = "right",
) -> torch.Tensor:
    """Next-token logits at ``last_index`` for the verbaliser tokens, ``[B, C]``.

    For Hugging Face causal LMs this runs the base model and applies the LM head to the B last hidden states and
    the C verbaliser rows only (the full ``[B, L, vocab]`` logits of SmolLM2 at B=16, L=64 are 200 MB and about a
    fifth of the FLOPs). Whether that shortcut matches the model's own logits is checked once per model; models
    without that structure, or whose check fails, use ``model(...).logits``.
    """
    ok = _FAST_PATH_OK.get(model)
    if ok is None:
        ok = _check_fast_path(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side)
        _FAST_PATH_OK[model] = ok
    compute = _fast_logits if ok else _full_logits
    return compute(model, input_ids, attention_mask, last_index, verbalizer_ids, padding_side)


# --------------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TextClassificationTask(ClassificationTask):
    """A prompt + verbaliser task; batches need a tokenizer (``tokenizer=`` or :meth:`set_tokenizer`)."""

    spec: TextTaskSpec
    template: PromptTemplate
    train_examples: TextExamples
    eval_examples: TextExamples
    tokenizer: Any = None
    max_length: int = 512
    padding_side: PaddingSide = "right"
    allow_multi_token: bool = False
    source: str = ""
    _verbalizer_ids: list[int] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if len(self.template.verbalizer) != len(self.spec.label_names):
            raise ValueError(
                f"template {self.template.name!r} has {len(self.template.verbalizer)} verbaliser words for "
                f"{len(self.spec.label_names)} labels {self.spec.label_names}"
            )
        unknown = set(self.template.field_names) - set(self.spec.field_names)
        if unknown:
            raise ValueError(f"template {self.template.name!r} uses fields {sorted(unknown)} that {self.name} lacks")
        if self.tokenizer is not None:
            self.set_tokenizer(self.tokenizer)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.spec.name

    @property
    def label_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.spec.label_names

    def set_tokenizer(self, tokenizer: Any) -> TextClassificationTask:
        """Bind a tokenizer and resolve (and check) the verbaliser token ids for it."""
        probe = _encode(tokenizer, "x", add_special_tokens=True)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is not None and probe and probe[-1] == eos:
            raise ValueError(
                "the tokenizer appends EOS to every text; the last prompt position would be EOS, not the prompt's "
                "end. Load it with add_eos_token=False."
            )
        self._verbalizer_ids = verbalizer_token_ids(
            tokenizer,
            self.template.verbalizer,
            context=self.template.answer_context,
            allow_multi_token=self.allow_multi_token,
        )
        self.tokenizer = tokenizer
        return self

    @property
    def verbalizer_ids(self) -> list[int]:
        if self._verbalizer_ids is None:
            raise RuntimeError(f"task {self.name!r} has no tokenizer: pass tokenizer= or call set_tokenizer()")
        return list(self._verbalizer_ids)

    def prompt(self, example: TextExample) -> str:
        return self.template.render(example)

    def eval_batches(self, batch_size: int) -> list[TextBatch]:
        """The evaluation split in batches of similar prompt length."""
        return self.make_batches(self.eval_examples, batch_size, sort_by_length=True)

    def make_batches(
        self,
        examples: TextExamples,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        sort_by_length: bool = False,
    ) -> list[TextBatch]:
        """See :meth:`ClassificationTask.make_batches`; ``sort_by_length`` batches prompts of similar length
        together (less padding: for evaluation, where order does not matter; not with ``shuffle``)."""
        verbalizer_ids = self.verbalizer_ids  # raises first if there is no tokenizer
        if sort_by_length and shuffle:
            raise ValueError("sort_by_length and shuffle exclude each other")
        prompts = [self.prompt(ex) for ex in examples]
        order = np.argsort([len(p) for p in prompts], kind="stable") if sort_by_length else np.arange(len(prompts))
        batches = []
        for idx in batch_order(len(examples), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last):
            chosen = order[idx]
            batches.append(
                encode_prompts(
                    self.tokenizer,
                    [prompts[i] for i in chosen],
                    [examples[int(i)].label for i in chosen],
                    verbalizer_ids,
                    max_length=self.max_length,
                    padding_side=self.padding_side,
                )
            )
        return batches


def _subsample(examples: TextExamples, n: int | None, rng: np.random.Generator) -> TextExamples:
    """A uniform random subset of ``n`` examples kept in file order (MeZO samples its 1,000 training examples)."""
    if n is None or n >= len(examples):
        return examples
    if n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    return examples.subset(np.sort(rng.choice(len(examples), size=n, replace=False)))


def load_text_task(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    tokenizer: Any = None,
    template: str | PromptTemplate = "mezo",
    max_length: int = 512,
    padding_side: PaddingSide = "right",
    num_train: int | None = None,
    num_eval: int | None = None,
    seed: int = 0,
    allow_multi_token: bool = False,
    hf_path: str | None = None,
    hf_config: str | None = None,
    cache_dir: str | None = None,
) -> TextClassificationTask:
    """Load SST-2, CB or RTE (see :func:`load_text_examples` for where from) as a :class:`TextClassificationTask`.

    ``num_train``/``num_eval`` keep a random subset (deterministic in ``seed``); ``template`` is a name from
    :data:`TEMPLATES` or a :class:`PromptTemplate`.
    """
    spec = _spec(name)
    if isinstance(template, str):
        try:
            template = TEMPLATES[name][template]
        except KeyError:
            raise ValueError(f"unknown template {template!r} for {name}; known: {sorted(TEMPLATES[name])}") from None
    train, eval_, source = load_text_examples(name, data_dir, hf_path=hf_path, hf_config=hf_config, cache_dir=cache_dir)
    train = _subsample(train, num_train, np.random.default_rng([seed, 0]))
    eval_ = _subsample(eval_, num_eval, np.random.default_rng([seed, 1]))
    return TextClassificationTask(
        spec=spec,
        template=template,
        train_examples=train,
        eval_examples=eval_,
        tokenizer=tokenizer,
        max_length=max_length,
        padding_side=padding_side,
        allow_multi_token=allow_multi_token,
        source=source,
    )
