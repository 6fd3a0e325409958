"""A text task as data: where its examples live, which fields they have, its labels, its prompt templates and how a
model's answer is scored. One TOML file (or one :class:`TextTaskSpec`) is a whole task; the built-in tasks are the
files in ``hiso/tasks/specs/``. ``hiso tasks`` lists them; ``hiso train --task-spec FILE`` trains on a user's own.

Format (every key but ``name``, ``fields``, ``labels.values`` and one template is optional)::

    name = "boolq"
    description = "BoolQ (SuperGLUE): yes/no questions about a passage"
    aliases = ["BoolQ"]                 # folder names, matched ignoring case, "-" and "_" (the name always is)
    scoring = "verbalizer"              # or "multiple_choice"
    default_template = "mezo"
    max_length = 512                    # tokens; longer prompts lose tokens from the start

    [data]
    train = ["train.jsonl"]             # candidate file names in the task folder (.jsonl/.json, .tsv, .csv)
    eval = ["val.jsonl", "validation.jsonl", "dev.jsonl"]
    dir = "data"                        # default folder, relative to this file (else --data-dir / $HISO_DATA_DIR)
    explode = []                        # nested lists to flatten into one example each (MultiRC)
    hub = "super_glue"                  # Hugging Face dataset (path, config, splits) when no folder is given
    hub_config = "boolq"
    hub_splits = ["train", "validation"]

    [fields]                            # template field = record path(s), first present wins
    passage = "passage"
    span1_text = ["span1_text", "target.span1_text"]    # flat (hub) and nested (SuperGLUE jsonl) layouts
    connective = { from = "question", map = { cause = " because", effect = " so" } }

    [labels]
    field = "label"                     # or a list of alternatives
    values = [false, true]              # class order: strings, integers or booleans
    names = ["False", "True"]           # display names (default: the values); also matched against string labels

    [templates.mezo]
    source = "MeZO large_models/templates.py, BoolQTemplateV3"
    prompt = "{passage} {question|question}\\n"
    verbalizer = ["No", "Yes"]          # one word per class (scoring = "verbalizer")
    # choices = [" {choice1}", " {choice2}"]   # one continuation per class (scoring = "multiple_choice")

Scoring (both as MeZO, arXiv 2305.17333, ``large_models/run.py`` and ``utils.py``): "verbalizer" takes the next-token
logits after the prompt restricted to one token per class (cross-entropy over them; DeComFL, arXiv 2405.15861, does
the same); "multiple_choice" scores each class by the mean log-probability of its continuation's tokens (length
normalised) and trains with cross-entropy over those scores. For single-token continuations the two coincide.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomllib

from .prompts import PromptTemplate

LabelValue = str | int | bool
SCORING = ("verbalizer", "multiple_choice")
JSON_FILES = ("val.jsonl", "validation.jsonl", "dev.jsonl")


@dataclass(frozen=True)
class FieldSource:
    """Where a template field comes from: record paths tried in order (dotted for nested records), and an optional
    value mapping (``{cause = " because"}``)."""

    paths: tuple[str, ...]
    mapping: Mapping[str, str] | None = None


@dataclass(frozen=True)
class TextTaskSpec:
    """A text classification / multiple-choice task, declaratively (see the module docstring for the TOML form)."""

    name: str
    label_values: tuple[LabelValue, ...]
    fields: Mapping[str, FieldSource]
    templates: Mapping[str, PromptTemplate]
    default_template: str = ""
    label_names: tuple[str, ...] = ()
    label_paths: tuple[str, ...] = ("label",)
    scoring: str = "verbalizer"
    explode: tuple[str, ...] = ()
    train_files: tuple[str, ...] = ("train.jsonl",)
    eval_files: tuple[str, ...] = JSON_FILES
    data_dir: str | None = None
    aliases: tuple[str, ...] = ()
    hf_path: str | None = None
    hf_config: str | None = None
    hf_splits: tuple[str, str] = ("train", "validation")
    max_length: int = 512
    description: str = ""
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = f"task spec {self.name!r}" + (f" ({self.origin})" if self.origin else "")
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"{where}: name must be a non-empty string")
        values = tuple(self.label_values)
        if len(values) < 2:
            raise ValueError(f"{where}: labels.values needs at least two classes, got {list(values)}")
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or kinds.pop() not in (str, int, bool):
            raise ValueError(f"{where}: labels.values must all be strings, all integers or all booleans")
        if len(set(values)) != len(values):
            raise ValueError(f"{where}: labels.values has duplicates: {list(values)}")
        names = tuple(self.label_names) or tuple(str(v) for v in values)
        if len(names) != len(values) or len(set(names)) != len(names):
            raise ValueError(f"{where}: labels.names must be {len(values)} distinct names, got {list(names)}")
        object.__setattr__(self, "label_values", values)
        object.__setattr__(self, "label_names", names)
        if self.scoring not in SCORING:
            raise ValueError(f"{where}: scoring must be one of {SCORING}, got {self.scoring!r}")
        if not self.templates:
            raise ValueError(f"{where}: no templates")
        if not self.default_template:
            object.__setattr__(self, "default_template", next(iter(self.templates)))
        if self.default_template not in self.templates:
            raise ValueError(
                f"{where}: default_template {self.default_template!r} is not one of {list(self.templates)}"
            )
        for t in self.templates.values():
            self.check_template(t)
        if not self.train_files or not self.eval_files:
            raise ValueError(f"{where}: data.train and data.eval need at least one file name each")
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"{where}: max_length must be an integer >= 2, got {self.max_length!r}")

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(self.fields)

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    @property
    def multiple_choice(self) -> bool:
        return self.scoring == "multiple_choice"

    def check_template(self, template: PromptTemplate) -> PromptTemplate:
        """Raise ``ValueError`` unless ``template`` fits this task (scoring mode, class count, fields)."""
        where = f"template {template.name!r} of task {self.name!r}"
        if template.multiple_choice != self.multiple_choice:
            need = "choices" if self.multiple_choice else "verbalizer"
            raise ValueError(f"{where}: scoring is {self.scoring!r}, so the template needs {need}")
        if template.num_classes != self.num_classes:
            kind = "choice patterns" if template.multiple_choice else "verbaliser words"
            raise ValueError(f"{where}: {template.num_classes} {kind} for {self.num_classes} labels {self.label_names}")
        unknown = set(template.field_names) - set(self.fields)
        if unknown:
            raise ValueError(f"{where} uses fields {sorted(unknown)} that the task lacks; it has {list(self.fields)}")
        return template

    def template(self, name: str | PromptTemplate | None = None) -> PromptTemplate:
        """The named template (default: ``default_template``), or ``name`` itself checked against this task."""
        if isinstance(name, PromptTemplate):
            return self.check_template(name)
        key = name or self.default_template
        if key not in self.templates:
            raise ValueError(f"unknown template {key!r} for {self.name}; known: {sorted(self.templates)}")
        return self.templates[key]


# --------------------------------------------------------------------------------------------------------------------
# TOML
# --------------------------------------------------------------------------------------------------------------------

_TOP = {"name", "description", "aliases", "scoring", "default_template", "max_length", "data", "fields", "labels",
        "templates"}
_DATA = {"train", "eval", "dir", "explode", "hub", "hub_config", "hub_splits"}
_LABELS = {"field", "values", "names"}
_TEMPLATE = {"prompt", "verbalizer", "choices", "source"}


def _strings(value: Any, what: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError(f"{what} must be a string or a list of strings, got {value!r}")
    return tuple(items)


def _check_keys(table: Any, allowed: set[str], what: str) -> dict:
    if not isinstance(table, dict):
        raise ValueError(f"{what} must be a table, got {table!r}")
    unknown = set(table) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in {what}; allowed: {sorted(allowed)}")
    return table


def _field_source(name: str, value: Any) -> FieldSource:
    if isinstance(value, dict):
        _check_keys(value, {"from", "map"}, f"[fields] {name}")
        mapping = value.get("map")
        strings = isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values())
        if mapping is not None and not strings:
            raise ValueError(f"[fields] {name}: map must be a table of strings")
        return FieldSource(_strings(value.get("from", name), f"[fields] {name}.from"), mapping)
    return FieldSource(_strings(value, f"[fields] {name}"))


def spec_from_dict(doc: Mapping[str, Any], origin: str = "") -> TextTaskSpec:
    """Build a :class:`TextTaskSpec` from a parsed TOML document (``ValueError`` with the offending key if bad)."""
    where = origin or "task spec"
    try:
        _check_keys(dict(doc), _TOP, where)
        data = _check_keys(doc.get("data", {}), _DATA, f"[data] of {where}")
        labels = _check_keys(doc.get("labels", {}), _LABELS, f"[labels] of {where}")
        if "values" not in labels:
            raise ValueError("[labels] needs values (the classes, in order)")
        fields = doc.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise ValueError("[fields] must map each template field to a record path")
        templates = {}
        for tname, t in _check_keys(doc.get("templates", {}), set(doc.get("templates", {})), "[templates]").items():
            _check_keys(t, _TEMPLATE, f"[templates.{tname}]")
            if "prompt" not in t:
                raise ValueError(f"[templates.{tname}] needs a prompt")
            templates[tname] = PromptTemplate(
                tname, t["prompt"], _strings(t.get("verbalizer", []), "verbalizer"), t.get("source", ""),
                _strings(t.get("choices", []), "choices"),
            )
        spec_dir = os.path.dirname(os.path.abspath(origin)) if origin else None
        data_dir = data.get("dir")
        if data_dir is not None and spec_dir is not None:
            data_dir = os.path.join(spec_dir, os.path.expanduser(data_dir))
        hub_splits = _strings(data.get("hub_splits", ["train", "validation"]), "data.hub_splits")
        if len(hub_splits) != 2:
            raise ValueError(f"data.hub_splits must name two splits (train, eval), got {list(hub_splits)}")
        return TextTaskSpec(
            name=doc.get("name", ""),
            description=doc.get("description", ""),
            aliases=_strings(doc.get("aliases", []), "aliases"),
            scoring=doc.get("scoring", "verbalizer"),
            default_template=doc.get("default_template", ""),
            max_length=doc.get("max_length", 512),
            label_values=tuple(labels["values"]),
            label_names=_strings(labels.get("names", []), "labels.names"),
            label_paths=_strings(labels.get("field", "label"), "labels.field"),
            fields={k: _field_source(k, v) for k, v in fields.items()},
            templates=templates,
            explode=_strings(data.get("explode", []), "data.explode"),
            train_files=_strings(data.get("train", ["train.jsonl"]), "data.train"),
            eval_files=_strings(data.get("eval", list(JSON_FILES)), "data.eval"),
            data_dir=data_dir,
            hf_path=data.get("hub"),
            hf_config=data.get("hub_config"),
            hf_splits=(hub_splits[0], hub_splits[1]),
            origin=origin,
        )
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(("task spec", where)) else f"{where}: {msg}") from None


def load_spec(path: str | os.PathLike[str]) -> TextTaskSpec:
    """Read a task spec TOML file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"task spec file not found: {p}")
    try:
        with p.open("rb") as fh:
            doc = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{p}: not valid TOML ({exc})") from None
    return spec_from_dict(doc, origin=str(p))


def builtin_specs() -> dict[str, TextTaskSpec]:
    """The task specs shipped in ``hiso/tasks/specs/`` (package data), by name."""
    out = {}
    folder = resources.files("hiso.tasks") / "specs"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml"):
            doc = tomllib.loads(entry.read_text(encoding="utf-8"))
            spec = spec_from_dict(doc, origin=f"hiso/tasks/specs/{entry.name}")
            out[spec.name] = spec
    return out


def normalize_name(name: str) -> str:
    """Task and folder names compare ignoring case, "-", "_" and spaces ("SST-2" == "sst2", "BoolQ" == "boolq")."""
    return "".join(ch for ch in name.lower() if ch not in "-_ ")
