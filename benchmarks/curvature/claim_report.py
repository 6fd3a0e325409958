"""The report of a claim study (``benchmarks/fl_claim.py``): a table per arm at its best lr, the claim tests, the
conditions and commands, and a plot of the median accuracy curve with the min-max band over seeds. Statistics from
``benchmarks/curvature/claim_stats.py``."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import claim_stats as cs


def load_all(out: str) -> dict[str, dict[tuple[int, float], dict]]:
    """{arm-difference: {(seed, lr): run record}} of every finished run under ``out``."""
    root = os.path.join(out, "runs")
    res: dict[str, dict[tuple[int, float], dict]] = {}
    for arm in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for fn in sorted(os.listdir(os.path.join(root, arm))):
            if fn.endswith(".json"):
                with open(os.path.join(root, arm, fn)) as fh:
                    r = json.load(fh)
                res.setdefault(arm, {})[(r["seed"], r["lr"])] = r
    return res


def summarize(runs: dict[tuple[int, float], dict], target: float) -> dict | None:
    """The arm at its best lr over the largest seed set that has complete lrs: seeds, lr, interior, grid, the
    per-seed metrics, and whether every lr of the grid has all of those seeds (else: partial)."""
    seeds_all = sorted({s for s, _ in runs})
    for k in range(len(seeds_all), 0, -1):
        seeds = seeds_all[:k]
        by: dict[float, list[dict]] = {}
        for (s, lr), r in runs.items():
            if s in seeds:
                by.setdefault(lr, []).append(r)
        complete = {lr: rs for lr, rs in by.items() if len(rs) == k}
        best, interior, lrs = cs.best_lr({lr: [r["metrics"] for r in rs] for lr, rs in complete.items()}, target)
        if best is not None:
            vals = sorted(complete[best], key=lambda r: r["seed"])
            return dict(seeds=seeds, lr=best, interior=interior, lrs=lrs, runs=vals,
                        partial=len(complete) < len(by) or len(seeds) < len(seeds_all) or len(seeds) < 3,
                        incomplete_lrs=sorted(set(by) - set(complete)))
    return None


def _untestable(summary: dict) -> list[str]:
    """Why an arm's numbers cannot decide a claim yet (PREREGISTRATION.md: 3 seeds, an interior best lr)."""
    gaps = []
    if len(summary["seeds"]) < 3:
        gaps.append(f"{len(summary['seeds'])} of 3 seeds")
    elif summary["partial"]:
        gaps.append("runs missing")
    if not summary["interior"]:
        gaps.append("best lr not interior")
    return gaps


def report(out: str, st: dict, machine: str = "") -> str:
    """Write ``report.md`` and ``report.png`` in ``out``; returns the markdown."""
    target = st["target"]
    tkey = f"{target:.2f}"
    arms = {a: summarize(r, target) for a, r in load_all(out).items()}
    arms = {a: s for a, s in arms.items() if s is not None}
    lines = [f"# Claim study: {st['task']}, target accuracy {target:.2f} (fixed before the runs)", "",
             "Per arm at its best lr (fewest median rounds to the target, then higher median AUC): median "
             "[min-max] over seeds; 'not' = not reached within the horizon. *partial*: runs missing (fewer than 3 "
             "seeds, or lrs without every seed).", "",
             f"| arm | seeds | best lr | interior | lrs | rounds to {target:.2f} | AUC | final acc | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a, s in arms.items():
        ms = [r["metrics"] for r in s["runs"]]
        lines.append(
            f"| {a} | {len(s['seeds'])} | {s['lr']:.3g} | {'yes' if s['interior'] else 'NO'} | "
            f"{', '.join(f'{x:.3g}' for x in s['lrs'])} | {cs.fmt_spread([m['rounds_to'][tkey] for m in ms])} | "
            f"{cs.fmt_spread([m['auc'] for m in ms], 3)} | {cs.fmt_spread([m['final'] for m in ms], 3)} | "
            f"{'partial' if s['partial'] else 'complete'} |")
    lines += ["", "## Claim tests", ""]

    def rounds(a):
        return [r["metrics"]["rounds_to"][tkey] for r in arms[a]["runs"]]

    decos = [a for a in arms if a.startswith("decomfl-")]
    if decos:
        # DeComFL at its better difference scheme is the baseline
        base = min(decos, key=lambda a: cs.selection_key([r["metrics"] for r in arms[a]["runs"]], target))
        lines.append(f"Baseline: {base} (DeComFL at its better difference scheme).")
        lines.append("")
        for a in arms:
            if not a.startswith("decomfl-"):  # every rule and direction family against the baseline
                t = cs.halves(rounds(a), rounds(base))
                ratio = "-" if t["ratio"] is None else f"{t['ratio']:.2f}x"
                verdict = "met" if t["passed"] else "not met"
                gaps = _untestable(arms[a]) + _untestable(arms[base])
                if gaps:  # a verdict needs 3 seeds and an interior best lr on both sides
                    verdict = f"not testable yet ({'; '.join(sorted(set(gaps)))}); so far {verdict}"
                lines.append(f"- {a} vs {base}: ratio of medians {ratio}; median halved: {t['median_halved']}; "
                             f"ranges disjoint: {t['disjoint']}; **2x target {verdict}**")
    for a in arms:
        rule_diff = a[5:] if a.startswith("hiso-") else None
        if rule_diff is None or rule_diff.startswith("scalar-"):
            continue
        diff = a.rsplit("-", 1)[1]
        abl = f"hiso-scalar-{diff}"
        if abl in arms:
            t = cs.beats_by_spread(rounds(a), rounds(abl))
            gaps = _untestable(arms[a]) + _untestable(arms[abl])
            note = f" (not testable yet: {'; '.join(sorted(set(gaps)))})" if gaps else ""
            lines.append(f"- {a} vs its scalar ablation {abl}: median gap {t['gap']:.0f} rounds, larger seed range "
                         f"{t['spread']:.0f}: **{'beats it' if t['passed'] else 'does not beat it'} by more than the "
                         f"seed spread**{note}")
    lines += ["", "## Conditions", "", f"Settings: `{json.dumps(st, sort_keys=True)}`", ""]
    if machine:
        lines.append(f"Machine: {machine}.")
    any_run = next((r for s in arms.values() for r in s["runs"]), None)
    if any_run:
        devices = sorted({r.get("device", "cpu") for s in arms.values() for r in s["runs"]})
        lines.append(f"torch {any_run.get('torch')}, {any_run.get('threads')} threads, device "
                     f"{', '.join(devices)}; runs dated "
                     f"{min(r['date'] for s in arms.values() for r in s['runs'])}.."
                     f"{max(r['date'] for s in arms.values() for r in s['runs'])}.")
    cmd = os.path.join(out, "commands.txt")
    if os.path.exists(cmd):
        with open(cmd) as fh:
            lines += ["", "Commands:", "", *[f"    {c.rstrip()}" for c in fh if c.strip()]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(text)
    if arms:
        plot(arms, st, os.path.join(out, "report.png"))
    print(text)
    return text


def plot(arms: dict, st: dict, path: str) -> None:
    """Median accuracy against rounds with the [min, max] band over seeds, one line per arm at its best lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for a, s in arms.items():
        curves = [{r["round"]: r["accuracy"] for r in run["curve"]} for run in s["runs"]]
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        ys = np.array([[c[x] for x in xs] for c in curves])
        line = ax.plot(xs, np.median(ys, axis=0), label=f"{a} (lr {s['lr']:.3g}, {len(curves)} seeds)")[0]
        ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.axhline(st["target"], color="grey", ls="--", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("evaluation accuracy")
    ax.set_title(f"{st['task']}: median and min-max over seeds at each arm's best lr")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
