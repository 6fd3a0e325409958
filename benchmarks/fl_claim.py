"""The claim harness (issue 15): does a scalar-only curvature rule reach DeComFL's accuracy in fewer rounds, robustly?

Each *arm* is a method and a difference scheme: ``decomfl`` (ZO-SGD, DeComFL arXiv 2405.15861) or ``hiso-<rule>``
(HiSo arXiv 2506.02370 with a curvature rule of :mod:`hiso.optim.curvature`: ``hiso-gsq`` is the authors' rule,
``hiso-scalar`` its ablation with one global H, ``hiso-absdelta``, ``hiso-stein``, ``hiso-stein-tensor``), or
``sparse-decomfl`` (DeComFL's step along Sparse-MeZO directions, ``benchmarks/curvature/family_sim.py``), each with
``--differences`` central and/or forward (the authors' HiSo and DeComFL code use forward; rules that need second
differences run central only). Every arm runs at every seed of ``--seeds`` (at least 3) and every lr of its grid;
the grid is extended by ``--factor`` at the edge its best lr sits on until the best lr is interior (``--max-grid``).

Statistics (``benchmarks/curvature/claim_stats.py``, fixed before the runs): rounds to the preregistered
``--target`` accuracy, AUC, final accuracy; the best lr has the fewest median rounds to the target, then the higher
median AUC; median and [min-max] over seeds; the 2x test against DeComFL and the spread test against the scalar
ablation. A diverged run counts as chance accuracy from its divergence on.

Resumable: one JSON per (arm, lr, seed) run under ``--out`` (``runs/<arm>/seed<S>-lr<lr>.json``); finished runs are
skipped, so a killed study continues where it stopped, and a later call with more seeds, arms or lrs reuses what is
there. ``settings.json`` there holds the settings every run shares; a call with other settings exits with code 2.
``--report`` writes ``report.md`` (table, claim tests, conditions, commands) and ``report.png`` (median curve and
min-max band per arm at its best lr) from whatever has finished (arms with missing runs are marked partial).

    python benchmarks/fl_claim.py --out benchmarks/results/claim-fmnist --task fashion_mnist --target 0.5 \\
        --arms decomfl hiso-gsq hiso-scalar hiso-absdelta --differences central forward --seeds 0 1 2 \\
        --lr-grid decomfl=3e-3,5e-3,7e-3 hiso-gsq=3e-3,5e-3,1e-2 hiso-scalar=3e-3,5e-3,1e-2 \\
        hiso-absdelta=5e-5,1e-4,2e-4 --aggregation mean
    python benchmarks/fl_claim.py --out benchmarks/results/claim-fmnist --report
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(HERE, "curvature"))

import claim_stats as cs  # noqa: E402
from family_sim import run_family  # noqa: E402

from hiso.fl.simulation import SimulationConfig, build, run  # noqa: E402
from hiso.optim.curvature import CURVATURE_RULES, SECOND_DIFFERENCE_RULES  # noqa: E402

#: chance accuracy of a task (a diverged run's accuracy from its divergence on)
CHANCE = {"fashion_mnist": 0.10, "sst2": 0.50, "rte": 0.50, "cb": 1 / 3}
#: settings every run of a study shares (written to settings.json; a mismatch exits with code 2)
SHARED = ("task", "model", "data_dir", "target", "rounds", "eval_every", "n_clients", "clients_per_round",
          "local_steps", "num_directions", "mu", "batch_size", "num_train", "num_eval", "split", "aggregation")
#: DeComFL's step along a reduced-dimension direction family (``benchmarks/curvature/family_sim.py``, not kernels)
FAMILY_ARMS = {"sparse-decomfl": "sparse"}
ARMS = ("decomfl", *(f"hiso-{r}" for r in CURVATURE_RULES), *FAMILY_ARMS)


class UsageError(SystemExit):
    def __init__(self, msg: str):
        print(f"fl_claim: {msg}", file=sys.stderr)
        super().__init__(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the study's folder (runs, settings.json, report)")
    p.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    p.add_argument("--arms", nargs="+", default=["decomfl", "hiso-gsq", "hiso-scalar", "hiso-absdelta"])
    p.add_argument("--differences", nargs="+", default=["central"], choices=["central", "forward"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pilot", action="store_true", help="allow fewer than 3 seeds (the report says pilot)")
    p.add_argument("--lrs", nargs="+", type=float, default=[], help="the starting grid of every arm")
    p.add_argument("--lr-grid", nargs="+", default=[], metavar="ARM=LR,LR,...", help="an arm's starting grid")
    p.add_argument("--factor", type=float, default=2.0, help="grid extension factor")
    p.add_argument("--max-grid", type=int, default=7, help="at most this many lrs per arm")
    p.add_argument("--no-extend", action="store_true", help="run the starting grids only")
    p.add_argument("--target", type=float, default=None, help="the preregistered accuracy target")
    p.add_argument("--task", default="fashion_mnist")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--n-clients", type=int, default=10)
    p.add_argument("--clients-per-round", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--num-directions", type=int, default=5)
    p.add_argument("--mu", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-train", type=int, default=10000)
    p.add_argument("--num-eval", type=int, default=2000)
    p.add_argument("--split", default="iid")
    p.add_argument("--aggregation", default="mean", help="mean: the papers' aggregation (hiso's default is robust)")
    p.add_argument("--device", default="cpu", help="where the runs compute (cuda: the GPU study; recorded per run, "
                   "not a shared setting, so CPU and GPU runs stay apart only by their folder)")
    args = p.parse_args(argv)
    for arm in args.arms:
        if arm not in ARMS:
            raise UsageError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    if len(set(args.seeds)) < 3 and not (args.pilot or args.report):
        raise UsageError("a claim needs at least 3 seeds (--pilot for fewer)")
    if args.factor <= 1 or args.max_grid < 3:
        raise UsageError("--factor must be > 1 and --max-grid >= 3")
    args.grids = {}
    for item in args.lr_grid:
        arm, _, values = item.partition("=")
        try:
            args.grids[arm] = sorted({float(f"{float(v):.6g}") for v in values.split(",")})
        except ValueError:
            raise UsageError(f"--lr-grid {item!r}: expected ARM=LR,LR,...") from None
        if arm not in ARMS or not args.grids[arm] or min(args.grids[arm]) <= 0:
            raise UsageError(f"--lr-grid {item!r}: unknown arm or non-positive lr")
    return args


# ------------------------------------------------------------------------------------------------ runs on disk
def arm_name(arm: str, difference: str) -> str:
    return f"{arm}-{difference}"


def valid(arm: str, difference: str) -> bool:
    """Rules with second differences need central differences."""
    return not (arm.startswith("hiso-") and arm[5:] in SECOND_DIFFERENCE_RULES and difference != "central")


def run_path(out: str, arm: str, difference: str, seed: int, lr: float) -> str:
    return os.path.join(out, "runs", arm_name(arm, difference), f"seed{seed}-lr{lr:.6g}.json")


def load_runs(out: str, arm: str, difference: str) -> dict[tuple[int, float], dict]:
    folder = os.path.join(out, "runs", arm_name(arm, difference))
    res = {}
    for fn in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if fn.endswith(".json"):
            with open(os.path.join(folder, fn)) as fh:
                r = json.load(fh)
            res[(r["seed"], r["lr"])] = r
    return res


def check_settings(args) -> dict:
    """The shared settings, written on the first call and compared on every later one."""
    mine = {k: getattr(args, k) for k in SHARED}
    path = os.path.join(args.out, "settings.json")
    if os.path.exists(path):
        with open(path) as fh:
            theirs = json.load(fh)
        if args.report:
            return theirs
        diff = sorted(k for k in SHARED if theirs.get(k) != mine[k])
        if diff:
            raise UsageError(f"{args.out} holds runs with other settings ({', '.join(diff)}); use another --out")
        return theirs
    if args.report:
        raise UsageError(f"{args.out} has no settings.json (no runs)")
    if args.target is None:
        raise UsageError("--target (the preregistered accuracy) is required for a new study")
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(mine, fh, indent=1)
    return mine


def sim_config(st: dict, arm: str, difference: str, seed: int, lr: float, *, device: str = "cpu",
               **overrides) -> SimulationConfig:
    """The simulation config of one (arm, difference, seed, lr) run of a study whose shared settings are ``st``
    (its ``settings.json``); ``overrides`` replace fields (e.g. a diagnosis without evaluation)."""
    method, rule = ("hiso", arm[5:]) if arm.startswith("hiso-") else ("decomfl", "gsq")
    fields = dict(
        task=st["task"], model=st["model"], data_dir=st["data_dir"], method=method, rounds=st["rounds"],
        n_clients=st["n_clients"], clients_per_round=st["clients_per_round"], local_steps=st["local_steps"],
        num_directions=st["num_directions"], lr=lr, mu=st["mu"], batch_size=st["batch_size"], split=st["split"],
        eval_every=st["eval_every"], num_train=st["num_train"], num_eval=st["num_eval"], seed=seed,
        curvature_rule=rule, difference=difference, aggregation=st["aggregation"], device=device)
    fields.update(overrides)
    return SimulationConfig(**fields)


def run_one(args, st: dict, arm: str, difference: str, seed: int, lr: float) -> dict:
    """Run (or load) one (arm, difference, lr, seed); returns its record."""
    path = run_path(args.out, arm, difference, seed, lr)
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    cfg = sim_config(st, arm, difference, seed, lr, device=args.device)
    method, rule = cfg.method, cfg.curvature_rule
    t0 = time.time()
    if arm in FAMILY_ARMS:
        rows = run_family(cfg, FAMILY_ARMS[arm], setup=build(cfg))
    else:
        rows = run(cfg, setup=build(cfg))
    curve = [dict(round=r["round"], accuracy=r["accuracy"], loss=r.get("loss")) for r in rows]
    diverged = any(r.get("diverged") for r in rows)
    if diverged:
        curve = cs.fill_after_divergence(curve, st["rounds"], st["eval_every"], CHANCE.get(st["task"], 0.0))
    rec = dict(arm=arm, difference=difference, seed=seed, lr=lr, curvature_rule=None if method == "decomfl" else rule,
               family=FAMILY_ARMS.get(arm),
               mask_fraction=next((r["mask_fraction"] for r in rows if "mask_fraction" in r), None),
               beta=cfg.fl_config().beta if method == "hiso" else None, diverged=diverged, seconds=time.time() - t0,
               metrics=cs.curve_metrics(curve, st["rounds"], [st["target"]]), curve=curve,
               bytes_up=rows[-1].get("bytes_up"), date=dt.date.today().isoformat(), torch=torch.__version__,
               threads=torch.get_num_threads(), device=args.device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(rec, fh)
    os.replace(path + ".tmp", path)  # atomic: a killed run leaves no half file
    m, tkey = rec["metrics"], f"{st['target']:.2f}"
    print(f"{arm_name(arm, difference):24s} seed {seed} lr {lr:<9.3g} final {m['final']:.3f} auc {m['auc']:.3f} "
          f"rounds to {tkey}: {m['rounds_to'][tkey]}"
          f"{'  DIVERGED' if diverged else ''} ({rec['seconds']:.0f} s)", flush=True)
    return rec


def complete_by_lr(runs: dict, seeds) -> dict[float, list[dict]]:
    by: dict[float, list[dict]] = {}
    for (s, lr), r in runs.items():
        if s in seeds:
            by.setdefault(lr, []).append(r["metrics"])
    return {lr: ms for lr, ms in by.items() if len(ms) == len(set(seeds))}


def study(args, st: dict) -> None:
    """Run every arm: its starting grid at every seed, then extend the grid until the best lr is interior."""
    for arm in args.arms:
        for difference in args.differences:
            if not valid(arm, difference):
                continue
            grid = args.grids.get(arm, args.lrs)
            have = sorted({lr for (_, lr) in load_runs(args.out, arm, difference)})
            if not grid and not have:
                raise UsageError(f"no lrs for {arm} (--lrs or --lr-grid {arm}=...)")
            for lr in grid:
                for seed in args.seeds:
                    run_one(args, st, arm, difference, seed, lr)
            while not args.no_extend:
                by = complete_by_lr(load_runs(args.out, arm, difference), args.seeds)
                best, interior, lrs = cs.best_lr(by, st["target"])
                if best is None or interior or len(lrs) >= args.max_grid:
                    break
                new = cs.next_lr(best, lrs, args.factor)
                print(f"{arm_name(arm, difference)}: best lr {best:g} is at the edge of {lrs}; adding {new:g}",
                      flush=True)
                for seed in args.seeds:
                    run_one(args, st, arm, difference, seed, new)


if __name__ == "__main__":
    from claim_report import report

    _args = parse_args()
    _st = check_settings(_args)
    if not _args.report:
        with open(os.path.join(_args.out, "commands.txt"), "a") as _fh:
            _fh.write(f"{dt.datetime.now().isoformat(timespec='seconds')}  python benchmarks/fl_claim.py "
                      + " ".join(a if a != _args.out else os.path.relpath(a) for a in sys.argv[1:]) + "\n")
        _t = torch.get_num_threads()
        torch.set_num_threads(max(1, _t))
        study(_args, _st)
    report(_args.out, _st, platform.platform())
