"""HiSo vs ZO-SGD on diagonal quadratics: does a scalar-only curvature estimate help, and why (issue 4).

f(x) = 1/2 sum_j a_j x_j^2 in d = 10^4 dimensions, x_0 ~ N(0, I), two spectra:
  * "loguniform": a_j = exp(U(0, ln 10^3))  (condition number 10^3)
  * "lowrank":    10 coordinates with a_j = 10^3, the other 9,990 with a_j = 1 (low effective rank)
Target: f(x) <= 1% of f(x_0). Each method runs a grid of learning rates (the same multiples of 1 / tr(A) for all
methods) with fixed seeds; we report steps to target at each method's best learning rate.

On a quadratic the central difference is exact, so the simulation evaluates c = sum_j a_j x_j z_j and the second
difference Delta = 1/2 sum_j a_j z_j^2 in closed form; the update and curvature rules are those of
``hiso_kernels`` (``docs/kernels.md``), vectorised over the learning-rate grid. Directions come from
``torch.randn`` here (the study is about the rules, not the generator). ``tests/test_curvature_rules.py`` pins the
behaviour with the real optimizers at a smaller scale.

Usage: python benchmarks/quadratic_study.py [--steps 150000] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import time

import torch

D = 10_000


def spectrum(kind: str) -> torch.Tensor:
    if kind == "loguniform":
        return torch.exp(torch.rand(D, generator=torch.Generator().manual_seed(0)) * math.log(1e3))
    a = torch.ones(D)
    a[:10] = 1e3
    return a


RULES = {
    # name: (curvature rule, beta, h_min, warmup steps of the learning rate)
    "zosgd": (None, 0.0, 0.0, 0),
    "hiso-gsq": ("gsq", 0.95, 1e-8, 0),  # the authors' rule and beta
    "hiso-stein": ("stein", 0.99999, 1.0, 5000),  # second differences; beta needed for stability at d = 10^4
}


def run(kind: str, method: str, lr_mults, steps: int, seed: int = 0):
    rule, beta, h_min, warmup = RULES[method]
    a = spectrum(kind)
    trace = float(a.sum())
    lrs = torch.tensor([m / trace for m in lr_mults])[:, None]
    n = len(lr_mults)
    x = torch.randn(D, generator=torch.Generator().manual_seed(1)).repeat(n, 1)
    f0 = float(0.5 * (a * x[0] ** 2).sum())
    h = torch.ones(n, D)
    gen = torch.Generator().manual_seed(seed)
    hit = [None] * n
    alive = torch.ones(n, dtype=torch.bool)
    for t in range(steps):
        u = torch.randn(n, D, generator=gen)
        s = h.sqrt()
        z = u / s
        c = (a * x * z).sum(1, keepdim=True)
        scale = min(1.0, (t + 1) / warmup) if warmup else 1.0
        x = x - (lrs * scale) * c * z
        if rule == "gsq":
            g = c * u / s
            h = (beta * h + (1 - beta) * g * g).clamp_min(h_min)
        elif rule == "stein":
            delta = 0.5 * (a * z * z).sum(1, keepdim=True)
            h = (beta * h + (1 - beta) * h * delta * (u * u - 1)).clamp_min(h_min)
        if t % 50 == 49 or t == steps - 1:
            f = 0.5 * (a * x * x).sum(1)
            alive &= torch.isfinite(f) & (f < 1e6 * f0)
            for i in range(n):
                if hit[i] is None and bool(alive[i]) and float(f[i]) <= 0.01 * f0:
                    hit[i] = t + 1
            if all(hit[i] is not None or not bool(alive[i]) for i in range(n)):
                break
    stiff = h[:, :10].mean(1) if kind == "lowrank" else None
    rest = h[:, 10:].mean(1) if kind == "lowrank" else None
    return {
        "lr_mults": list(lr_mults),
        "steps_to_target": hit,
        "diverged": [not bool(v) for v in alive],
        "h_ratio_stiff_over_rest": None if stiff is None else [float(p / q) for p, q in zip(stiff, rest)],
        "h_spread": [float(h[i].std() / h[i].mean()) for i in range(n)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150_000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    results = {}
    for kind in ("lowrank", "loguniform"):
        for method in RULES:
            t = time.time()
            r = run(kind, method, grid, args.steps)
            r["seconds"] = time.time() - t
            results[f"{kind}/{method}"] = r
            best = min((s, m) for s, m in zip(r["steps_to_target"], grid) if s is not None) if any(
                s is not None for s in r["steps_to_target"]) else (None, None)
            print(f"{kind:10s} {method:11s} best lr = {best[1]} / tr(A): steps {best[0]}  "
                  f"({r['seconds']:.0f} s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stamp = dt.date.today().isoformat()
    with open(os.path.join(args.out, f"{stamp}-quadratic-study.json"), "w") as fh:
        json.dump({"date": stamp, "d": D, "steps": args.steps, "lr_grid_times_1_over_trA": grid,
                   "torch": torch.__version__, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
