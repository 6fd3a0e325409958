"""Fashion-MNIST lab for scalar-only curvature rules (issue 15): SmallCNN, 10 IID clients, 3 per round, K = 1, P = 5.

**Simulation.** With K = 1 and mean aggregation, a federated round is one centralised ZO step on the three sampled
clients' batches: the aggregated scalar of direction p is the mean of the clients' scalars, and a finite difference is
linear in the losses, so c_p = (mean_k f_k(x + mu z_p) - mean_k f_k(x - mu z_p)) / (2 mu) (equal up to float
rounding). The lab therefore evaluates, per direction, the mean of the three clients' mean losses in one forward pass
over their concatenated batches. Data subset, IID partition, client streams (``BatchStream``), client sampling
(``random.Random(seed).sample``, sorted) and round seeds (``spec.derive_seed(seed, round, 0)``) are those of
``hiso.fl.simulation`` with the same seed, and perturbations and updates run through the library's kernels
(``hk.perturb_``, ``hk.zo_update_``, ``hk.hiso_round_``), so directions are the library's: a tensor or block is
perturbed with its global offset, which draws exactly the full vector's directions restricted to it.

**Differences.** central: f(x +- mu z) (2P forward passes per client and round; curvature rules add f(x): 2P + 1);
forward: (f(x + mu z) - f(x)) / mu (P + 1), as in the authors' HiSo / DeComFL code.

**Rules** (c_p directional scalars, Delta_p = (f+ + f- - 2 f0) / (2 mu^2) second differences, both aggregated):
  decomfl          x <- x - lr/P sum_p c_p u_p
  gsq              the library's HiSo round (hiso_round_, rule gsq, beta 0.95, H_0 = 1, h_min 1e-8): probe
                   z = u / sqrt(H), x <- x - lr/P sum c_p z_p, H <- beta H + (1-beta) (1/P sum c_p u_p / sqrt(H))^2
  scalar           gsq with one scalar H: H <- beta H + (1-beta) mean_j g_j^2, computed exactly from the Gram matrix
                   of the P directions: mean_j g_j^2 = c^T G c / (P^2 H d), G_pq = <u_p, u_q>
  stein            the library's per-coordinate rule (hiso_round_, rule stein), beta 0.999, h_min 1e-2, H_0 = 1
  stein-tensor     per tensor t a scalar h_t; probe z = s * u with s_t = sqrt(hbar / h_t), hbar = sum_t n_t h_t / d,
                   fixed mu; x_t <- x_t - lr/(P hbar) sum_p c_p s_t u_p,t;  h_t <- max(beta h_t + (1-beta) v_t,
                   0.1 hbar), v_t = (1/P) sum_p Delta_p (||u_p,t||^2 - n_t) / (n_t s_t^2) (Stein estimate of the
                   tensor's mean curvature), beta 0.99; h_t := 2 mean_p Delta_p / d for all t after round 1 (hinit)
  stein-scalar     one h: probe u with fixed mu; x <- x - lr/(P h) sum c_p u_p; h <- beta h + (1-beta) max(v, 0),
                   v = 2 mean_p Delta_p / d (E = tr(A)/d, the mean curvature), beta 0.9; "-hinit": the first update
                   uses beta = 0 (else h_0 = 1)
  absdelta-cf      absdelta with the curvature first: h is updated from the round's own |Delta_p| before the step
                   (the library's absdelta since 2026-12-02; absdelta here is the library's absdelta-lagged)
  absdelta-cf0     absdelta with the curvature first in round 0 only (h initialised before the first step)
  absdelta         stein-scalar-hinit with v = 2 mean_p |Delta_p| / d (HiZOO's |second difference|, made one global
                   scalar): positive where the Hessian is indefinite (at initialisation the mean of five Delta_p is
                   negative in some rounds, which sends stein-scalar-hinit's h to its floor and diverges)
  bcd              block-coordinate directions. Blocks: layers (weight + bias: contiguous global ranges) or tensors.
                   Direction p perturbs only block t_p = F^{-1}_pi(U_p), U_p = derive_seed(seed, p, 0xB10C) / 2^63,
                   pi_t = n_t / d: the kernels perturb the block's tensors with its global offset, so u_p,t is the
                   full direction restricted to t. Curvature first: v_p = max(2 Delta_p / n_t, 0) (E = tr(A_t)/n_t,
                   relative noise ~ sqrt(2/n_t)); h_t <- v_p at its first sample, then 0.9 h_t + 0.1 v_p; pooled
                   hg (size-weighted mean of the round's v_p, same EMA) stands in for blocks never sampled;
                   h_t >= 0.01 hg. Then x_t <- x_t - lr c_p u_p,t / (h_t (n_t + 2)) for each p (lr = 1: the exact
                   line minimiser on an isotropic quadratic block).
  bcd-scalar       bcd with the pooled hg for every block (the ablation: same update, one global H)
  bcd-adapt        bcd with pi_t = 0.8 rhat_t / sum rhat + 0.2 n_t / d, rhat_t = EMA_0.5 of c_p^2 / (h_t (n_t + 2))
                   on block t (estimates r_t = ||g_t||^2 / tr(A_t)); never-sampled blocks take max rhat
  bcd-adapt-scalar bcd-adapt with one pooled h
Reduced-dimension direction families (the issue's "direction family that lowers the effective dimension"; each is
regenerated from the round seed, the round index and the shared parameters, so it stays scalar-only). Only the
matrices (weights, conv kernels as out x in*k*k) change family; vectors (biases) keep the full u restricted to them.
  sparse           Sparse-MeZO (Liu et al., arXiv 2402.15751): z_p = m * u_p with the mask m = [|x_j| <= q_t], q_t
                   the (1 - s)-quantile of |x| in tensor t at the start of the round (s = --sparsity, default 0.75:
                   perturb the 25% smallest-magnitude weights of every matrix); DeComFL's update
                   x <- x - lr/P sum c_p z_p. Every replica holds the same x, so it recomputes the mask; nothing
                   else is sent.
  lozo             LOZO (Chen et al., arXiv 2410.07698): per matrix W (m x n), z_p = U_p V^T / sqrt(r) with
                   U_p ~ N(0, I_{m x r}) fresh per (round, p) and V ~ N(0, I_{n x r}) redrawn every nu rounds
                   ("lazy sampling": the updates of a window share V's row space); r = --lozo-rank (2), nu = --lozo-nu
                   (50), as in the paper's defaults; / sqrt(r) keeps E||z||^2 = d. U and V come from torch.Generator
                   seeded with derive_seed(round seed, p, tensor) and derive_seed(run seed, round // nu, tensor).
                   DeComFL's update with these z_p.
  absdelta-sparse, absdelta-lozo  absdelta's step (lr / h, h from 2 mean |Delta_p| / d) with those directions.
Schedule controls (what would explain absdelta's adaptive lr / h away):
  decomfl-sched    DeComFL with absdelta's measured lr / h_t as a fixed schedule (``absdelta_schedule``), ending at lr
  decomfl-exp<R>   DeComFL with an exponential decay by the factor R over the run, ending at lr:
                   lr_t = lr R^(t / (T - 1) - 1) (starts at lr / R); e.g. decomfl-exp0.1
Bytes per reply (K = 1): 4 P (+ 4 P for the rules that send Delta_p), plus the message header.

**Metrics and protocol** (PREREGISTRATION.md): rounds to T = 0.50 (also 0.45, 0.55), AUC, final accuracy; one JSON
per (method, difference, seed, lr) in results/fmnist/; finished runs are skipped, so a killed study resumes.
``--grid auto`` extends each method's lr grid (factor 2) until the best lr (fewest median rounds to T, then AUC) is
interior. ``--diag`` adds, at the end of the run, per-tensor diagnostics by autograd (true mean g^2 on 2,048 training
images, mean Hessian diagonal by Hutchinson, 16 samples on 512 images) next to the rule's H.

    python benchmarks/curvature/fmnist_lab.py --methods decomfl gsq --seeds 0 --lrs 1e-3 3e-3 1e-2
    python benchmarks/curvature/fmnist_lab.py --methods bcd --seeds 0 1 2 --grid auto --lrs 0.25 0.5 1
    python benchmarks/curvature/fmnist_lab.py --summary
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import hiso_kernels as hk  # noqa: E402
from hiso.fl.simulation import BatchStream, SimulationConfig, build  # noqa: E402
from hiso_kernels import spec  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import claim_stats  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "fmnist")
TARGETS = (0.45, 0.50, 0.55)
T_MAIN = 0.50
METHODS = ("decomfl", "decomfl-sched", "gsq", "scalar", "stein", "stein-tensor", "stein-scalar", "stein-scalar-hinit",
           "absdelta", "absdelta-cf", "absdelta-cf0", "bcd", "bcd-scalar", "bcd-adapt", "bcd-adapt-scalar", "sparse",
           "lozo", "absdelta-sparse", "absdelta-lozo")
CURV = {"stein", "stein-tensor", "stein-scalar", "stein-scalar-hinit", "absdelta", "absdelta-cf", "absdelta-cf0", "bcd",
        "bcd-scalar", "bcd-adapt", "bcd-adapt-scalar", "absdelta-sparse", "absdelta-lozo"}  # need f(x), send Delta_p
FAMILIES = {"sparse": "sparse", "lozo": "lozo", "absdelta-sparse": "sparse", "absdelta-lozo": "lozo"}
SCALAR_H = {"scalar", "stein-scalar", "stein-scalar-hinit", "absdelta", "absdelta-cf", "absdelta-cf0",
            "absdelta-sparse", "absdelta-lozo"}  # methods whose curvature state is one global h (in the history)


def exp_ratio(method: str) -> float | None:
    """R of a ``decomfl-exp<R>`` method (0 < R <= 1), else None."""
    if not method.startswith("decomfl-exp"):
        return None
    try:
        r = float(method[len("decomfl-exp"):])
    except ValueError:
        r = math.nan
    if not 0.0 < r <= 1.0:  # also NaN
        raise ValueError(f"bad schedule method {method!r}: expected decomfl-exp<R>, 0 < R <= 1")
    return r


def schedule_for(method: str, rounds: int) -> list[float] | None:
    """Per-round lr multipliers of the schedule controls (ending at 1), None for a constant lr."""
    if method == "decomfl-sched":
        return absdelta_schedule(rounds)
    r = exp_ratio(method)
    if r is None:
        return None
    return [r ** (t / max(rounds - 1, 1) - 1.0) for t in range(rounds)]


def absdelta_schedule(rounds: int, lr: float = 1e-4) -> list[float]:
    """The control that would explain absdelta away: its step size lr / h_t is an annealing schedule (high early,
    falling as the curvature magnitude h grows). Returns, per round, absdelta's effective lr (median over the seeds
    it ran at ``lr``, its best lr; h recorded every 10 rounds, held constant in between, the first record also for
    rounds 0-9) divided by the last round's, so that ``decomfl-sched`` at lr L follows absdelta's schedule shape and
    ends at L. A fixed schedule: no curvature, nothing measured during the run."""
    runs = [r for (_, lr_), r in load_runs("absdelta", "central").items() if abs(lr_ - lr) < 1e-12]
    if len(runs) < 3:
        raise SystemExit(f"decomfl-sched needs the absdelta runs at lr {lr:g} (3 seeds) in {OUT}")
    per_run = []
    for r in runs:
        hist = {row["round"]: row["h"] for row in r["state_history"]}
        first = min(hist)
        # the h in force during round t: recorded after rounds 10, 20, ...; the first record also for rounds 0-9
        per_run.append([lr / hist[max(first, (t // 10) * 10)] for t in range(rounds)])
    med = [float(np.median([e[t] for e in per_run])) for t in range(rounds)]
    return [m / med[-1] for m in med]


def central(fp: float, fm: float, f0: float | None, mu: float):
    """(c, Delta or None): the central difference and, given f(x), the second difference."""
    return (fp - fm) / (2 * mu), None if f0 is None else (fp + fm - 2 * f0) / (2 * mu * mu)


def absdelta_h(h: float, ds, P: int, d: int, rnd: int) -> float:
    """absdelta's next h: EMA (beta 0.9; 0 in round 0, h_init first-round) of 2 mean_p |Delta_p| / d, floored."""
    beta = 0.0 if rnd == 0 else 0.9
    v = 2 * sum(abs(x) for x in ds) / (P * d)
    return max(beta * h + (1 - beta) * v, 1e-8)


# ------------------------------------------------------------------------------------------------ direction families
@torch.no_grad()
def sparse_thresholds(params, sparsity):
    """Sparse-MeZO's per-matrix thresholds (arXiv 2402.15751): the round(1 - sparsity) smallest |x| of a matrix
    (dim >= 2) are at or below its threshold; infinity where that selects every entry (every entry moves, also one
    that later grows past it); None for vectors."""
    out = []
    for t in params:
        if t.dim() < 2:
            out.append(None)
            continue
        a = t.detach().abs()
        k = max(1, round((1.0 - sparsity) * a.numel()))
        q = torch.kthvalue(a.flatten(), k).values
        out.append(torch.tensor(math.inf, dtype=t.dtype, device=t.device) if bool((a <= q).all()) else q)
    return out


def masks_below(params, thresholds):
    """1 where |x| <= the tensor's threshold (ties included), None where the threshold is None."""
    return [None if h is None else (t.detach().abs() <= h).to(t.dtype) for t, h in zip(params, thresholds)]


@torch.no_grad()
def sparse_masks(params, sparsity):
    """Sparse-MeZO's masks from the shared parameters: per matrix 1 on the round(1 - sparsity) fraction of smallest
    |x| (ties at the threshold included), None for vectors."""
    return masks_below(params, sparse_thresholds(params, sparsity))


def family_direction(family, params, offsets, seed, run_seed, rnd, p, *, masks=None, rank=2, nu=50):
    """Direction p of round rnd of a reduced-dimension family as per-tensor float32 tensors, regenerated from
    (round seed, p) and (run seed, rnd // nu) -- every replica draws the same. Vectors keep u (the library's
    direction with the tensor's global offset); matrices (conv kernels as out x in*k*k):
      sparse: m * u (``sparse_masks``);
      lozo:   U V^T / sqrt(r), U ~ N(0, I_{m x r}) per (round, p), V ~ N(0, I_{n x r}) per window of nu rounds
              (LOZO's lazy sampling, arXiv 2410.07698); E||z||^2 = m n as for u."""
    if family not in ("sparse", "lozo"):
        raise ValueError(f"unknown direction family {family!r}")
    out = []
    for i, t in enumerate(params):
        u = hk.directions(seed, t.numel(), direction=p, offset=offsets[i]).view_as(t)
        if t.dim() < 2:
            out.append(u)
        elif family == "sparse":
            out.append(u * masks[i])
        else:
            m = t.shape[0]
            n = t.numel() // m
            gu = torch.Generator().manual_seed(spec.derive_seed(seed, p, 0x10205, i))
            gv = torch.Generator().manual_seed(spec.derive_seed(run_seed, rnd // nu, 0x10206, i))
            U = torch.randn(m, rank, generator=gu)
            V = torch.randn(n, rank, generator=gv)
            out.append((U @ V.T / math.sqrt(rank)).view_as(t))
    return out


# ------------------------------------------------------------------------------------------------ the lab
class Lab:
    def __init__(self, seed: int, rounds: int = 300, P: int = 5, mu: float = 1e-3, blocks: str = "layer",
                 sparsity: float = 0.75, lozo_rank: int = 2, lozo_nu: int = 50):
        self.cfg = SimulationConfig(task="fashion_mnist", method="decomfl", rounds=rounds, n_clients=10,
                                    clients_per_round=3, local_steps=1, num_directions=P, mu=mu, batch_size=32,
                                    num_train=10000, num_eval=2000, seed=seed, eval_every=10)
        self.seed, self.rounds, self.P, self.mu = seed, rounds, P, mu
        if not 0.0 <= sparsity < 1.0 or lozo_rank < 1 or lozo_nu < 1:
            raise ValueError("need 0 <= sparsity < 1, lozo_rank >= 1, lozo_nu >= 1")
        self.sparsity, self.lozo_rank, self.lozo_nu = sparsity, lozo_rank, lozo_nu
        setup = build(self.cfg)
        self.task, self.model, self.eval_batches = setup.task, setup.model, setup.eval_batches
        self.streams = [BatchStream(self.task, ex, 32, seed * 1000 + i, "cpu")
                        for i, ex in enumerate(setup.client_data)]
        self.sampler = random.Random(seed)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.offsets = hk.global_offsets(self.params)
        self.sizes = [p.numel() for p in self.params]
        self.d = sum(self.sizes)
        if blocks == "tensor":
            self.blocks = [[i] for i in range(len(self.params))]
        else:  # a layer = its weight and bias, consecutive in the global order
            layers: dict[str, list[int]] = {}
            for i, n in enumerate(self.names):
                layers.setdefault(n.rsplit(".", 1)[0], []).append(i)
            self.blocks = list(layers.values())
        self.block_n = [sum(self.sizes[i] for i in b) for b in self.blocks]

    # ---------------------------------------------------------------- data
    def round_batches(self):
        clients = sorted(self.sampler.sample(range(10), 3))
        return [self.streams[c].next() for c in clients]

    @torch.no_grad()
    def loss_fn(self, batches):
        x = torch.cat([b.x for b in batches])
        y = torch.cat([b.labels for b in batches])
        ce = F.cross_entropy(self.model(x).float(), y, reduction="none").double()
        out, pos = 0.0, 0
        for b in batches:  # mean of the clients' mean losses (= the mean aggregation of their scalars)
            out += float(ce[pos:pos + len(b)].mean())
            pos += len(b)
        return out / len(batches)

    # ---------------------------------------------------------------- perturbations
    def perturb(self, seed, p, alpha, *, hessian=None, scales=None, block=None):
        """x <- x + alpha u_p / sqrt(H) (hessian), or per tensor alpha s_t u_p (scales), or on one block only."""
        if block is not None:
            idx = self.blocks[block]
            hk.perturb_([self.params[i] for i in idx], seed, alpha, direction=p, offset=self.offsets[idx[0]])
        elif scales is not None:
            for i, t in enumerate(self.params):
                hk.perturb_([t], seed, alpha * scales[i], direction=p, offset=self.offsets[i])
        else:
            hk.perturb_(self.params, seed, alpha, direction=p, hessian=hessian, check_hessian=False)

    def probe(self, seed, p, batches, difference, f0, **kw):
        """(c_p, Delta_p or None) along direction p; the parameters come back (paired chain, as the library)."""
        mu = self.mu
        if difference == "forward":
            self.perturb(seed, p, mu, **kw)
            fp = self.loss_fn(batches)
            self.perturb(seed, p, -mu, **kw)
            return (fp - f0) / mu, None
        self.perturb(seed, p, mu, **kw)
        fp = self.loss_fn(batches)
        self.perturb(seed, p, -mu, **kw)
        self.perturb(seed, p, -mu, **kw)
        fm = self.loss_fn(batches)
        self.perturb(seed, p, mu, **kw)
        return central(fp, fm, f0, mu)

    def dirs(self, seed, p):
        return hk.directions(seed, self.d, direction=p).double()

    @torch.no_grad()
    def probe_dirs(self, z, batches, f0):
        """(c, Delta or None) along the materialised direction z; the parameters are restored exactly."""
        mu = self.mu
        x0 = [t.detach().clone() for t in self.params]
        for t, x, zt in zip(self.params, x0, z):
            t.copy_(x).add_(zt, alpha=mu)
        fp = self.loss_fn(batches)
        for t, x, zt in zip(self.params, x0, z):
            t.copy_(x).add_(zt, alpha=-mu)
        fm = self.loss_fn(batches)
        for t, x in zip(self.params, x0):
            t.copy_(x)
        return central(fp, fm, f0, mu)

    # ---------------------------------------------------------------- one run
    def run(self, method, lr, difference="central", diag=False, log_every=10):
        P, d = self.P, self.d
        if method not in METHODS and exp_ratio(method) is None:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}, decomfl-exp<R>")
        if method in CURV and difference != "central":
            raise ValueError(f"{method} needs central differences and f(x)")
        need_f0 = difference == "forward" or method in CURV
        st = dict(H=None, h=1.0, hb=None, hg=None, rhat=None)
        if method in ("gsq", "stein"):
            st["H"] = [torch.ones_like(t) for t in self.params]
        if method == "stein-tensor":
            st["hb"] = [1.0] * len(self.params)
        if method.startswith("bcd"):
            nb = len(self.blocks)
            st["hb"] = [None] * nb
            st["rhat"] = [None] * nb
        schedule = schedule_for(method, self.rounds)
        curve, hist, diverged, block_counts = [], [], False, None
        if method.startswith("bcd"):
            block_counts = [0] * len(self.blocks)
        t0 = time.time()
        train_losses = []

        def evaluate(rnd):
            res = self.task.evaluate(self.model, self.eval_batches)
            acc = res.accuracy if math.isfinite(res.loss) else 0.10
            curve.append(dict(round=rnd, accuracy=acc, eval_loss=res.loss,
                              train_loss=float(np.mean(train_losses)) if train_losses else None))
            train_losses.clear()

        evaluate(0)
        for rnd in range(self.rounds):
            seed = spec.derive_seed(self.seed, rnd, 0)
            batches = self.round_batches()
            f0 = self.loss_fn(batches) if need_f0 else None
            cs, ds, tb = [], [], []
            try:
                if method == "decomfl" or schedule is not None:
                    for p in range(P):
                        c, dl = self.probe(seed, p, batches, difference, f0)
                        cs.append(c)
                    lr_t = lr * schedule[rnd] if schedule is not None else lr
                    hk.zo_update_(self.params, seed, range(P), [lr_t * c / P for c in cs])
                elif method in FAMILIES:
                    family = FAMILIES[method]
                    masks = sparse_masks(self.params, self.sparsity) if family == "sparse" else None
                    zs = [family_direction(family, self.params, self.offsets, seed, self.seed, rnd, p, masks=masks,
                                           rank=self.lozo_rank, nu=self.lozo_nu) for p in range(P)]
                    for z in zs:
                        c, dl = self.probe_dirs(z, batches, f0 if method in CURV else None)
                        cs.append(c)
                        ds.append(dl)
                    h = st["h"] if method in CURV else 1.0
                    if all(math.isfinite(c) for c in cs):
                        with torch.no_grad():
                            for i, t in enumerate(self.params):
                                t.sub_(sum(zs[p][i] * (lr * cs[p] / (P * h)) for p in range(P)))
                    if method in CURV:
                        st["h"] = absdelta_h(h, ds, P, d, rnd)
                    if masks is not None and rnd == 0:
                        st["mask_fraction"] = sum(float(m.sum()) for m in masks if m is not None) / sum(
                            m.numel() for m in masks if m is not None)
                elif method in ("gsq", "stein"):
                    for p in range(P):
                        c, dl = self.probe(seed, p, batches, difference, f0, hessian=st["H"])
                        cs.append(c)
                        ds.append(dl)
                    if method == "gsq":
                        hk.hiso_round_(self.params, st["H"], seed, range(P), [lr * c / P for c in cs],
                                       [c / P for c in cs], curvature_rule="gsq", beta=0.95, h_min=1e-8,
                                       check_hessian=False)
                    else:
                        hk.hiso_round_(self.params, st["H"], seed, range(P), [lr * c / P for c in cs],
                                       [dl / P for dl in ds], curvature_rule="stein", beta=0.999, h_min=1e-2,
                                       check_hessian=False)
                elif method == "scalar":
                    h = st["h"]
                    for p in range(P):
                        c, _ = self.probe(seed, p, batches, difference, f0, scales=[h ** -0.5] * len(self.params))
                        cs.append(c)
                    s = h ** -0.5
                    hk.zo_update_(self.params, seed, range(P), [lr * c * s / P for c in cs])
                    U = torch.stack([self.dirs(seed, p) for p in range(P)])
                    cv = torch.tensor(cs, dtype=torch.float64)
                    gsq_mean = float(cv @ (U @ U.T) @ cv) / (P * P * h * d)
                    st["h"] = max(0.95 * h + 0.05 * gsq_mean, 1e-8)
                elif method in ("stein-scalar", "stein-scalar-hinit", "absdelta", "absdelta-cf", "absdelta-cf0"):
                    h = st["h"]
                    for p in range(P):
                        c, dl = self.probe(seed, p, batches, difference, f0)
                        cs.append(c)
                        ds.append(dl)
                    if method.startswith("absdelta"):  # |Delta| as in HiZOO's estimator: positive where the Hessian
                        h_new = absdelta_h(h, ds, P, d, rnd)  # is not
                    else:
                        v = max(2 * sum(ds) / (P * d), 0.0)
                        beta = 0.0 if (rnd == 0 and method == "stein-scalar-hinit") else 0.9
                        h_new = max(beta * h + (1 - beta) * v, 1e-8)
                    if method == "absdelta-cf" or (method == "absdelta-cf0" and rnd == 0):
                        h = h_new  # curvature first: this round's step divides by its own measurement
                    hk.zo_update_(self.params, seed, range(P), [lr * c / (P * h) for c in cs])
                    st["h"] = h_new
                elif method == "stein-tensor":
                    hbv = st["hb"]
                    hbar = sum(n * h for n, h in zip(self.sizes, hbv)) / d
                    scales = [math.sqrt(hbar / h) for h in hbv]
                    for p in range(P):
                        c, dl = self.probe(seed, p, batches, difference, f0, scales=scales)
                        cs.append(c)
                        ds.append(dl)
                    for i, t in enumerate(self.params):
                        hk.zo_update_([t], seed, range(P), [lr * c * scales[i] / (P * hbar) for c in cs],
                                      offset=self.offsets[i])
                    if rnd == 0:
                        st["hb"] = [max(2 * sum(ds) / (P * d), 1e-8)] * len(self.params)
                    else:
                        new = []
                        for i in range(len(self.params)):
                            v = 0.0
                            for p in range(P):
                                u = hk.directions(seed, self.sizes[i], direction=p, offset=self.offsets[i]).double()
                                v += ds[p] * (float((u * u).sum()) - self.sizes[i]) / (self.sizes[i] * scales[i] ** 2)
                            v /= P
                            new.append(0.99 * hbv[i] + 0.01 * v)
                        hbar = sum(n * h for n, h in zip(self.sizes, new)) / d
                        st["hb"] = [max(h, 0.1 * hbar, 1e-8) for h in new]
                else:  # block-coordinate families
                    nb = len(self.blocks)
                    adapt = "adapt" in method
                    scalar = method.endswith("scalar")
                    if adapt:
                        seen = [r for r in st["rhat"] if r is not None]
                        fill = max(seen) if seen else 1.0
                        rr = [fill if r is None else r for r in st["rhat"]]
                        tot = sum(rr)
                        pi = [0.8 * r / tot + 0.2 * n / d for r, n in zip(rr, self.block_n)]
                    else:
                        pi = [n / d for n in self.block_n]
                    cdf = np.cumsum(pi)
                    for p in range(P):
                        uval = spec.derive_seed(seed, p, 0xB10C) / float(2 ** 63)
                        b = min(int(np.searchsorted(cdf, uval * cdf[-1], side="right")), nb - 1)
                        tb.append(b)
                        c, dl = self.probe(seed, p, batches, difference, f0, block=b)
                        cs.append(c)
                        ds.append(dl)
                        block_counts[b] += 1
                    # curvature first (every replica can: the record holds c_p, Delta_p and the blocks follow)
                    vs = [max(2 * dl / self.block_n[b], 0.0) for dl, b in zip(ds, tb)]
                    pooled = sum(v * self.block_n[b] for v, b in zip(vs, tb)) / sum(self.block_n[b] for b in tb)
                    st["hg"] = pooled if st["hg"] is None else 0.9 * st["hg"] + 0.1 * pooled
                    st["hg"] = max(st["hg"], 1e-8)
                    for v, b in zip(vs, tb):
                        old = st["hb"][b]
                        st["hb"][b] = v if old is None else 0.9 * old + 0.1 * v
                    st["hb"] = [None if h is None else max(h, 0.01 * st["hg"]) for h in st["hb"]]

                    def hcur(b, scalar=scalar):
                        if scalar or st["hb"][b] is None:
                            return st["hg"]
                        return st["hb"][b]

                    for b in sorted(set(tb)):
                        ps = [p for p in range(P) if tb[p] == b]
                        idx = self.blocks[b]
                        coef = [lr * cs[p] / (hcur(b) * (self.block_n[b] + 2)) for p in ps]
                        hk.zo_update_([self.params[i] for i in idx], seed, ps, coef, offset=self.offsets[idx[0]])
                    if adapt:
                        for p, b in enumerate(tb):
                            r = cs[p] ** 2 / (hcur(b) * (self.block_n[b] + 2))
                            old = st["rhat"][b]
                            st["rhat"][b] = r if old is None else 0.5 * old + 0.5 * r
                fin = all(math.isfinite(c) for c in cs)
            except ValueError:
                fin = False
            train_losses.append(f0 if f0 is not None else float("nan"))
            if not fin or not all(torch.isfinite(t).all() for t in self.params):
                diverged = True
                for r2 in range((rnd // 10 + 1) * 10, self.rounds + 1, 10):
                    curve.append(dict(round=r2, accuracy=0.10, eval_loss=None, train_loss=None))
                break
            if (rnd + 1) % 10 == 0 or rnd + 1 == self.rounds:
                evaluate(rnd + 1)
                hist.append(dict(round=rnd + 1, h=st["h"] if method in SCALAR_H else None,
                                 hb=list(st["hb"]) if st["hb"] is not None else None, hg=st["hg"],
                                 H_mean=[float(H.mean()) for H in st["H"]] if st["H"] is not None else None))
        out = dict(curve=curve, diverged=diverged, seconds=time.time() - t0, state_history=hist,
                   block_counts=block_counts)
        if method in FAMILIES:
            out["family"] = dict(name=FAMILIES[method], sparsity=self.sparsity, lozo_rank=self.lozo_rank,
                                 lozo_nu=self.lozo_nu, mask_fraction=st.get("mask_fraction"))
        if schedule is not None:
            out["schedule_every_10"] = schedule[::10]
        if diag and not diverged:
            out["diagnostics"] = self.diagnostics(st)
        return out

    # ---------------------------------------------------------------- autograd diagnostics (not part of any rule)
    def diagnostics(self, st):
        task = self.task
        big = task.make_batches(task.train_examples, 2048, shuffle=True, seed=99)[0]
        small = task.make_batches(task.train_examples, 512, shuffle=True, seed=98)[0]
        with torch.enable_grad():
            for t in self.params:
                t.requires_grad_(True)
            grads = torch.autograd.grad(task.loss(self.model, big), self.params)
            loss = task.loss(self.model, small)
            g2 = torch.autograd.grad(loss, self.params, create_graph=True)
            gen = torch.Generator().manual_seed(5)
            curv = []
            for t, g in zip(self.params, g2):
                acc = 0.0
                for _ in range(16):
                    v = (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).float()
                    acc += float((torch.autograd.grad(g, t, grad_outputs=v, retain_graph=True)[0] * v).sum())
                curv.append(acc / 16 / t.numel())
        rows = []
        for i, (n, g) in enumerate(zip(self.names, grads)):
            row = dict(name=n, numel=self.sizes[i], true_mean_g2=float((g ** 2).mean()), true_mean_curv=curv[i])
            if st["H"] is not None:
                H = st["H"][i].flatten().double()
                gg = (g.detach() ** 2).flatten().double()
                row.update(H_mean=float(H.mean()), H_cv=float(H.std() / H.mean()) if H.numel() > 1 else 0.0,
                           spearman_H_g2=_spearman(H, gg) if H.numel() > 2 else None)
            rows.append(row)
        out = dict(tensors=rows)
        if st["hb"] is not None:
            out["block_h"] = list(st["hb"])
            out["block_names"] = ([[self.names[i] for i in b] for b in self.blocks] if st["rhat"] is not None
                                  else [[n] for n in self.names])
            out["pooled_h"] = st["hg"]
        return out


def _spearman(a, b):
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


# ------------------------------------------------------------------------------------------------ metrics
def metrics(curve, rounds=300):
    return claim_stats.curve_metrics(curve, rounds, TARGETS)


def path_for(method, difference, seed, lr, tag=""):
    return os.path.join(OUT, f"{method}-{difference}{tag}", f"seed{seed}-lr{lr:.6g}.json")


def load_runs(method, difference, tag=""):
    folder = os.path.join(OUT, f"{method}-{difference}{tag}")
    res = {}
    if os.path.isdir(folder):
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".json"):
                with open(os.path.join(folder, fn)) as fh:
                    r = json.load(fh)
                res[(r["seed"], r["lr"])] = r
    return res


def best_lr(runs, seeds):
    """(best lr, interior?, lrs) over the lrs run at every seed of ``seeds`` (claim_stats.best_lr)."""
    by: dict = {}
    for (s, lr_), v in runs.items():
        if s in seeds:
            by.setdefault(lr_, []).append(v["metrics"])
    return claim_stats.best_lr({lr_: vs for lr_, vs in by.items() if len(vs) == len(seeds)}, T_MAIN)


def run_one(lab_cache, method, difference, seed, lr, args):
    path = path_for(method, difference, seed, lr, args.tag)
    if os.path.exists(path):
        return
    lab = Lab(seed, rounds=args.rounds, P=args.P, mu=args.mu, blocks=args.blocks, sparsity=args.sparsity,
              lozo_rank=args.lozo_rank, lozo_nu=args.lozo_nu)  # fresh model, data, streams
    out = lab.run(method, lr, difference, diag=args.diag)
    rec = dict(method=method, difference=difference, seed=seed, lr=lr, rounds=args.rounds, P=args.P, mu=args.mu,
               blocks=args.blocks, tag=args.tag, metrics=metrics(out["curve"], args.rounds),
               command="python benchmarks/curvature/fmnist_lab.py " + " ".join(sys.argv[1:]), **out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(rec, fh)
    os.replace(path + ".tmp", path)
    m = rec["metrics"]
    print(f"{method:18s} {difference:7s} seed {seed} lr {lr:<8.3g} final {m['final']:.3f} auc {m['auc']:.3f} "
          f"rounds to 0.50 {m['rounds_to']['0.50']}  {'DIVERGED ' if out['diverged'] else ''}({out['seconds']:.0f} s)",
          flush=True)


def summary(tag=""):
    lines = ["# Fashion-MNIST lab: rounds to T = 0.50, AUC, final accuracy (median [min-max] over seeds)", "",
             "Best lr = fewest median rounds to 0.50, then higher median AUC (PREREGISTRATION.md). 'not' = not "
             "reached within the horizon.", "",
             "| method | difference | seeds | best lr | interior | lrs | rounds to 0.50 | rounds to 0.45 | "
             "rounds to 0.55 | AUC | final acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    folders = sorted(os.listdir(OUT)) if os.path.isdir(OUT) else []
    for folder in folders:
        method, difference = folder.rsplit("-", 1) if not tag else folder[:-len(tag)].rsplit("-", 1)
        runs = load_runs(method, difference, tag)
        seeds = sorted({s for s, _ in runs})
        # use the largest seed set covered by at least 3 lrs, else all lrs at their seed
        for sset in ([s for s in seeds if s in (0, 1, 2)], [0]):
            lr, interior, lrs = best_lr(runs, sset)
            if lr is not None:
                break
        if lr is None:
            continue
        vals = [runs[(s, lr)] for s in sset]

        def fmt(xs, digits=None):
            return claim_stats.fmt_spread(xs, digits or 0)

        rt = {T: [v["metrics"]["rounds_to"][T] for v in vals] for T in ("0.50", "0.45", "0.55")}
        lines.append(f"| {method} | {difference} | {len(sset)} | {lr:.3g} | {'yes' if interior else 'NO'} | "
                     f"{', '.join(f'{x:.3g}' for x in lrs)} | {fmt(rt['0.50'])} | {fmt(rt['0.45'])} | "
                     f"{fmt(rt['0.55'])} | {fmt([v['metrics']['auc'] for v in vals], 3)} | "
                     f"{fmt([v['metrics']['final'] for v in vals], 3)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "results", f"fmnist-summary{tag}.md"), "w") as fh:
        fh.write(text)
    print(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["decomfl"])
    ap.add_argument("--difference", nargs="+", default=["central"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--lrs", nargs="+", type=float, default=[])
    ap.add_argument("--grid", choices=["fixed", "auto"], default="fixed")
    ap.add_argument("--max-grid", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--P", type=int, default=5)
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--blocks", choices=["layer", "tensor"], default="layer")
    ap.add_argument("--sparsity", type=float, default=0.75, help="sparse: fraction of each matrix NOT perturbed")
    ap.add_argument("--lozo-rank", type=int, default=2)
    ap.add_argument("--lozo-nu", type=int, default=50, help="lozo: rounds between redraws of V")
    ap.add_argument("--tag", default="", help="suffix of the result folder (other settings than the defaults)")
    ap.add_argument("--diag", action="store_true")
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.summary:
        summary(args.tag)
        return 0
    for method in args.methods:
        for difference in args.difference:
            if method in CURV and difference != "central":
                continue
            lrs = [float(f"{lr_:.6g}") for lr_ in args.lrs]
            for lr in lrs:
                for seed in args.seeds:
                    run_one(None, method, difference, seed, lr, args)
            if args.grid == "auto":
                while True:
                    runs = load_runs(method, difference, args.tag)
                    lr, interior, have = best_lr(runs, args.seeds)
                    if lr is None or interior or len(have) >= args.max_grid:
                        break
                    new = claim_stats.next_lr(lr, have, 2.0)
                    print(f"{method} {difference}: best lr {lr:g} is on the edge of {have}; adding {new:g}", flush=True)
                    for seed in args.seeds:
                        run_one(None, method, difference, seed, new, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
