"""Curvature rules for scalar-only ZO on diagonal quadratics, redone with seeds, bracketed grids and oracles (issue 15).

f(x) = 1/2 sum_j a_j x_j^2, target f <= 1% of f(x_0). On a quadratic the central difference is exact, so every run
uses the closed forms of the scalars a client would send for a direction z:
    c = g^T z  (g = A x),        Delta = (f(x + mu z) + f(x - mu z) - 2 f(x)) / (2 mu^2) = 1/2 z^T A z.
Directions: u ~ N(0, I) from ``torch.randn`` (one generator per seed, shared by all learning rates of that seed:
common random numbers); this study is about rules, not about the generator.

Spectra (d = 1,000 or 10,000; coordinates in random order for the first two, so tensor blocks carry no structure):
  * lowrank:    10 coordinates at 10^3, the rest at 1               (x_0 ~ N(0, I))
  * loguniform: a_j = exp(U(0, ln 10^3)), condition number 10^3      (x_0 ~ N(0, I))
  * blocks:     "layers" of fractions 2 / 48 / 46 / 3 / 1 % of d with mean curvatures 3 / 1 / 8 / 200 / 30 and a
                log-uniform spread of 10x inside each block; x_0,j ~ N(0, 1 / scale_t), so that, as measured on the
                Fashion-MNIST CNN (layer_stats.py), mean g^2 is proportional to mean curvature per block and the
                per-block ratios r_t = ||g_t||^2 / tr(A_t) start equal.
  Block layout for block rules: the spectrum's blocks ("blocks"), else 8 equal contiguous blocks.

Methods (P directions per step; H_0 = 1 unless "hinit"; "lr" is in each method's own units):
  zosgd          x <- x - lr/P sum_p c_p u_p                                      (DeComFL / MeZO)
  gsq            z = u / sqrt(H); x <- x - lr/P sum c_p z_p; g = 1/P sum c_p u_p / sqrt(H_old);
                 H <- max(beta H + (1-beta) g^2, 1e-8), beta = 0.95                 (the authors' HiSo)
  scalar         gsq with one H: H <- beta H + (1-beta) mean_j g_j^2                 (the issue's ablation)
  stein          H <- max(beta H + (1-beta) H sum_p (Delta_p / P)(u_p^2 - 1), h_min) (hiso's rule; the repo study's
                 settings scaled with d: beta = 1 - 0.1/d, h_min = 1, lr warm-up over d/2 steps)
  stein-block    per block t: h_t <- max(beta h_t + (1-beta) v_t, 0.1 hbar), v_t = h_t sum_p (Delta_p/P)
                 (||u_p,t||^2 - n_t) / n_t (the per-coordinate Stein estimate averaged over the block), beta 0.999,
                 hbar the size-weighted mean of h (with a floor of 1e-8 mean(h) it diverged at once: one sample's
                 relative noise is about d / sqrt(2 n_t))
  stein-scalar   one h: v = h (2/d) (1/P) sum_p Delta_p (E = tr(A)/d), beta 0.99      (ablation of stein-block)
  *-hinit        the first update of H uses beta = 0 (H initialised from the first round's scalars)
  absdelta       the library's absdelta-lagged (its absdelta until 2026-12-02; h_init first-round): probe u,
                 x <- x - lr/(P h) sum c_p u_p with the h of before the step (h = 1 in the first step), then
                 h <- beta h + (1-beta) 2 mean_p |Delta_p| / d, beta 0.9 (0 on the first update). On a positive
                 definite quadratic |Delta| = Delta
  absdelta-cf    the library's absdelta (curvature first): h is updated from the step's own Delta_p before the
                 step (every replica can: the step's record carries them), so the first step is already lr / h-scaled
  bcd            block-coordinate directions: direction p perturbs only block t_p (u_p restricted to t_p), t_p drawn
                 from pi (prop. to n_t) with a uniform derived from (seed, p); z_p = u_p,t / sqrt(h_t);
                 x <- x - lr sum_p c_p z_p / (n_t + 2)   (lr = 1 is the exact optimum on an isotropic block);
                 h_t <- beta h_t + (1-beta) max(h_t 2 Delta_p / n_t, 0) for the sampled block (E = mean a on t;
                 relative noise ~ sqrt(2 / n_t)), beta 0.9, first sample: beta = 0; unsampled blocks use the pooled h
  bcd-scalar     bcd with one pooled h for all blocks (ablation)
  bcd-adapt      bcd with pi_t = (1-eps) rhat_t / sum rhat + eps n_t / d, rhat_t = EMA_0.5 of c_p^2 / (n_t + 2)
                 on block t (estimates r_t = ||g_t||^2 / tr A_t when h_t ~ mean a_t), eps = 0.2
  bcd-adapt-scalar  bcd-adapt with one pooled h (ablation)
  oracle-diag    z = u / sqrt(a) (the exact diagonal Newton preconditioner), full directions
  oracle-block   z = u / sqrt(abar_t) (exact per-block mean curvature), full directions
  oracle-bcd     block-coordinate with exact abar_t and pi_t prop. to the exact r_t = ||g_t||^2 / tr(A_t)

Protocol: for each (spectrum, method) the three seeds run on a learning-rate grid (8 lrs a factor 2 apart around a
method-specific guess) that is extended by 4 more lrs beyond an edge until the lr with the lowest median
steps-to-target has a worse (or failed) neighbour on both sides, and refined with factor-2 midpoints where coarser. A
run that has not reached the target by 3x the best median known so far (or
by --max-steps) is censored (counts as a failure at that lr). One JSON per (spectrum, d, method, seed, lr) in
results/quadratic/; ``--summary`` writes the table.

    python benchmarks/curvature/quadratic.py --d 1000 --spectra lowrank loguniform blocks --methods all
    python benchmarks/curvature/quadratic.py --d 1000 --summary
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "quadratic")
SEEDS = (0, 1, 2)

METHODS = ["zosgd", "gsq", "scalar", "gsq-hinit", "scalar-hinit", "stein", "stein-block", "stein-block-hinit",
           "stein-scalar", "stein-scalar-hinit", "bcd", "bcd-scalar", "bcd-adapt", "bcd-adapt-scalar",
           "oracle-diag", "oracle-block", "oracle-bcd", "absdelta", "absdelta-cf"]


# ---------------------------------------------------------------------------------------------------- problems
def problem(kind: str, d: int, seed: int):
    """(a, x0, block id per coordinate, block sizes) for a spectrum; the spectrum is fixed (seed 12345), x_0 depends
    on the run's seed."""
    g = torch.Generator().manual_seed(12345)
    if kind == "lowrank":
        a = torch.ones(d, dtype=torch.float64)
        a[torch.randperm(d, generator=g)[:10]] = 1e3
        scale_x = torch.ones(d, dtype=torch.float64)
        block = torch.arange(d) * 8 // d
    elif kind == "loguniform":
        a = torch.exp(torch.rand(d, generator=g, dtype=torch.float64) * math.log(1e3))
        scale_x = torch.ones(d, dtype=torch.float64)
        block = torch.arange(d) * 8 // d
    elif kind == "blocks":
        fracs = [0.02, 0.48, 0.46, 0.03, 0.01]
        scales = [3.0, 1.0, 8.0, 200.0, 30.0]
        sizes = [round(f * d) for f in fracs]
        sizes[1] += d - sum(sizes)
        block = torch.cat([torch.full((n,), t) for t, n in enumerate(sizes)])
        sc = torch.tensor(scales, dtype=torch.float64)[block]
        a = sc * 10 ** (torch.rand(d, generator=g, dtype=torch.float64) - 0.5)
        scale_x = 1 / sc.sqrt()
    else:
        raise ValueError(kind)
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(1000 + seed), dtype=torch.float64) * scale_x
    nb = int(block.max()) + 1
    sizes = torch.bincount(block, minlength=nb).to(torch.float64)
    return a, x0, block, sizes


# ---------------------------------------------------------------------------------------------------- one batch
def run_batch(kind: str, d: int, method: str, seeds, lrs, P: int, max_steps: int, cutoff: dict):
    """Run every (seed, lr) of the batch; returns {(seed, lr): result dict}. cutoff[seed]: censoring step."""
    S, L = len(seeds), len(lrs)
    probs = [problem(kind, d, s) for s in seeds]
    a = probs[0][0].float()
    block = probs[0][2]
    sizes = probs[0][3].float()
    nb = len(sizes)
    onehot = torch.nn.functional.one_hot(block, nb).float()  # [d, nb]
    abar = (onehot * a[:, None]).sum(0) / sizes  # exact mean curvature per block
    x = torch.stack([p[1].float() for p in probs])[:, None, :].repeat(1, L, 1)  # [S, L, d]
    f0 = (0.5 * (a.double() * x[:, 0].double() ** 2).sum(-1))  # [S]
    lr = torch.tensor(lrs, dtype=torch.float32)[None, :, None]  # [1, L, 1]
    gens = [torch.Generator().manual_seed(7919 * s + 17) for s in seeds]
    bgens = [torch.Generator().manual_seed(7919 * s + 29) for s in seeds]
    hinit = method.endswith("-hinit")
    base = method[:-6] if hinit else method
    first = torch.ones(S, L, 1, dtype=torch.bool)
    # state
    if base in ("gsq", "stein"):
        H = torch.ones(S, L, d)
    elif base in ("scalar", "stein-scalar", "absdelta", "absdelta-cf"):
        H = torch.ones(S, L, 1)
    elif base == "stein-block":
        H = torch.ones(S, L, nb)
    elif base.startswith("bcd"):
        hb = torch.ones(S, L, nb)
        hglob = torch.ones(S, L, 1)
        seen = torch.zeros(S, L, nb, dtype=torch.bool)
        gseen = torch.zeros(S, L, 1, dtype=torch.bool)
        rhat = torch.zeros(S, L, nb)
        rseen = torch.zeros(S, L, nb, dtype=torch.bool)
    hit = torch.full((S, L), -1, dtype=torch.long)
    dead = torch.zeros(S, L, dtype=torch.bool)
    cut = torch.tensor([cutoff.get(s, max_steps) for s in seeds])[:, None].expand(S, L).clone()
    censored = torch.zeros(S, L, dtype=torch.bool)
    beta_stein = 1 - 0.1 / d
    warm = d // 2
    t = 0
    check = 10
    while t < max_steps:
        active = (hit < 0) & ~dead & ~censored
        if not bool(active.any()):
            break
        u = torch.stack([torch.randn(P, d, generator=gg) for gg in gens])[:, None]  # [S, 1, P, d]
        g = a * x  # [S, L, d]
        if base in ("zosgd", "absdelta", "absdelta-cf"):
            z = u.expand(S, L, P, d)
        elif base in ("gsq", "scalar", "stein", "stein-block", "stein-scalar"):
            Hd = H if H.shape[-1] == d else (H.expand(S, L, d) if H.shape[-1] == 1 else H[..., block])
            sc = Hd.rsqrt()
            z = u * sc[:, :, None, :]
        elif base == "oracle-diag":
            z = u * a.rsqrt()
        elif base == "oracle-block":
            z = u * abar[block].rsqrt()
        else:  # block-coordinate families
            if base in ("bcd", "bcd-scalar"):
                pi = (sizes / d).expand(S, L, nb)
            elif base == "oracle-bcd":
                G = torch.einsum("sld,db->slb", g * g, onehot)
                T = (abar * sizes)
                r = G / T
                pi = r / r.sum(-1, keepdim=True)
            else:  # adaptive
                rr = torch.where(rseen, rhat, rhat.amax(-1, keepdim=True).where(rseen.any(-1, keepdim=True),
                                                                               torch.ones_like(rhat)))
                pi = 0.8 * rr / rr.sum(-1, keepdim=True) + 0.2 * sizes / d
            uni = torch.stack([torch.rand(P, generator=gg) for gg in bgens])[:, None, :]  # [S, 1, P]
            cdf = pi.cumsum(-1)  # [S, L, nb]
            tb = torch.searchsorted(cdf.contiguous(), uni.expand(S, L, P).contiguous()).clamp_max(nb - 1)  # [S,L,P]
            if base == "oracle-bcd":
                hsel = abar[tb]
            elif base.endswith("scalar"):
                hsel = hglob.expand(S, L, P)
            else:
                hcur = torch.where(seen, hb, hglob.expand(S, L, nb))
                hsel = torch.gather(hcur, 2, tb)
            mask = (block[None, None, None, :] == tb[..., None]).float()  # [S, L, P, d]
            z = u * mask * hsel.rsqrt()[..., None]
            n_t = sizes[tb]  # [S, L, P]
        c = torch.einsum("sld,slpd->slp", g, z)
        delta = 0.5 * torch.einsum("d,slpd->slp", a, z * z)
        if base.startswith("absdelta"):  # one h from |second differences| (h_init first-round: beta 0 once)
            est = (2.0 / d) * (delta.abs() / P).sum(-1, keepdim=True)
            beta = torch.where(first, 0.0, 0.9)
            h_new = (beta * H + (1 - beta) * est).clamp_min(1e-8)
            if base == "absdelta-cf":
                H = h_new  # curvature first: this step already divides by its own measurement
        # ----- x update
        if base.startswith("bcd") or base == "oracle-bcd":
            coef = lr * c / (n_t + 2)
        elif base.startswith("absdelta"):
            coef = lr * c / (P * H)
        else:
            coef = lr * c / P
            if base == "stein":
                coef = coef * min(1.0, (t + 1) / warm)
        step = torch.einsum("slp,slpd->sld", coef, z)
        x = torch.where(active[..., None], x - step, x)
        # ----- curvature update (with the H of before the step in the scalars, as in HiSo)
        b1 = torch.where(first, 0.0, 1.0) if hinit else 1.0  # multiplies (beta) on the first update when hinit
        if base == "gsq":
            gh = torch.einsum("slp,slpd->sld", c / P, u.expand(S, L, P, d)) * H.rsqrt()
            beta = 0.95 * b1
            H = (beta * H + (1 - beta) * gh * gh).clamp_min(1e-8)
        elif base == "scalar":
            gh = torch.einsum("slp,slpd->sld", c / P, u.expand(S, L, P, d)) * H.rsqrt()
            beta = 0.95 * b1
            H = (beta * H + (1 - beta) * (gh * gh).mean(-1, keepdim=True)).clamp_min(1e-8)
        elif base == "stein":
            v = H * torch.einsum("slp,slpd->sld", delta / P, (u * u - 1).expand(S, L, P, d))
            H = (beta_stein * H + (1 - beta_stein) * v).clamp_min(1.0)
        elif base == "stein-block":
            usq = torch.einsum("spd,db->spb", (u[:, 0] ** 2), onehot)  # [S, P, nb]
            est = torch.einsum("slp,spb->slb", delta / P, (usq - sizes) / sizes)
            beta = 0.999 * b1
            H = (beta * H + (1 - beta) * H * est)
            hm = (H * sizes).sum(-1, keepdim=True) / d
            H = torch.maximum(H, 0.1 * hm.clamp_min(1e-12))
        elif base == "absdelta":
            H = h_new  # after the step, as the library
        elif base == "stein-scalar":
            est = (2.0 / d) * (delta / P).sum(-1, keepdim=True)
            beta = 0.99 * b1
            H = beta * H + (1 - beta) * H * est
        elif base.startswith("bcd"):
            est = (hsel * 2 * delta / n_t).clamp_min(0)  # [S, L, P] estimate of mean a on the block
            # pooled estimate (size weighted over the round's directions)
            pooled = (est * n_t).sum(-1, keepdim=True) / n_t.sum(-1, keepdim=True)
            bg = torch.where(gseen, 0.9, 0.0)
            hglob = bg * hglob + (1 - bg) * pooled
            gseen = torch.ones_like(gseen)
            if not base.endswith("scalar"):
                for p in range(P):
                    idx = tb[..., p:p + 1]
                    old = torch.gather(hb, 2, idx)
                    s_old = torch.gather(seen, 2, idx)
                    new = torch.where(s_old, 0.9 * old + 0.1 * est[..., p:p + 1], est[..., p:p + 1])
                    hb = hb.scatter(2, idx, new)
                    seen = seen.scatter(2, idx, torch.ones_like(s_old))
                hb = torch.maximum(hb, 1e-2 * hglob)
            if "adapt" in base:
                rs = c * c / (n_t + 2)
                for p in range(P):
                    idx = tb[..., p:p + 1]
                    old = torch.gather(rhat, 2, idx)
                    s_old = torch.gather(rseen, 2, idx)
                    new = torch.where(s_old, 0.5 * old + 0.5 * rs[..., p:p + 1], rs[..., p:p + 1])
                    rhat = rhat.scatter(2, idx, new)
                    rseen = rseen.scatter(2, idx, torch.ones_like(s_old))
        first = torch.zeros_like(first)
        t += 1
        if t % check == 0 or t == max_steps:
            f = 0.5 * (a.double() * x.double() ** 2).sum(-1)  # [S, L]
            bad = ~torch.isfinite(f) | (f > 1e4 * f0[:, None])
            dead |= bad & (hit < 0)
            newhit = (f <= 0.01 * f0[:, None]) & (hit < 0) & ~dead
            hit = torch.where(newhit, torch.full_like(hit, t), hit)
            # within the batch too: once an lr of a seed has hit at step T, the others stop at 3 T (censored)
            hmin = torch.where(hit >= 0, hit, torch.full_like(hit, 1 << 40)).amin(1, keepdim=True)
            cut = torch.minimum(cut, (3 * hmin).expand(S, L))
            censored |= (hit < 0) & ~dead & (t >= cut)
    out = {}
    for i, s in enumerate(seeds):
        for j, lr_ in enumerate(lrs):
            out[(s, lr_)] = dict(steps=int(hit[i, j]) if hit[i, j] >= 0 else None, diverged=bool(dead[i, j]),
                               censored_at=(t if hit[i, j] < 0 and not dead[i, j] else None))
    return out


# ---------------------------------------------------------------------------------------------------- protocol
def fname(kind, d, method, seed, lr, P):
    return os.path.join(OUT, f"{kind}-d{d}-P{P}", method, f"seed{seed}-lr{lr:.6g}.json")


def load(kind, d, method, P):
    res = {}
    folder = os.path.join(OUT, f"{kind}-d{d}-P{P}", method)
    if not os.path.isdir(folder):
        return res
    for fn in os.listdir(folder):
        with open(os.path.join(folder, fn)) as fh:
            r = json.load(fh)
        res[(r["seed"], r["lr"])] = r
    return res


def lr_start(kind, d, method, P):
    a, _, _, _ = problem(kind, d, 0)
    if method.startswith("bcd") or method == "oracle-bcd":
        return 1.0
    if method.startswith("oracle") or method.startswith("stein") or method.startswith("absdelta"):
        return P / d
    return P / float(a.sum())


def score(v):
    return v["steps"] if v["steps"] is not None else math.inf


def med_by_lr(res, seeds):
    by = {}
    for (s, lr_), v in res.items():
        by.setdefault(lr_, {})[s] = v
    meds = {}
    for lr_, m in by.items():
        if all(s in m for s in seeds):
            meds[lr_] = statistics.median(score(m[s]) for s in seeds)
    return meds


def next_lrs(meds, lr0):
    """The lrs to run next, or [] when the best is bracketed: a first batch of 8 lrs a factor 2 apart, then 4 more
    beyond an edge where the best lies, then the factor-2 midpoints around the best where the grid is coarser."""
    if not meds:
        return [lr0 * 2.0 ** k for k in range(-4, 4)]
    lrs = sorted(meds)
    vals = [meds[lr_] for lr_ in lrs]
    if all(math.isinf(v) for v in vals):
        # nothing reached the target: widen both ways (up to a limit)
        if len(lrs) >= 24:
            return []
        return [lrs[0] / 2 ** k for k in (1, 2, 3, 4)] + [lrs[-1] * 2 ** k for k in (1, 2, 3, 4)]
    i = min(range(len(lrs)), key=lambda k: (vals[k], -lrs[k]))
    if i == 0 and len(lrs) < 24:
        return [lrs[0] / 2 ** k for k in (1, 2, 3, 4)]
    if i == len(lrs) - 1 and len(lrs) < 24:
        return [lrs[-1] * 2 ** k for k in (1, 2, 3, 4)]
    out = []
    for nb in (lrs[i - 1] if i > 0 else None, lrs[i + 1] if i + 1 < len(lrs) else None):
        if nb is not None and max(nb, lrs[i]) / min(nb, lrs[i]) > 2.01:
            mid = math.sqrt(nb * lrs[i])
            if not any(abs(mid / lr_ - 1) < 1e-6 for lr_ in lrs):
                out.append(mid)
    return out


def study(kind, d, method, P, max_steps, seeds=SEEDS, log=print):
    while True:
        res = load(kind, d, method, P)
        meds = med_by_lr(res, seeds)
        todo = next_lrs(meds, lr_start(kind, d, method, P))
        todo = [round_lr(lr_) for lr_ in todo]
        todo = [lr_ for lr_ in todo if lr_ not in meds]
        if not todo:
            return res
        finite = [v for v in meds.values() if math.isfinite(v)]
        cutoff = {s: min(max_steps, int(3 * min(finite))) if finite else max_steps for s in seeds}
        t0 = time.time()
        out = run_batch(kind, d, method, list(seeds), todo, P, max_steps, cutoff)
        for (s, lr_), v in out.items():
            path = fname(kind, d, method, s, lr_, P)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            rec = dict(spectrum=kind, d=d, method=method, seed=s, lr=lr_, P=P, max_steps=max_steps,
                       cutoff=cutoff[s], **v)
            with open(path, "w") as fh:
                json.dump(rec, fh)
        log(f"{kind} d={d} {method}: lrs {[f'{lr_:.3g}' for lr_ in todo]} -> "
            f"{[out[(s, lr_)]['steps'] for lr_ in todo for s in seeds]} ({time.time() - t0:.0f} s)")


def round_lr(lr_):
    return float(f"{lr_:.6g}")


# ---------------------------------------------------------------------------------------------------- summary
def summarize(d, P, kinds, methods):
    lines = [f"# Quadratic study, d = {d}, P = {P}: median steps to 1% of f(x_0) over seeds {list(SEEDS)}", "",
             "Each method at the lr with the lowest median (bracketed: both neighbours worse or failed); spread = "
             "min-max over the seeds at that lr; speed-up = ZO-SGD median / method median.", ""]
    table = {}
    for kind in kinds:
        lines += [f"## {kind}", "", "| method | best lr | median steps | spread (min-max) | speed-up vs ZO-SGD | "
                  "interior | lrs tried |", "|---|---|---|---|---|---|---|"]
        base_med = None
        for method in methods:
            res = load(kind, d, method, P)
            meds = med_by_lr(res, SEEDS)
            if not meds:
                continue
            lrs = sorted(meds)
            i = min(range(len(lrs)), key=lambda k: (meds[lrs[k]], -lrs[k]))
            best = lrs[i]
            interior = 0 < i < len(lrs) - 1 or (i == len(lrs) - 1 and False)
            vals = [score(res[(s, best)]) for s in SEEDS]
            med = meds[best]
            if method == "zosgd":
                base_med = med
            sp = f"{min(vals):.0f}-{max(vals):.0f}" if all(math.isfinite(v) for v in vals) else \
                f"{min(vals):.0f}-not reached"
            speed = (base_med / med) if (base_med and math.isfinite(med)) else None
            table[(kind, method)] = dict(lr=best, median=med, values=vals, speedup=speed, interior=interior)
            lines.append(f"| {method} | {best:.3g} | {med:.0f} | {sp} | "
                         f"{'-' if speed is None else f'{speed:.2f}x'} | {'yes' if interior else 'NO'} | "
                         f"{len(lrs)} |")
        lines.append("")
    return "\n".join(lines), table


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=1000)
    ap.add_argument("--P", type=int, default=1)
    ap.add_argument("--spectra", nargs="+", default=["lowrank", "loguniform", "blocks"])
    ap.add_argument("--methods", nargs="+", default=["all"])
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--summary", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    methods = METHODS if args.methods == ["all"] else args.methods
    if args.summary:
        text, _table = summarize(args.d, args.P, args.spectra, methods)
        path = os.path.join(OUT, f"summary-d{args.d}-P{args.P}.md")
        with open(path, "w") as fh:
            fh.write(text + "\n")
        print(text)
        return 0
    max_steps = args.max_steps or 400 * args.d
    for kind in args.spectra:
        for method in methods:
            study(kind, args.d, method, args.P, max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
