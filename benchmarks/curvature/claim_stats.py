"""The claim statistics shared by the Fashion-MNIST lab (``fmnist_lab.py``) and the claim harness
(``benchmarks/fl_claim.py``), fixed before the runs (``PREREGISTRATION.md``):

* per run: rounds to a target accuracy T (first evaluation at or above T; not reached = infinity), the area under
  the accuracy curve (trapezoid over rounds 0..R divided by R; after a divergence the curve is filled with a fixed
  accuracy, chance level), the final accuracy;
* the best lr of a method: fewest median rounds to T over the seeds, then higher median AUC; *interior* when it is
  neither end of the grid; a grid is extended by a factor at the edge the best lr sits on until it is interior;
* over seeds: median and [min-max];
* claim tests: M halves the rounds of B when median(M) <= 0.5 median(B) and the [min, max] ranges do not overlap;
  M beats A by more than the seed spread when median(A) - median(M) > max(range(M), range(A)).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np


def curve_metrics(curve: Sequence[dict], rounds: int, targets: Sequence[float]) -> dict:
    """final, auc, best and ``rounds_to`` {"0.50": round or None} of a curve of {"round", "accuracy"} rows."""
    xs = [r["round"] for r in curve]
    ys = [r["accuracy"] for r in curve]
    trapz = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed it
    reach = {f"{t:.2f}": next((r["round"] for r in curve if r["accuracy"] >= t), None) for t in targets}
    return dict(final=ys[-1], auc=float(trapz(ys, xs) / rounds), best=max(ys), rounds_to=reach)


def fill_after_divergence(curve: list[dict], rounds: int, eval_every: int, accuracy: float) -> list[dict]:
    """The curve with the evaluation points after a divergence filled with ``accuracy`` (chance level)."""
    last = curve[-1]["round"] if curve else 0
    nxt = (last // eval_every + 1) * eval_every
    out = list(curve)
    for r in list(range(nxt, rounds + 1, eval_every)) + ([rounds] if rounds % eval_every else []):
        if r > last:
            out.append(dict(round=r, accuracy=accuracy, diverged=True))
    return out


def as_inf(xs: Sequence[float | None]) -> list[float]:
    return [math.inf if x is None else float(x) for x in xs]


def selection_key(metrics: Sequence[dict], target: float) -> tuple[float, float]:
    """(median rounds to T, -median AUC): smaller is better."""
    rt = as_inf([m["rounds_to"][f"{target:.2f}"] for m in metrics])
    return statistics.median(rt), -statistics.median(m["auc"] for m in metrics)


def best_lr(by_lr: dict[float, list[dict]], target: float) -> tuple[float | None, bool, list[float]]:
    """(best lr, interior?, the lrs) among the lrs with a complete set of runs (``by_lr[lr]`` = their metrics)."""
    lrs = sorted(by_lr)
    if not lrs:
        return None, False, []
    i = min(range(len(lrs)), key=lambda k: selection_key(by_lr[lrs[k]], target))
    return lrs[i], 0 < i < len(lrs) - 1, lrs


def next_lr(best: float, lrs: Sequence[float], factor: float) -> float:
    """The lr that extends the grid past the edge the best lr sits on (rounded to 6 significant digits)."""
    new = best * factor if best == max(lrs) else best / factor
    return float(f"{new:.6g}")


def spread(xs: Sequence[float | None]) -> tuple[float, float, float]:
    """(median, min, max), None counted as infinity (not reached)."""
    v = as_inf(xs)
    return statistics.median(v), min(v), max(v)


def fmt_spread(xs: Sequence[float | None], digits: int = 0) -> str:
    """'median [min-max]' ('not' for infinity); one value alone without brackets."""
    def f(v: float) -> str:
        return "not" if math.isinf(v) else (f"{v:.{digits}f}")

    m, lo, hi = spread(xs)
    return f"{f(m)} [{f(lo)}-{f(hi)}]" if len(xs) > 1 else f(m)


def halves(method_rounds: Sequence[float | None], base_rounds: Sequence[float | None]) -> dict:
    """The 2x test: ratio of medians, whether median(M) <= 0.5 median(B), whether the ranges do not overlap."""
    m, _, m_hi = spread(method_rounds)
    b, b_lo, _ = spread(base_rounds)
    ratio = (b / m) if math.isfinite(m) and m > 0 else None
    return dict(ratio=ratio, median_halved=math.isfinite(m) and m <= 0.5 * b,
                disjoint=m_hi < b_lo, passed=math.isfinite(m) and m <= 0.5 * b and m_hi < b_lo)


def beats_by_spread(method_rounds: Sequence[float | None], ablation_rounds: Sequence[float | None]) -> dict:
    """Whether M's median is better than A's by more than the larger seed range (infinite ranges never pass)."""
    m, m_lo, m_hi = spread(method_rounds)
    a, a_lo, a_hi = spread(ablation_rounds)
    gap = a - m
    width = max(m_hi - m_lo, a_hi - a_lo)
    finite = math.isfinite(gap) and math.isfinite(width)
    return dict(gap=gap, spread=width, passed=(finite and gap > width) or (math.isfinite(m_hi) and math.isinf(a_lo)))
