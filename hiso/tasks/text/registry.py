"""The registered text task specs: the built-in ones (``hiso/tasks/specs/*.toml``) and any added with
:func:`register_spec`. ``TASK_SPECS`` and ``TEMPLATES`` are kept in step by :func:`register_spec`; edit them only
through it."""

from __future__ import annotations

import os
from pathlib import Path

from .prompts import PromptTemplate
from .spec import TextTaskSpec, builtin_specs, load_spec, normalize_name

#: name -> spec of every registered text task
TASK_SPECS: dict[str, TextTaskSpec] = {}
#: name -> template name -> template (a view of ``TASK_SPECS``)
TEMPLATES: dict[str, dict[str, PromptTemplate]] = {}


def register_spec(spec: TextTaskSpec | str | os.PathLike[str], *, overwrite: bool = False) -> TextTaskSpec:
    """Register a text task from a :class:`TextTaskSpec` or a spec TOML file; returns the spec.

    Afterwards ``hiso.tasks.get_task(spec.name, ...)`` loads it (the task registry asks this one for text tasks).
    """
    if not isinstance(spec, TextTaskSpec):
        spec = load_spec(spec)
    key = normalize_name(spec.name)
    clash = [n for n in TASK_SPECS if normalize_name(n) == key or key in map(normalize_name, TASK_SPECS[n].aliases)]
    if clash and not overwrite:
        raise ValueError(f"task {spec.name!r} is already registered (pass overwrite=True to replace it)")
    for name in clash:
        del TASK_SPECS[name]
        TEMPLATES.pop(name, None)
    TASK_SPECS[spec.name] = spec
    TEMPLATES[spec.name] = dict(spec.templates)
    return spec


def is_spec_file(name: str | os.PathLike[str]) -> bool:
    return str(name).endswith(".toml") and Path(name).expanduser().is_file()


def find_spec(name: str) -> TextTaskSpec | None:
    """The registered spec named ``name`` or with that alias (any case, "-"/"_" ignored), else None."""
    key = normalize_name(name)
    for spec in TASK_SPECS.values():
        if key == normalize_name(spec.name) or key in map(normalize_name, spec.aliases):
            return spec
    return None


def get_spec(name: str | os.PathLike[str]) -> TextTaskSpec:
    """A registered text task by name or alias, or the spec in a ``.toml`` file."""
    if is_spec_file(name):
        return load_spec(name)
    spec = find_spec(str(name))
    if spec is None:
        if str(name).endswith(".toml"):
            raise FileNotFoundError(f"task spec file not found: {name}")
        raise ValueError(f"unknown text task {name!r}; known: {sorted(TASK_SPECS)}")
    return spec


for _spec in builtin_specs().values():
    register_spec(_spec)
