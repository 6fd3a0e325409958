"""Step records and their compact, versioned encoding: optimizer checkpoints and history files.

A ZO run is its initial weights plus, per step, the seed, the P directional scalars c_p (and the second differences
for HiSo's "stein" rule) and each parameter group's lr and weight decay: :func:`hiso.optim.ZOOptimizer.replay` of
these records on a copy of the initial weights gives the trained bits. The encoding stores them as columns:

    seeds                int64    [S]
    scalars              float64  [S, P]
    second_differences   float64  [S, P]   or None
    lrs, weight_decays   float64  [S, G]

(S steps, P directions, G parameter groups: 8 + 8P (+ 8P) + 16G bytes per step). The scalars stay float64 because
the optimizer forms the update coefficients lr c_p / P in float64 before the kernels round them once to fp32; a
float32 copy of c_p would make the replay differ from the trained model in the last bit. The same columns go into
``state_dict()["zo"]["history"]`` (tensors, so ``torch.load(weights_only=True)`` reads a checkpoint) and into history
files: ``.json`` (seeds as decimal strings, since JSON tools often read numbers as doubles; floats written by
``repr`` round-trip exactly) or any other suffix for ``torch.save``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence

import torch

FORMAT = "hiso.zo_history"
#: version of the history encoding and of ``state_dict()["zo"]`` (version 1: hiso 0.1, no history, no hyper-parameters)
VERSION = 2


@dataclasses.dataclass(frozen=True)
class ZOStep:
    """Everything needed to apply (or replay) one step: the seed, the P directional scalars c_p, the second
    differences (for the "stein" rule, else None), and each parameter group's lr and weight decay."""

    seed: int
    scalars: tuple[float, ...]
    second_differences: tuple[float, ...] | None
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]

    @property
    def curvature_scalars(self) -> tuple[float, ...] | None:
        """Deprecated name of :attr:`second_differences`."""
        warnings.warn("ZOStep.curvature_scalars is deprecated; use second_differences", DeprecationWarning,
                      stacklevel=2)
        return self.second_differences


def encode(steps: Sequence[ZOStep]) -> dict:
    """The column encoding of step records (all with the same P, G and presence of second differences)."""
    steps = list(steps)
    if steps:
        p, g, second = len(steps[0].scalars), len(steps[0].lrs), steps[0].second_differences is not None
        for s in steps:
            if (len(s.scalars) != p or len(s.lrs) != g or len(s.weight_decays) != g
                    or (s.second_differences is not None) != second
                    or (second and len(s.second_differences or ()) != p)):
                raise ValueError("history records must all have the same numbers of scalars and parameter groups")
    else:
        p, g, second = 0, 0, False

    def col(rows, width):
        return torch.tensor(rows, dtype=torch.float64).reshape(len(steps), width)

    return {
        "seeds": torch.tensor([s.seed for s in steps], dtype=torch.int64),
        "scalars": col([s.scalars for s in steps], p),
        "second_differences": col([s.second_differences for s in steps], p) if second else None,
        "lrs": col([s.lrs for s in steps], g),
        "weight_decays": col([s.weight_decays for s in steps], g),
    }


def decode(columns: dict) -> list[ZOStep]:
    """Step records from :func:`encode`'s columns (tensors, or nested lists as in a JSON file)."""
    try:
        seeds = [int(v) for v in _rows(columns["seeds"])]
        scalars, lrs, wds = (_rows(columns[k]) for k in ("scalars", "lrs", "weight_decays"))
        second = columns.get("second_differences")
        second_rows = None if second is None else _rows(second)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a hiso step history: {exc}") from exc
    n = len(seeds)
    if any(len(x) != n for x in (scalars, lrs, wds)) or (second_rows is not None and len(second_rows) != n):
        raise ValueError("the history's columns have different numbers of steps")
    return [ZOStep(seeds[i], tuple(float(v) for v in scalars[i]),
                   None if second_rows is None else tuple(float(v) for v in second_rows[i]),
                   tuple(float(v) for v in lrs[i]), tuple(float(v) for v in wds[i])) for i in range(n)]


def _rows(value) -> list:
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


# ---------------------------------------------------------------------- files
def save(path: str | os.PathLike, steps: Sequence[ZOStep], meta: dict) -> None:
    """Write a history file: JSON for a ``.json`` suffix, else ``torch.save`` (readable with ``weights_only=True``).
    ``meta`` (method, hyper-parameters, first step) is stored beside the columns."""
    columns = encode(steps)
    doc = dict(format=FORMAT, version=VERSION, **meta)
    if os.fspath(path).endswith(".json"):
        doc.update(seeds=[str(v) for v in columns["seeds"].tolist()],
                   **{k: (None if v is None else v.tolist()) for k, v in columns.items() if k != "seeds"})
        with open(path, "w", encoding="utf-8") as f:
            json.dump(doc, f, allow_nan=False)
            f.write("\n")
    else:
        doc.update(columns)
        torch.save(doc, path)


def read(path: str | os.PathLike) -> tuple[list[ZOStep], dict]:
    """Read a history file written by :func:`save` (either format): the records and the metadata."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    else:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a hiso step history file")
    if doc.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)} has history version {doc.get('version')}, this hiso reads {VERSION}")
    meta = {k: v for k, v in doc.items() if k not in ("seeds", "scalars", "second_differences", "lrs",
                                                         "weight_decays", "format", "version")}
    return decode(doc), meta


# ---------------------------------------------------------------------- checkpoints
def check_compatible(mine: dict, theirs: dict, what: str) -> None:
    """Raise ValueError naming every hyper-parameter in which ``theirs`` differs from ``mine``."""
    bad = [f"{k}: {theirs[k]!r} there, {mine[k]!r} here" for k in mine if k in theirs and theirs[k] != mine[k]]
    if bad:
        raise ValueError(f"{what} was made with other settings ({'; '.join(bad)}); build the optimizer with the "
                         "same settings to resume it")


def take_hessians(state_dict: dict, param_groups: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Remove HiSo's H from an optimizer state dict (torch's ``load_state_dict`` would cast it to each parameter's
    dtype: a bf16 H would lose its bits) and return (parameter, fp32 H on the local tensor's device), checked
    against the local shapes (a DTensor's local shard: FSDP2 checkpoints resume on the same number of processes)."""
    if "state" not in state_dict or "param_groups" not in state_dict:
        return []
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    by_id = dict(zip(ids, [p for g in param_groups for p in g["params"]]))
    state, out = {}, []
    for key, entry in state_dict["state"].items():
        entry = dict(entry)
        h = entry.pop("hessian", None)
        if h is not None and key in by_id:
            p = by_id[key]
            local = p.to_local() if hasattr(p, "to_local") else p
            if tuple(h.shape) != tuple(local.shape):
                raise ValueError(f"the checkpoint's H has shape {tuple(h.shape)}, the parameter {tuple(local.shape)}")
            out.append((p, h.to(device=local.device, dtype=torch.float32).clone()))
        state[key] = entry
    state_dict["state"] = state
    return out
