"""Reports of federated runs (``hiso train``, ``benchmarks/``): strict JSON lines, the CSV file, the summary table,
the curves, per-round progress bars (tqdm) and optional TensorBoard scalars."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, TextIO


def bar(frac: float, width: int = 20) -> str:
    n = round(frac * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One strict-JSON line (``allow_nan=False`` after :func:`strict`: a NaN can never slip through)."""
    return json.dumps(strict(row), allow_nan=False) + "\n"


def write_jsonl_row(fh: TextIO, row: dict) -> None:
    fh.write(json_line(row))
    fh.flush()


def write_csv(rows, path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))  # rows may carry extra keys (e.g. "diverged")
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(strict(r) for r in rows)


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
        lr = "-" if f.get("lr") is None else f"{f['lr']:g}"
        lines.append(f"| {m} | {lr} | {f['round']} | {f['accuracy']:.4f} | {best:.4f} | "
                     f"{human_bytes(f['bytes_up'])} | {human_bytes(f['bytes_down'])} | "
                     + " | ".join("-" if x is None else str(x) for x in reach) + " |")
    return "\n".join(lines)


#: line style and marker per method, in order: methods stay apart in print and for colour-blind readers
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "P"))


def plot(rows: Sequence[dict], path, title: str = "") -> list[tuple[str, str, str]]:
    """Accuracy and loss against rounds and against bytes sent by clients (log scale): a 2 x 2 figure.

    Loss is the evaluation loss (the training loss where no evaluation loss was recorded); missing (null) values
    break the line rather than dropping to zero. Returns each panel's (x label, y label, x scale).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, m in enumerate(methods):
        rs = [r for r in rows if r["method"] == m]
        style, marker = STYLES[i % len(STYLES)]
        kw: dict[str, Any] = dict(label=m, linestyle=style, marker=marker, markersize=4, linewidth=1.6, alpha=0.9)
        rounds = [r["round"] for r in rs]
        sent = [max(r["bytes_up"], 1) for r in rs]
        acc = [_nan(r.get("accuracy")) for r in rs]
        loss = [_nan(r.get("eval_loss") if r.get("eval_loss") is not None else r.get("train_loss")) for r in rs]
        axes[0][0].plot(rounds, acc, **kw)
        axes[1][0].plot(rounds, loss, **kw)
        if any(r["bytes_up"] for r in rs):
            axes[0][1].plot(sent, acc, **kw)
            axes[1][1].plot(sent, loss, **kw)
    for row, what in ((0, "eval accuracy"), (1, "eval loss")):
        axes[row][0].set_xlabel("round")
        axes[row][1].set_xlabel("bytes sent by clients (all, cumulative)")
        axes[row][1].set_xscale("log")
        for ax in axes[row]:
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title or "hiso train")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    panels = [(ax.get_xlabel(), ax.get_ylabel(), ax.get_xscale()) for row in axes for ax in row]
    plt.close(fig)
    return panels


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


class TensorBoardLogger:
    """Evaluation rows as TensorBoard scalars (``<method>/accuracy``, ``.../eval_loss``, ...), step = round.

    Needs the ``tensorboard`` package (``torch.utils.tensorboard`` writes the event files);
    :func:`tensorboard_available` says whether it is installed.
    """

    KEYS = ("accuracy", "eval_loss", "train_loss", "bytes_up", "bytes_down", "rejections")

    def __init__(self, logdir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def log(self, row: dict) -> None:
        for key in self.KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{row['method']}/{key}", value, row["round"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def tensorboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


class RoundProgress:
    """A tqdm bar over one method's rounds: loss of the last round, rounds/s and ETA from the first round; evaluation
    lines printed above it. ``enabled=False`` prints nothing."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, file: TextIO | None = None) -> None:
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, unit="round", disable=not enabled, file=file, dynamic_ncols=True,
                        mininterval=0.5, smoothing=0.1)
        self.enabled = enabled

    def round_done(self, rnd: int, loss: float | None) -> None:
        if loss is not None and math.isfinite(loss):
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        first = self.bar.n == 0
        self.bar.update(rnd - self.bar.n)
        if first:  # the first round's loss and rate at once, whatever tqdm's 0.5 s throttle says
            self.bar.refresh()

    def write(self, line: str) -> None:
        if self.enabled:
            self._tqdm.write(line, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


def eval_line(row: dict, rounds: int) -> str:
    acc = "n/a" if row.get("accuracy") is None else f"{row['accuracy']:.4f}"
    loss = "n/a" if row.get("eval_loss") is None else f"{row['eval_loss']:.4f}"
    extra = "  DIVERGED" if row.get("diverged") else ""
    return (f"  {row['method']} round {row['round']:>5}/{rounds}  acc {acc}  eval loss {loss}  "
            f"up {human_bytes(row['bytes_up'])}  {row['seconds']:.0f}s{extra}")


def methods_in(rows: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows))
