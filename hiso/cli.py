"""The ``hiso`` command line.

    hiso train [--config FILE.toml] [--methods hiso decomfl] [--key value ...]   federated fine-tuning (simulated)
    hiso info                                                                      version, kernels, backends

``hiso train`` runs each method with the same data split, seeds and model initialisation, prints progress and a
summary table, and writes ``metrics.jsonl``, ``metrics.csv``, ``summary.md`` and ``curves.png`` (accuracy against
rounds and against bytes sent) to ``--out``. Settings come from the TOML file's ``[train]`` table (and per-method
tables ``[methods.<name>]``, e.g. a learning rate), overridden by flags.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
import time
import tomllib

from .fl.simulation import METHODS, SimulationConfig


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
    defaults = SimulationConfig()
    for name, field in _fields().items():
        if name == "method":
            continue
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None,
                           help=f"(default {getattr(defaults, name)!r})")
    return parser


def load_settings(args) -> tuple[dict, list[str], dict]:
    base: dict = {}
    per_method: dict = {}
    methods = None
    if args.config:
        with open(args.config, "rb") as fh:
            doc = tomllib.load(fh)
        base = dict(doc.get("train", {}))
        methods = base.pop("methods", None)
        per_method = {k: dict(v) for k, v in doc.get("methods", {}).items()}
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
    from .fl.simulation import build, run

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
    rows: list[dict] = []
    jsonl = open(os.path.join(out, "metrics.jsonl"), "w")
    try:
        for cfg in configs:
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
                    bar = _bar(row["round"] / cfg.rounds)
                    print(f"  {bar} round {row['round']:>5}/{cfg.rounds}  acc {row['accuracy']:.4f}  "
                          f"eval loss {row['eval_loss']:.4f}  up {_human(row['bytes_up'])}  "
                          f"{row['seconds']:.0f}s", flush=True)

            run(cfg, on_eval=report, setup=setup)
    finally:
        jsonl.close()
    _write_csv(rows, os.path.join(out, "metrics.csv"))
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


def _bar(frac: float, width: int = 20) -> str:
    n = int(round(frac * width))
    return "[" + "#" * n + "." * (width - n) + "]"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def _write_csv(rows, path) -> None:
    if not rows:
        return
    keys = list(rows[0])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def rounds_to_reach(rows, method, target) -> int | None:
    for r in rows:
        if r["method"] == method and r["accuracy"] >= target:
            return r["round"]
    return None


def summary_table(rows) -> str:
    """Final accuracy, best accuracy, rounds to reach the other methods' final accuracy, and bytes."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    final = {m: [r for r in rows if r["method"] == m][-1] for m in methods}
    lines = ["| method | lr | rounds | final acc | best acc | upload (all clients) | download | "
             + " | ".join(f"rounds to {m}'s final" for m in methods) + " |",
             "|" + "---|" * (7 + len(methods))]
    for m in methods:
        f = final[m]
        best = max(r["accuracy"] for r in rows if r["method"] == m)
        reach = [rounds_to_reach(rows, m, final[o]["accuracy"]) for o in methods]
        lines.append(f"| {m} | {f['lr']:g} | {f['round']} | {f['accuracy']:.4f} | {best:.4f} | "
                     f"{_human(f['bytes_up'])} | {_human(f['bytes_down'])} | "
                     + " | ".join("-" if x is None else str(x) for x in reach) + " |")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        ax1.plot([r["round"] for r in rs], [r["accuracy"] for r in rs], label=m)
        if any(r["bytes_up"] for r in rs):
            ax2.plot([max(r["bytes_up"], 1) for r in rs], [r["accuracy"] for r in rs], label=m)
    ax1.set_xlabel("round")
    ax1.set_ylabel("eval accuracy")
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes sent by clients (all, cumulative)")
    ax2.set_ylabel("eval accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
