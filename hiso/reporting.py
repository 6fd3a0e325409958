"""Reports of federated runs: the summary table, the CSV file and the curves (``hiso train``, ``benchmarks/``)."""

from __future__ import annotations

import csv


def bar(frac: float, width: int = 20) -> str:
    n = round(frac * width)
    return "[" + "#" * n + "." * (width - n) + "]"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n}"


def write_csv(rows, path) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for row in rows for k in row))  # rows may carry extra keys (e.g. "diverged")
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
                     f"{human_bytes(f['bytes_up'])} | {human_bytes(f['bytes_down'])} | "
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
