"""Trace of the authors' H (gsq) through a federated run of the library (diagnosis: why gsq is slow early on SST-2).

gsq (HiSo, arXiv 2506.02370; `hiso.optim.curvature`) probes along z = u / sqrt(H), steps x <- x - lr c z with
c = g^T z (P = 1), so E[step_j] = lr g_j / H_j: coordinate j moves like DeComFL at lr / H_j. After the step,
H_j <- beta H_j + (1 - beta) c^2 u_j^2 / H_j. With H = 1 at the start, the first aggregated scalar c_0 sets
H_j = beta + (1 - beta) c_0^2 u_j^2: on an LLM (|c_0| of order 10) a chi-square draw around (1 - beta) c_0^2, far
above 1 for most coordinates and near 1 for the few whose u_j was small.

This script prints, after every applied round, the mean H, the per-tensor range of mean H, lr x mean(1 / H) (the
DeComFL lr a coordinate sees on average), the share of coordinates with H_j < 2 (those still stepping at more than
half the nominal lr) and the round's scalar, and writes them as JSON.

    python benchmarks/curvature/gsq_trace.py --task sst2 --model smollm2-135m --data-dir ../shared/data \\
        --lr 3e-4 --rounds 40 --out benchmarks/curvature/results/sst2-gsq-trace.json

The other settings are the SST-2 follow-up's (4 clients, 1 per round, K = 1, P = 1, batch 8, 400 sentences, mu
1e-3, mean aggregation, central differences); no evaluation is run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hiso.fl import simulation as sim
from hiso.fl.protocol import Replica


def h_summary(hessian: list[torch.Tensor], lr: float) -> dict:
    """Mean H, per-tensor mean range, lr * mean(1/H) and the share of H_j < 2 over every coordinate."""
    n = sum(h.numel() for h in hessian)
    means = [float(h.double().mean()) for h in hessian]
    mean = sum(m * h.numel() for m, h in zip(means, hessian)) / n
    inv = sum(float(h.double().reciprocal().sum()) for h in hessian) / n
    below = sum(int((h < 2).sum()) for h in hessian) / n
    return dict(mean_h=mean, tensor_mean_h=[min(means), max(means)], effective_lr=lr * inv, share_h_below_2=below)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the trace (default: print only)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.lr <= 0:
        p.error("--rounds must be >= 1 and --lr > 0")
    trace: list[dict] = []

    class TracingReplica(Replica):
        def apply(self, records):
            super().apply(records)
            row = dict(round=self.applied, scalar=float(records[-1].scalars[-1][0]), **h_summary(self.hessian, args.lr))
            trace.append(row)
            print(f"round {row['round']:3d}  c {row['scalar']:8.3f}  mean H {row['mean_h']:7.3f}  tensors "
                  f"[{row['tensor_mean_h'][0]:.2f}, {row['tensor_mean_h'][1]:.2f}]  lr*mean(1/H) "
                  f"{row['effective_lr']:.3g}  H<2: {row['share_h_below_2']:.4f}", flush=True)

    cfg = sim.SimulationConfig(
        task=args.task, model=args.model, data_dir=args.data_dir, method="hiso", curvature_rule="gsq",
        rounds=args.rounds, eval_every=10 ** 9, n_clients=4, clients_per_round=1, num_directions=1, batch_size=8,
        num_train=400, num_eval=8, aggregation="mean", lr=args.lr, mu=1e-3, seed=args.seed, difference="central")
    sim.run(cfg, replica_factory=TracingReplica)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(dict(settings=vars(args), torch=torch.__version__, trace=trace), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
