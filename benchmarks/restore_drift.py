"""Restore drift: how far x moves after many MeZO perturb / restore cycles that should each give x back exactly.

    python benchmarks/restore_drift.py        # 1,000 cycles, 4 Mi elements -> results/<date>-restore-drift.md
    python benchmarks/restore_drift.py --cycles 100 --no-eager

One cycle is MeZO's +mu, -2 mu, +mu with the same seed (a fresh seed each cycle): in exact arithmetic the identity.
With rounding after every pass it is not: x + mu z rounds, the -2 mu z pass rounds again, and the restore lands one or
more ulps away from x for some elements; over many steps the errors accumulate like a random walk. This measures,
after 1, 10, 100 and 1,000 cycles (mu = 1e-3, x ~ N(0, 0.02), a realistic weight scale):

    changed      share of elements whose stored bits differ from the original
    ulps         distance in units in the last place (p50, p99, p99.99 and max over the elements)
    max |dx|     largest absolute change, and rms(dx) / rms(x) the relative drift on the weights' scale

for fp32, bf16 (round to nearest even) and bf16 with ``stochastic_rounding=True``, with the fused kernels, and for
bf16 with the eager MeZO loop (``torch.normal`` + multiply + add in bf16) as the reference users have today.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl
import hiso_kernels as hk


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Map float bits to integers that are ordered like the floats, so |a - b| counts representable values between.

    Sign-magnitude to two's complement: non-negative floats keep their bits, negative floats become -(magnitude).
    """
    if x.dtype == torch.float32:
        i = x.view(torch.int32).to(torch.int64)
        mag = i & 0x7FFFFFFF
    elif x.dtype in (torch.bfloat16, torch.float16):
        i = x.view(torch.int16).to(torch.int64)
        mag = i & 0x7FFF
    else:
        raise TypeError(x.dtype)
    return torch.where(i < 0, -mag, mag)


def drift_stats(x0: torch.Tensor, x: torch.Tensor) -> dict:
    """Ulp distances are reported as percentiles: the maximum is set by the few elements closest to zero, where
    representable values are dense (an absolute change of 1e-6 there spans thousands of ulps)."""
    ulps = (ordered_bits(x) - ordered_bits(x0)).abs().double()
    q = torch.quantile(ulps, torch.tensor([0.5, 0.99, 0.9999], dtype=torch.float64)).tolist()
    a, b = x0.double(), x.double()
    return {"changed": (ulps != 0).double().mean().item(), "p50_ulps": q[0], "p99_ulps": q[1], "p9999_ulps": q[2],
            "max_ulps": int(ulps.max()), "rms_rel": ((b - a).pow(2).mean() / a.pow(2).mean()).sqrt().item(),
            "max_abs": (b - a).abs().max().item()}


def run(variant: str, x0: torch.Tensor, cycles: int, checkpoints: list[int], mu: float) -> list[dict]:
    method = variant.split(":")[1]
    x = x0.clone()
    out = []
    t0 = time.perf_counter()
    for c in range(1, cycles + 1):
        seed = 10_000 + c
        if method == "eager":
            for scale in (1, -2, 1):
                torch.manual_seed(seed)
                bl.mezo_perturb_loop([x], scale, mu)
        else:
            sr = method == "fused-sr"
            hk.perturb_([x], seed, mu, stochastic_rounding=sr)
            hk.perturb_([x], seed, -2 * mu, stochastic_rounding=sr)
            hk.perturb_([x], seed, mu, stochastic_rounding=sr)
        if c in checkpoints:
            row = {"variant": variant, "cycles": c, **drift_stats(x0, x)}
            out.append(row)
            print(f"  {variant:<16} {c:>5} cycles: changed {100 * row['changed']:.3f}%, p99 {row['p99_ulps']:g} ulps, "
                  f"max {row['max_ulps']} ulps, rms(dx)/rms(x) {row['rms_rel']:.2e}  "
                  f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    return out


LABELS = {
    "fp32:fused": "fp32, fused (nearest)",
    "bf16:fused": "bf16, fused (nearest)",
    "bf16:fused-sr": "bf16, fused, stochastic_rounding=True",
    "bf16:eager": "bf16, eager MeZO loop",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=1 << 22)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--mu", type=float, default=1e-3)
    p.add_argument("--no-eager", action="store_true", help="skip the eager MeZO loop reference (the slowest part)")
    p.add_argument("--out", default=bl.RESULTS_DIR)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    checkpoints = sorted({c for c in (1, 10, 100, 1000, args.cycles) if c <= args.cycles})
    g = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=g) * 0.02
    variants = ["fp32:fused", "bf16:fused", "bf16:fused-sr"] + ([] if args.no_eager else ["bf16:eager"])
    rows = []
    for v in variants:
        x0 = base.to(bl.DTYPES[v.split(":")[0]])
        rows += run(v, x0, args.cycles, checkpoints, args.mu)

    cond = bl.conditions("cpu")
    lines = [f"# Restore drift after perturb / restore cycles ({args.numel} elements, mu = {args.mu:g})", "",
             f"{cond['date']} - torch {cond['torch']}, hiso_kernels {cond['hiso_kernels']} (commit "
             f"{cond.get('git_commit')}). x ~ N(0, 0.02); one cycle = perturb +mu, -2 mu, +mu with the same seed, a "
             "fresh seed per cycle. Deterministic (no timing): any machine gives the same numbers.", "",
             "| parameters | cycles | elements changed | ulps p50 / p99 / p99.99 | max ulps | max abs(dx) | "
             "rms(dx) / rms(x) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {LABELS[r['variant']]} | {r['cycles']} | {100 * r['changed']:.3f}% | {r['p50_ulps']:g} / "
                     f"{r['p99_ulps']:g} / {r['p9999_ulps']:g} | {r['max_ulps']} | {r['max_abs']:.2e} | "
                     f"{r['rms_rel']:.2e} |")
    lines += ["", "An ulp is one step between adjacent values of the parameter dtype (bf16 keeps 8 significant bits: "
              "one ulp is 2^-8 to 2^-7 of the value). The maximum in ulps comes from elements near zero, where values "
              "are dense; max abs(dx) and rms(dx) / rms(x) give the drift on the weights' own scale. Exact restores "
              "need a snapshot or fp32 master weights; stochastic rounding makes each rounding unbiased, so the drift "
              "is a zero-mean random walk, at the price of a larger spread.", ""]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or f"{datetime.date.today().isoformat()}-restore-drift"
    path = os.path.join(args.out, f"{stem}.md")
    with open(path, "w") as f:
        f.write(text + "\n<!-- raw\n" + json.dumps({"conditions": cond, "rows": rows}, indent=1) + "\n-->\n")
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
