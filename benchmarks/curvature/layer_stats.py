"""Per-tensor gradient energy and Hessian trace of the Fashion-MNIST SmallCNN (diagnosis only: autograd).

For each trainable tensor t (n_t elements) on a fixed batch of the training set:
  G_t = ||g_t||^2 (exact gradient), T_t = tr(H_t) (Hutchinson with Rademacher vectors restricted to t, 64 samples),
  r_t = G_t / T_t: the one-step decrease of ZO-SGD restricted to block t at its best lr is about r_t / 2, and a
  block-constant preconditioner D gives sum_t d_t G_t / (2 sum_t d_t T_t), a weighted mean of the r_t
  (weights d_t T_t). So the ceiling of per-block scaling, at one moment, is max_t r_t / (sum G / sum T).
Measured at initialisation and after first-order SGD reached a few accuracy levels (proxy checkpoints).

    python benchmarks/curvature/layer_stats.py --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hiso.fl.simulation import SimulationConfig, build


def stats(model, task, batch, n_hutch=64, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = task.loss(model, batch)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _i, (n, p, g) in enumerate(zip(names, params, grads)):
        tr = 0.0
        for _ in range(n_hutch):
            v = (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).float()
            hv = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=True)[0]
            tr += float((hv * v).sum())
        tr /= n_hutch
        G = float((g.detach() ** 2).sum())
        out.append(dict(name=n, numel=p.numel(), grad_sq=G, mean_grad_sq=G / p.numel(), hess_trace=tr,
                        mean_curv=tr / p.numel(), r=G / tr if tr > 0 else None))
    return float(loss), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "layer_stats"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SimulationConfig(task="fashion_mnist", method="decomfl", num_train=10000, num_eval=2000, seed=args.seed)
    setup = build(cfg)
    task, model = setup.task, setup.model
    big = task.make_batches(task.train_examples, 1000, shuffle=True, seed=123)[0]
    train = task.make_batches(task.train_examples, 32, shuffle=True, seed=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    rows = []
    targets = [0.0, 0.5, 0.65, 0.75]
    step = 0
    for tgt in targets:
        while True:
            acc = task.evaluate(model, setup.eval_batches).accuracy
            if acc >= tgt:
                break
            for _ in range(5):
                b = train[step % len(train)]
                step += 1
                opt.zero_grad()
                task.loss(model, b).backward()
                opt.step()
        loss, st = stats(model, task, big)
        G, T = sum(s["grad_sq"] for s in st), sum(s["hess_trace"] for s in st)
        rmax = max(s["r"] for s in st if s["r"] is not None)
        rows.append(dict(accuracy=acc, sgd_steps=step, loss=loss, tensors=st, r_all=G / T, r_max=rmax,
                         ceiling=rmax / (G / T)))
        print(f"acc {acc:.3f} loss {loss:.3f}  r_all {G / T:.3g}  ceiling max r_t / r_all = {rmax / (G / T):.2f}")
        for s in st:
            print(f"   {s['name']:24s} n {s['numel']:6d}  mean g^2 {s['mean_grad_sq']:.3g}  mean curv "
                  f"{s['mean_curv']:.3g}  r {s['r'] if s['r'] is None else round(s['r'] / (G / T), 3)}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(f"{args.out}-seed{args.seed}.json", "w") as fh:
        json.dump(dict(command=" ".join(["python"] + sys.argv), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
