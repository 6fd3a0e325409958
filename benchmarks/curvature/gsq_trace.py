"""Trace of the authors' H (gsq) through a federated run of the library (diagnosis: why gsq is slow early on SST-2).

gsq (HiSo, arXiv 2506.02370; `hiso.optim.curvature`) probes along z = u / sqrt(H), steps x <- x - lr c z with
c = g^T z (P = 1), so E[step_j] = lr g_j / H_j: coordinate j moves like DeComFL at lr / H_j. After the step,
H_j <- beta H_j + (1 - beta) c^2 u_j^2 / H_j. With H = 1 at the start, the first aggregated scalar c_0 sets
H_j = beta + (1 - beta) c_0^2 u_j^2: on an LLM (|c_0| of order 10) a chi-square draw around (1 - beta) c_0^2, far
above 1 for most coordinates and near 1 for the few whose u_j was small.

This script prints, after every applied round, the mean H, the per-tensor range of mean H, lr x mean(1 / H) (the
DeComFL lr a coordinate sees on average), the share of coordinates with H_j < 2 (those still stepping at more than
half the nominal lr) and the round's scalar, and writes them as JSON.

    python benchmarks/curvature/gsq_trace.py --study benchmarks/results/claim-sst2-dev --lr 3e-4 --rounds 40 \\
        --out benchmarks/curvature/results/sst2-gsq-trace.json

The run is the claim study's ``hiso-gsq`` run (central differences) at that seed and lr, built from the study's
``settings.json`` by ``fl_claim.sim_config``, for the first ``--rounds`` rounds and without evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ (fl_claim)
from fl_claim import sim_config

from hiso.fl.protocol import Replica
from hiso.fl.simulation import run


def h_summary(hessian: list[torch.Tensor], lr: float) -> dict:
    """Mean H, per-tensor mean range, lr * mean(1/H) and the share of H_j < 2 over every coordinate (one float64
    copy of each tensor, freed before the next)."""
    n = sum(h.numel() for h in hessian)
    sums, inv, below = [], 0.0, 0
    for h in hessian:
        hd = h.double()
        sums.append(float(hd.sum()))
        inv += float(hd.reciprocal_().sum())
        below += int((h < 2).sum())
    means = [s / h.numel() for s, h in zip(sums, hessian)]
    return dict(mean_h=sum(sums) / n, tensor_mean_h=[min(means), max(means)], effective_lr=lr * inv / n,
                share_h_below_2=below / n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="benchmarks/results/claim-sst2-dev", help="a claim study's folder")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the trace (default: print only)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.lr <= 0:
        p.error("--rounds must be >= 1 and --lr > 0")
    with open(os.path.join(args.study, "settings.json")) as fh:
        st = json.load(fh)
    trace: list[dict] = []

    class TracingReplica(Replica):
        def apply(self, records):
            super().apply(records)
            row = dict(round=self.applied, scalar=float(records[-1].scalars[-1][0]), **h_summary(self.hessian, args.lr))
            trace.append(row)
            print(f"round {row['round']:3d}  c {row['scalar']:8.3f}  mean H {row['mean_h']:7.3f}  tensors "
                  f"[{row['tensor_mean_h'][0]:.2f}, {row['tensor_mean_h'][1]:.2f}]  lr*mean(1/H) "
                  f"{row['effective_lr']:.3g}  H<2: {row['share_h_below_2']:.4f}", flush=True)

    run(sim_config(st, "hiso-gsq", "central", args.seed, args.lr, rounds=args.rounds, eval_every=10 ** 9,
                   num_eval=8), replica_factory=TracingReplica)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(settings=vars(args), study=st, torch=torch.__version__, trace=trace), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
