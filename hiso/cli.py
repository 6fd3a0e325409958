"""The ``hiso`` command line.

    hiso train [--config FILE.toml] [--methods hiso decomfl] [--key value ...]   federated fine-tuning (simulated)
    hiso train --resume DIR                                                        continue an interrupted run
    hiso export --log DIR/hiso/journal.hsj --out MODEL_DIR [--model NAME]          weights from a round log alone
    hiso info                                                                      version, kernels, backends

``hiso train`` runs each method with the same data split, seeds and model initialisation, prints progress and a
summary table, and writes ``metrics.jsonl``, ``metrics.csv``, ``summary.md`` and ``curves.png`` (accuracy against
rounds and against bytes sent), per method the round log ``<method>/journal.hsj`` and the weights
``<method>/model/``, and ``fingerprints.json`` to ``--out`` (:mod:`hiso.fl.runs`). Settings come from the TOML file's
``[train]`` table (and per-method tables ``[methods.<name>]``, e.g. a learning rate), overridden by flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import tomllib

from .fl.simulation import METHODS, SimulationConfig
from .reporting import bar, human_bytes, plot, summary_table, write_csv


def _fields():
    return {f.name: f for f in dataclasses.fields(SimulationConfig)}


def _parse_value(text: str, default):
    if isinstance(default, bool):
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int) and not isinstance(default, bool):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if text.lower() in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiso", description="Zeroth-order and scalar-only federated fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="version, built kernels, available backends, direction spec")
    train = sub.add_parser("train", help="federated fine-tuning in one process (HiSo, DeComFL, MeZO, FedAvg)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="TOML file with a [train] table and optional [methods.<name>] tables")
    train.add_argument("--methods", nargs="+", choices=METHODS, help="methods to run (default: the config's)")
    train.add_argument("--out", default=None, help="output folder (default: runs/<task>-<date-time>)")
    train.add_argument("--quiet", action="store_true", help="no progress lines")
    train.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (its settings)")
    export = sub.add_parser("export", help="rebuild trained weights from a round log (the log is the model)")
    export.add_argument("--log", required=True, help="a journal: DIR/<method>/journal.hsj")
    export.add_argument("--out", required=True, help="folder for the weights")
    export.add_argument("--model", help="causal LM name or folder, if not the journal's")
    defaults = SimulationConfig()
    for name in _fields():
        if name == "method":
            continue
        flags = [f"--{name.replace('_', '-')}"] + [f"--{old.replace('_', '-')}" for old, new in RENAMED.items()
                                                   if new == name]
        train.add_argument(*flags, dest=name, default=None, help=f"(default {getattr(defaults, name)!r})")
    return parser


#: settings renamed in 0.2 (old name -> new name); the old names are still read from config files and flags
RENAMED = {"curvature": "curvature_rule"}


def _renamed(table: dict) -> dict:
    return {RENAMED.get(k, k): v for k, v in table.items()}


def load_settings(args) -> tuple[dict, list[str], dict]:
    base: dict = {}
    per_method: dict = {}
    methods = None
    if args.config:
        with open(args.config, "rb") as fh:
            doc = tomllib.load(fh)
        base = _renamed(dict(doc.get("train", {})))
        methods = base.pop("methods", None)
        per_method = {k: _renamed(dict(v)) for k, v in doc.get("methods", {}).items()}
        unknown = set(base) - set(_fields())
        for m, table in per_method.items():
            if m not in METHODS:
                raise SystemExit(f"hiso: unknown method table [methods.{m}] in {args.config}")
            unknown |= set(table) - set(_fields())
        if unknown:
            raise SystemExit(f"hiso: unknown settings in {args.config}: {sorted(unknown)}")
    defaults = SimulationConfig()
    for name in _fields():
        value = getattr(args, name, None)
        if name != "method" and value is not None:
            base[name] = _parse_value(value, getattr(defaults, name))
            for table in per_method.values():  # a flag wins over the file's per-method value too
                table.pop(name, None)
    methods = args.methods or methods or ["hiso", "decomfl"]
    return base, list(methods), per_method


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        from hiso_kernels.info import report

        print(report())
        print(integrations_report())
        return 0
    if args.command == "export":
        from .fl.journal import JournalError
        from .fl.runs import export

        try:
            print(f"sha256 {export(args.log, args.out, args.model)}")
        except (OSError, ValueError, JournalError) as exc:
            print(f"hiso: {exc}", file=sys.stderr)
            return 2
        return 0
    return train(args)


def integrations_report() -> str:
    """Which optional integrations are installed (without importing them)."""
    from importlib import metadata

    lines = ["integrations:"]
    for dist, what in (("transformers", "hiso.integrations.hf, text tasks"), ("flwr", "hiso.integrations.flower"),
                       ("ray", "Flower's simulation runtime (flwr run on one machine)")):
        try:
            lines.append(f"  {dist} {metadata.version(dist)}: {what}")
        except metadata.PackageNotFoundError:
            lines.append(f"  {dist} not installed: {what} unavailable")
    return "\n".join(lines)


def train(args) -> int:
    from .fl.runs import RunFolder
    from .fl.simulation import build, run

    if args.resume:
        folder, configs, rows, plan = _resume(args)
        out = folder.out
    else:
        base, methods, per_method = load_settings(args)
        configs = []
        try:
            for m in methods:
                configs.append(SimulationConfig(**{**base, **per_method.get(m, {}), "method": m}))
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"hiso: invalid settings: {exc}") from None
        out = args.out or os.path.join("runs", f"{configs[0].task}-{time.strftime('%Y%m%d-%H%M%S')}")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as fh:
            json.dump([dataclasses.asdict(c) for c in configs], fh, indent=1)
        folder, rows, plan = RunFolder(out), [], {}
    with open(os.path.join(out, "metrics.jsonl"), "a" if args.resume else "w") as jsonl:
        for cfg in configs:
            if args.resume and cfg.method not in plan:
                continue  # finished before the interruption
            print(f"== {cfg.method}: {cfg.task}, {cfg.rounds} rounds, {cfg.n_clients} clients "
                  f"({cfg.clients_per_round} per round), K={cfg.local_steps}, P={cfg.num_directions}, "
                  f"lr={cfg.lr:g}, mu={cfg.mu:g}", flush=True)
            setup = build(cfg)

            def report(row, cfg=cfg):
                row = {**row, "lr": cfg.lr}
                rows.append(row)
                jsonl.write(json.dumps(row) + "\n")
                jsonl.flush()
                if not args.quiet:
                    loss = "n/a" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
                    print(f"  {bar(row['round'] / cfg.rounds)} round {row['round']:>5}/{cfg.rounds}  "
                          f"acc {row['accuracy']:.4f}  eval loss {loss}  up {human_bytes(row['bytes_up'])}  "
                          f"{row['seconds']:.0f}s", flush=True)

            state = plan.get(cfg.method, {})
            run(cfg, on_eval=report, setup=setup, journal=folder.prepare(cfg.method), resume=state.get("resume", False),
                evaluated=state.get("evaluated", ()), elapsed=state.get("elapsed", 0.0),
                after_round=folder.saver(cfg, setup.model, setup.tokenizer))
            folder.finish(cfg.method, setup.model, setup.tokenizer)
    write_csv(rows, os.path.join(out, "metrics.csv"))
    table = summary_table(rows)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(table + "\n")
    print("\n" + table)
    try:
        plot(rows, os.path.join(out, "curves.png"))
    except ImportError:
        print("(matplotlib not installed: no plot)")
    print(f"\nresults in {out}")
    return 0


def _resume(args):
    """The run folder, configs, kept rows and per-method plan of ``hiso train --resume DIR``."""
    from .fl.journal import JournalError
    from .fl.runs import RunFolder

    given = [name for name in _fields() if getattr(args, name, None) is not None]
    if args.config or args.methods or args.out or given:
        raise SystemExit("hiso: --resume DIR takes every setting from DIR/config.json; give no other settings")
    folder = RunFolder(args.resume)
    try:
        configs = folder.load_configs()
        rows, plan = folder.resume_plan(configs)
    except (OSError, ValueError, JournalError) as exc:
        raise SystemExit(f"hiso: cannot resume: {exc}") from None
    return folder, configs, rows, plan


if __name__ == "__main__":
    sys.exit(main())
