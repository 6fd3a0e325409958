"""The settings of ``hiso train``, checked before anything heavy runs: types, choices and ranges of every
:class:`~hiso.fl.simulation.SimulationConfig` field, config files (a path or a packaged name), the task, its template,
data and model, the device and the backend. Any problem is one :class:`UsageError` (the CLI prints one line and
exits with code 2, before it creates any folder).

Adding a setting: a field of ``SimulationConfig``. Its type gives the flag's parser; ``metadata={"choices": (...),
"help": "...", "check": (predicate, "must be ...")}`` on the dataclass field, or an entry in :data:`CHOICES` /
:data:`RULES` here, gives its valid values.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import time
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import tomllib

from .fl.simulation import METHODS, SimulationConfig


class UsageError(Exception):
    """Bad input: a one-line message, exit code 2."""


class RunError(Exception):
    """A run that could not start (e.g. the model failed to load): a one-line message, exit code 1."""


#: settings renamed in 0.2 (old name -> new name); the old names are still read from config files and flags
RENAMED = {"curvature": "curvature_rule"}


def _choices_table() -> dict[str, Callable[[], Sequence[str]]]:
    def distributions() -> tuple[str, ...]:
        from hiso_kernels.spec import Distribution

        return tuple(d.name.lower() for d in Distribution)

    def backends() -> tuple[str, ...]:
        from hiso_kernels.backends import BACKENDS, DEPRECATED_NAMES

        return (*BACKENDS, *DEPRECATED_NAMES)  # deprecated names still work (with a warning)

    def aggregations() -> tuple[str, ...]:
        from .fl.protocol import AGGREGATIONS

        return AGGREGATIONS

    def curvature_rules() -> tuple[str, ...]:
        from .optim.update import CURVATURE_RULES

        return CURVATURE_RULES

    def h_inits() -> tuple[str, ...]:
        from .optim.curvature import H_INITS

        return H_INITS

    return {
        "method": lambda: METHODS,
        "h_init": h_inits,
        "aggregation": aggregations,
        "split": lambda: ("iid", "dirichlet"),
        "curvature_rule": curvature_rules,
        "difference": lambda: ("central", "forward"),
        "distribution": distributions,
        "dtype": lambda: ("float32", "bfloat16", "float16"),
        "backend": backends,
    }


#: field -> valid values (from the modules that define them)
CHOICES: dict[str, Callable[[], Sequence[str]]] = _choices_table()

_pos = (lambda v: v > 0, "must be > 0")
#: field -> (predicate, what it must be); numbers must also be finite
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (lambda v: v >= 1, "must be >= 1") for k in ("rounds", "n_clients", "clients_per_round", "local_steps",
                                                       "num_directions", "batch_size", "eval_every", "num_train",
                                                       "num_eval")},
    "lr": _pos, "mu": _pos, "h_min": _pos, "alpha": _pos,
    "beta": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "max_length": (lambda v: v >= 2, "must be >= 2"),
}


def choices_of(name: str) -> tuple[str, ...]:
    f = {f.name: f for f in dataclasses.fields(SimulationConfig)}.get(name)
    if f is not None and "choices" in f.metadata:
        return tuple(f.metadata["choices"])
    return tuple(CHOICES[name]()) if name in CHOICES else ()


@dataclass(frozen=True)
class FieldSpec:
    """How a SimulationConfig field is parsed from a flag and checked."""

    name: str
    kind: type  # bool, int, float or str
    optional: bool
    help: str = ""

    @property
    def metavar(self) -> str:
        return {bool: "BOOL", int: "N", float: "X", str: "TEXT"}[self.kind]

    def choices(self) -> tuple[str, ...]:
        return choices_of(self.name)

    def parse(self, text: str) -> Any:
        """A flag's text as this field's type (argparse ``type=``; a ValueError becomes a one-line usage error)."""
        if self.optional and text.lower() in ("none", "null"):
            return None
        try:
            if self.kind is bool:
                low = text.lower()
                if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                    raise ValueError
                return low in ("1", "true", "yes", "on")
            return self.kind(text)
        except ValueError:
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "text"}[self.kind]
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {kind}") from None

    def coerce(self, value: Any, where: str) -> Any:
        """A config-file value checked against this field's type (ints are accepted for floats)."""
        if value is None and self.optional:
            return None
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if (self.kind is int and isinstance(value, bool)) or not isinstance(value, self.kind):
            if self.optional and isinstance(value, str) and value.lower() in ("none", "null", ""):
                return None
            raise UsageError(f"{where}: {self.name} must be {self.kind.__name__}, got {value!r}")
        return value


def field_specs() -> dict[str, FieldSpec]:
    hints = typing.get_type_hints(SimulationConfig)
    out = {}
    for f in dataclasses.fields(SimulationConfig):
        tp = hints[f.name]
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else ()
        base = next((a for a in args if a is not type(None)), tp)
        out[f.name] = FieldSpec(f.name, base if base in (bool, int, float, str) else str, type(None) in args,
                                f.metadata.get("help", ""))
    return out


def check_value(name: str, value: Any, where: str = "") -> None:
    """Raise UsageError unless ``value`` is valid for field ``name`` (choices, ranges, finiteness)."""
    label = f"--{name.replace('_', '-')}" if not where else f"{where}: {name}"
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{label} must be a finite number, got {value!r}")
    choices = choices_of(name)
    if choices and value not in choices:
        raise UsageError(f"{label}: invalid value {value!r}; choose from: {', '.join(choices)}")
    f = {f.name: f for f in dataclasses.fields(SimulationConfig)}[name]
    rule = f.metadata.get("check") or RULES.get(name)
    if rule is not None and not rule[0](value):
        raise UsageError(f"{label} {rule[1]}, got {value!r}")


# --------------------------------------------------------------------------------------------------------------------
# Config files
# --------------------------------------------------------------------------------------------------------------------


def packaged_configs() -> list[str]:
    folder = resources.files("hiso") / "configs"
    return sorted(e.name[:-5] for e in folder.iterdir() if e.name.endswith(".toml"))


def read_config(name: str) -> tuple[dict, str]:
    """(parsed TOML, where) for a config file path or the name of a packaged config."""
    opener: Callable[[], typing.IO[bytes]]
    if os.path.isfile(name):
        where, opener = name, lambda: open(name, "rb")  # noqa: SIM115 (closed below)
    else:
        stem = os.path.basename(name)[:-5] if name.endswith(".toml") else name
        entry = resources.files("hiso") / "configs" / f"{stem}.toml"
        if os.sep in name or not entry.is_file():
            raise UsageError(f"config not found: {name!r} is neither a file nor a packaged config "
                             f"({', '.join(packaged_configs())})")
        where, opener = f"packaged config {stem}", lambda: entry.open("rb")
    try:
        with opener() as fh:
            return tomllib.load(fh), where
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where}: not valid TOML ({exc})") from None


def _renamed(table: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in table.items()}


def load_settings(args: argparse.Namespace) -> tuple[dict, list[str], dict]:
    """(base settings, methods, per-method settings) from the config file and the flags (flags win)."""
    specs = field_specs()
    base: dict = {}
    per_method: dict = {}
    methods = None
    if args.config:
        doc, where = read_config(args.config)
        unknown_tables = set(doc) - {"train", "methods"}
        if unknown_tables:
            raise UsageError(f"{where}: unknown table(s) {sorted(unknown_tables)}; use [train] and [methods.<name>]")
        base = _renamed(dict(doc.get("train", {})))
        methods = base.pop("methods", None)
        per_method = {k: _renamed(dict(v)) for k, v in doc.get("methods", {}).items()}
        for m in per_method:
            if m not in METHODS:
                raise UsageError(f"{where}: unknown method table [methods.{m}]; methods: {', '.join(METHODS)}")
        for table in (base, *per_method.values()):
            unknown = set(table) - set(specs) - {"method"}
            if unknown:
                raise UsageError(f"{where}: unknown setting(s) {sorted(unknown)}; see hiso train --help")
            for k in list(table):
                table[k] = specs[k].coerce(table[k], where)
                check_value(k, table[k], where)
        if methods is not None and (not isinstance(methods, list) or not all(m in METHODS for m in methods)):
            raise UsageError(f"{where}: methods must be a list of {', '.join(METHODS)}, got {methods!r}")
    for name in specs:
        value = getattr(args, name, None)
        if name != "method" and value is not None:
            check_value(name, value)
            base[name] = value
            for table in per_method.values():  # a flag wins over the file's per-method value too
                table.pop(name, None)
    methods = args.methods or methods or ["hiso", "decomfl"]
    return base, list(dict.fromkeys(methods)), per_method


# --------------------------------------------------------------------------------------------------------------------
# The whole check
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    configs: list[SimulationConfig]
    out: str
    task_name: str
    title: str


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device: invalid device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device here (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda or mps")


def _check_task(cfg: SimulationConfig, args: argparse.Namespace) -> tuple[str, Any]:
    from . import tasks

    try:
        info = tasks.task_info(cfg.task)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if not info.takes_model and cfg.model is not None:
        raise UsageError(f"--model does not apply to task {info.name!r}: it trains its own {info.kind} model "
                         "(text tasks take --model)")
    if not info.takes_model and (cfg.template is not None or cfg.max_length is not None):
        raise UsageError(f"--template and --max-length apply to text tasks, not to {info.name!r}")
    if info.spec is not None and cfg.template is not None and cfg.template not in info.spec.templates:
        raise UsageError(f"--template: {cfg.template!r} is not a template of {info.name}; "
                         f"choose from: {', '.join(info.spec.templates)}")
    try:
        source = tasks.check_task_data(cfg.task, cfg.data_dir)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if info.takes_model:
        for module, why in (("transformers", "text tasks need transformers"), ("datasets", "text tasks read data "
                            "with datasets")):
            if importlib.util.find_spec(module) is None:
                raise UsageError(f"{why}: pip install {module} (or pip install \".[llm]\" from the hiso source)")
        from .models import check_model_source

        try:
            check_model_source(cfg.model or "smollm2-135m")
        except (FileNotFoundError, ImportError) as exc:
            raise UsageError(f"--model: {exc}") from None
        if info.spec is not None and not source.startswith("hub:"):  # cheap: surface label / field errors now
            from .tasks.text import load_text_examples

            try:
                train, _, _ = load_text_examples(info.spec, cfg.data_dir)
            except (ValueError, TypeError, ImportError) as exc:
                raise UsageError(str(exc)) from None
            n = min(len(train), cfg.num_train or len(train))
            if cfg.n_clients > n:
                raise UsageError(f"--n-clients {cfg.n_clients} exceeds the {n} training examples of {info.name}")
    return info.name, info


def validate_train(args: argparse.Namespace) -> TrainPlan:
    """Every check of ``hiso train``'s input, in order of cost; returns the configs to run and the output folder."""
    base, methods, per_method = load_settings(args)
    if args.task_spec:
        from .tasks.text import load_spec

        try:
            spec = load_spec(args.task_spec)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--task-spec: {exc}") from None
        if args.task is not None and args.task != spec.name:
            raise UsageError(f"--task {args.task!r} and --task-spec (task {spec.name!r}) disagree; give one")
        base["task"] = os.path.abspath(args.task_spec)
    if args.tensorboard:
        from .reporting import tensorboard_available

        if not tensorboard_available():
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    configs = []
    for m in methods:
        try:
            cfg = SimulationConfig(**{**base, **per_method.get(m, {}), "method": m})
            if m in ("hiso", "decomfl"):
                cfg.fl_config()  # the protocol's own checks (e.g. the "stein" rule needs central differences)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid settings for {m}: {exc}") from None
        configs.append(cfg)
    first = configs[0]
    _check_device(first.device)
    if first.backend is not None:
        from hiso_kernels.backends import available_backends, get_backend

        usable = available_backends(first.device)
        if get_backend(first.backend).name not in usable:
            raise UsageError(f"--backend {first.backend}: not usable on {first.device} here; usable: "
                             f"{', '.join(usable)}")
    task_name, info = _check_task(first, args)  # reads the task's files (and checks the model's source)
    if info.takes_model:
        configs = [dataclasses.replace(c, model=c.model or "smollm2-135m") for c in configs]
    out = args.out or os.path.join("runs", f"{task_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out}: exists and is not a folder")
    model = f" on {configs[0].model}" if configs[0].model else ""
    title = (f"{task_name}{model}: {first.n_clients} clients, {first.clients_per_round} per round, "
             f"K={first.local_steps}, P={first.num_directions}, {first.split} split")
    return TrainPlan(configs, out, task_name, title)


def validate_resume(args: argparse.Namespace) -> tuple[TrainPlan, list[dict], dict[str, dict]]:
    """``hiso train --resume DIR``: DIR's own settings (``config.json``), the metrics rows to keep and, per
    unfinished method, how to continue it (:meth:`hiso.fl.runs.RunFolder.resume_plan`)."""
    from .fl.journal import JournalError
    from .fl.runs import RunFolder

    given = [name for name in field_specs() if getattr(args, name, None) is not None]
    given += [flag for flag, value in (("--config", args.config), ("--methods", args.methods), ("--out", args.out),
                                       ("--task-spec", args.task_spec)) if value]
    if given:
        raise UsageError(f"--resume DIR takes every setting from DIR/config.json; drop {', '.join(given)}")
    if not os.path.isdir(args.resume):
        raise UsageError(f"--resume {args.resume}: no such folder")
    folder = RunFolder(args.resume)
    try:
        configs = folder.load_configs()
        rows, plan = folder.resume_plan(configs)
    except (OSError, ValueError, TypeError, JournalError) as exc:
        raise UsageError(f"--resume {args.resume}: cannot resume: {exc}") from None
    first = configs[0]
    _check_device(first.device)
    title = (f"{first.task}: {first.n_clients} clients, {first.clients_per_round} per round, "
             f"K={first.local_steps}, P={first.num_directions}, {first.split} split (resumed)")
    return TrainPlan(configs, args.resume, first.task, title), rows, plan

