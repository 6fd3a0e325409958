"""The ``hiso`` command line (also ``python -m hiso``).

    hiso train [--config NAME|FILE] [--task NAME | --task-spec FILE] [--methods ...] [--key value ...]
    hiso train --resume DIR                           continue an interrupted run from its round logs
    hiso export --log DIR/hiso/journal.hsj --out MODEL_DIR [--model NAME]   weights from a round log alone
    hiso tasks                                        the tasks, their scoring, labels and templates
    hiso info                                         version, kernels, backends, installed integrations

``hiso train`` runs each method with the same data split, seeds and model initialisation, shows a progress bar per
round and a line per evaluation, and writes ``config.json``, ``metrics.jsonl`` (strict JSON), ``metrics.csv``,
``summary.md`` and ``curves.png`` to ``--out`` (and TensorBoard scalars with ``--tensorboard``), and per method the
round log ``<method>/journal.hsj`` and the weights ``<method>/model/``, and ``fingerprints.json`` (sha256 of each
method's final parameters; :mod:`hiso.fl.runs`). Settings come from
the config's ``[train]`` table (and ``[methods.<name>]`` tables, e.g. a learning rate per method), overridden by
flags; ``--config`` takes a file or the name of a packaged config (``fashion_mnist``).

Every flag and setting is checked before anything heavy runs (model load, data): a bad one is a one-line error with
exit code 2 and no output folder. Subcommands live in :data:`COMMANDS`; ``hiso train``'s flags are generated from
the fields of :class:`hiso.fl.simulation.SimulationConfig` and checked by :mod:`hiso.settings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from . import __version__
from . import settings as st
from .fl.simulation import METHODS, SimulationConfig
from .settings import UsageError

PROG = "hiso"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints usage and message on two lines)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: Callable[[], str] = lambda: ""


# --------------------------------------------------------------------------------------------------------------------
# hiso train
# --------------------------------------------------------------------------------------------------------------------


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--config", help=f"a TOML file, or a packaged config: {', '.join(st.packaged_configs())}")
    g.add_argument("--task-spec", metavar="FILE", help="a task spec TOML file: train on your own text task")
    g.add_argument("--methods", nargs="+", choices=METHODS, metavar="METHOD",
                   help=f"methods to run, each from the same start: {', '.join(METHODS)} (default: the config's, "
                        "else hiso decomfl)")
    g.add_argument("--out", default=None, help="output folder (default: runs/<task>-<date-time>)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or evaluation lines")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <out>/tensorboard")
    g.add_argument("--no-plot", action="store_true", help="do not draw curves.png")
    g.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR (with DIR's settings: give "
                                                    "no other settings)")
    g = parser.add_argument_group("settings (SimulationConfig fields; config-file keys use underscores)")
    defaults = SimulationConfig()
    for name, spec in st.field_specs().items():
        if name == "method":
            continue
        flags = [f"--{name.replace('_', '-')}"] + [f"--{old.replace('_', '-')}" for old, new in st.RENAMED.items()
                                                   if new == name]
        choices = spec.choices()
        shown = f"one of {', '.join(choices)}; " if choices and len(choices) <= 12 else ""
        g.add_argument(*flags, dest=name, default=None, type=spec.parse, metavar=spec.metavar,
                       help=f"{spec.help}{'; ' if spec.help else ''}{shown}default {getattr(defaults, name)!r}")


def _train_description() -> str:
    from . import tasks

    lines = [__doc__.split("\n\n")[2].strip(), "", "tasks:"]
    for name in tasks.available_tasks():
        lines.append(f"  {name:<14}{tasks.task_info(name).description}")
    lines += ["", f"methods: {', '.join(METHODS)}", f"aggregations: {', '.join(st.choices_of('aggregation'))}",
              f"curvature rules: {', '.join(st.choices_of('curvature_rule'))}",
              f"packaged configs: {', '.join(st.packaged_configs())}"]
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> int:
    # every check; raises UsageError before anything heavy or any file is written
    if args.resume:
        plan, rows, resume = st.validate_resume(args)
    else:
        plan, rows, resume = st.validate_train(args), [], None
    from .fl.runs import RunFolder
    from .fl.simulation import build, run
    from .reporting import (
        RoundProgress,
        TensorBoardLogger,
        eval_line,
        plot,
        summary_table,
        write_csv,
        write_jsonl_row,
    )

    out = plan.out
    created = not os.path.exists(out)
    folder = RunFolder(out)
    tb: TensorBoardLogger | None = None
    jsonl: TextIO | None = None
    try:
        for cfg in plan.configs:
            if resume is not None and cfg.method not in resume:
                continue  # finished before the interruption
            state = (resume or {}).get(cfg.method, {})
            if not args.quiet:
                print(f"== {cfg.method}: {plan.task_name}, {cfg.rounds} rounds, {cfg.n_clients} clients "
                      f"({cfg.clients_per_round} per round), K={cfg.local_steps}, P={cfg.num_directions}, "
                      f"lr={cfg.lr:g}, mu={cfg.mu:g}" + (f", model {cfg.model}" if cfg.model else ""), flush=True)
            try:
                setup = build(cfg)
            except (OSError, ValueError, RuntimeError, ImportError) as exc:
                raise st.RunError(f"could not set up {cfg.method}: {exc}") from exc
            if jsonl is None:  # the folder appears only once the first setup (model and data) has loaded
                os.makedirs(out, exist_ok=True)
                if resume is None:
                    with open(os.path.join(out, "config.json"), "w") as fh:
                        json.dump([dataclasses.asdict(c) for c in plan.configs], fh, indent=1)
                # a resumed run appends to the rows kept by validate_resume
                jsonl = open(os.path.join(out, "metrics.jsonl"), "a" if resume is not None else "w")  # noqa: SIM115
                tb = TensorBoardLogger(os.path.join(out, "tensorboard")) if args.tensorboard else None
            progress = RoundProgress(cfg.rounds, cfg.method, enabled=not args.quiet)

            assert jsonl is not None

            def report(row: dict, cfg: SimulationConfig = cfg, progress: RoundProgress = progress,
                       jsonl: TextIO = jsonl, tb: TensorBoardLogger | None = tb) -> None:
                row = {**row, "lr": cfg.lr}
                rows.append(row)
                write_jsonl_row(jsonl, row)
                if tb is not None:
                    tb.log(row)
                progress.write(eval_line(row, cfg.rounds))

            try:
                run(cfg, on_eval=report, setup=setup, on_round=progress.round_done,
                    journal=folder.prepare(cfg.method), resume=state.get("resume", False),
                    evaluated=state.get("evaluated", ()), elapsed=state.get("elapsed", 0.0),
                    after_round=folder.saver(cfg, setup.model, setup.tokenizer))
            finally:
                progress.close()
            folder.finish(cfg.method, setup.model, setup.tokenizer)
    except BaseException:
        if created and not rows and os.path.isdir(out):
            shutil.rmtree(out, ignore_errors=True)  # nothing was measured: leave no folder behind
        raise
    finally:
        if jsonl is not None:
            jsonl.close()
        if tb is not None:
            tb.close()
    write_csv(rows, os.path.join(out, "metrics.csv"))
    table = summary_table(rows)
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(table + "\n")
    print("\n" + table)
    if not args.no_plot:
        try:
            plot(rows, os.path.join(out, "curves.png"), title=plan.title)
        except ImportError:
            print("(matplotlib not installed: no plot; pip install matplotlib)")
    print(f"\nresults in {out}")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# hiso export
# --------------------------------------------------------------------------------------------------------------------


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log", required=True, help="a round log (journal): DIR/<method>/journal.hsj")
    parser.add_argument("--out", required=True, help="folder for the weights")
    parser.add_argument("--model", help="causal LM name or folder, if not the journal's")


def run_export(args: argparse.Namespace) -> int:
    from .fl.journal import JournalError
    from .fl.runs import export

    if not os.path.isfile(args.log):
        raise UsageError(f"--log {args.log}: no such file")
    try:
        print(f"sha256 {export(args.log, args.out, args.model)}")
    except (ValueError, JournalError) as exc:
        raise UsageError(f"--log {args.log}: {exc}") from None
    except OSError as exc:
        raise st.RunError(f"export failed: {exc}") from None
    return 0


# --------------------------------------------------------------------------------------------------------------------
# hiso tasks, hiso info
# --------------------------------------------------------------------------------------------------------------------


def _tasks_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", help="also check a task spec TOML file and show it")


def run_tasks(args: argparse.Namespace) -> int:
    from . import tasks

    names = tasks.available_tasks()
    if args.spec:
        try:
            names = [tasks.task_info(args.spec).name]
            specs = {names[0]: tasks.text.load_spec(args.spec)}
        except (OSError, ValueError) as exc:
            raise UsageError(str(exc)) from None
    else:
        specs = dict(tasks.TASK_SPECS)
    for name in names:
        info = tasks.task_info(name) if name not in specs else None
        spec = specs.get(name)
        if spec is None:
            print(f"{name}: {info.description if info else ''}")
            continue
        labels = ", ".join(f"{n}" for n in spec.label_names)
        print(f"{spec.name}: {spec.description}\n  scoring {spec.scoring}; labels {labels}; max_length "
              f"{spec.max_length}; data {'/'.join(spec.train_files)} + {'/'.join(spec.eval_files)}"
              + (f" or hub {spec.hf_path}/{spec.hf_config}" if spec.hf_path else ""))
        for tname, t in spec.templates.items():
            answers = t.choices or t.verbalizer
            mark = " (default)" if tname == spec.default_template else ""
            print(f"  template {tname}{mark}: {t.pattern!r} -> {' | '.join(map(repr, answers))}")
    return 0


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def run_info(args: argparse.Namespace) -> int:
    from hiso_kernels.info import report

    print(report())
    print(integrations_report())
    return 0


def integrations_report() -> str:
    """Which optional integrations are installed (without importing them)."""
    from importlib import metadata

    lines = ["integrations:"]
    for dist, what in (("transformers", "hiso.integrations.hf, text tasks"), ("datasets", "text task data"),
                       ("flwr", "hiso.integrations.flower"),
                       ("ray", "Flower's simulation runtime (flwr run on one machine)"),
                       ("matplotlib", "curves.png"), ("tensorboard", "hiso train --tensorboard")):
        try:
            lines.append(f"  {dist} {metadata.version(dist)}: {what}")
        except metadata.PackageNotFoundError:
            lines.append(f"  {dist} not installed: {what} unavailable")
    return "\n".join(lines)


#: the subcommands: name -> Command (add one here, e.g. ``export``, and it appears in ``hiso --help``)
COMMANDS: dict[str, Command] = {
    "train": Command("federated fine-tuning in one process (HiSo, DeComFL, MeZO, FedAvg)", _train_arguments, run_train,
                     _train_description),
    "export": Command("rebuild trained weights from a round log alone (the log is the model)", _export_arguments,
                      run_export),
    "tasks": Command("list the tasks (scoring, labels, templates), or check a task spec file", _tasks_arguments,
                     run_tasks),
    "info": Command("version, built kernels, available backends, installed integrations", _no_arguments, run_info),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Zeroth-order and scalar-only federated fine-tuning (hiso "
                     f"{__version__}). Commands: {', '.join(COMMANDS)}; `hiso COMMAND --help` for each.")
    parser.add_argument("--version", action="version", version=f"hiso {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description() or cmd.help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command].run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except st.RunError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
