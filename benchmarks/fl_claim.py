"""The paper's claim, tested: HiSo reaches DeComFL's final accuracy in fewer rounds (the paper reports 1.4-5.4x).

For each method, every learning rate of the same grid is run with the same data split, model initialisation and
seeds; the method's best learning rate is the one with the highest final accuracy. The claim's ratio is
  rounds DeComFL needs to reach its own final accuracy / rounds HiSo needs to reach DeComFL's final accuracy
(evaluated every ``eval_every`` rounds). Writes ``<date>-<task>-claim-<rounds>r.{json,md,png}`` to the results folder.

    python benchmarks/fl_claim.py --task fashion_mnist --rounds 300 --lrs 3e-4 1e-3 3e-3 1e-2 3e-2

``--extend A.json B.json`` reuses the runs of earlier results with the same settings (a grid run in parts, or
widened later): only the (method, lr) pairs not found there are run.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hiso.fl.simulation import SimulationConfig, build, run
from hiso.reporting import plot, rounds_to_reach


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="fashion_mnist")
    p.add_argument("--model", default=None)
    p.add_argument("--data-dir", default=None, help="local task data (else $HISO_DATA_DIR, else the hub)")
    p.add_argument("--methods", nargs="+", default=["hiso", "decomfl"])
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2])
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
    p.add_argument("--curvature-rule", default="gsq")
    p.add_argument("--beta", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--extend", nargs="+", default=[], help="earlier results (.json) whose runs to reuse")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    runs, earlier_commands = reuse_runs(args)
    t0 = time.time()
    for method in args.methods:
        for lr in args.lrs:
            if f"{method}@{lr:g}" in runs:
                continue
            cfg = SimulationConfig(
                task=args.task, model=args.model, data_dir=args.data_dir, method=method, rounds=args.rounds,
                n_clients=args.n_clients,
                clients_per_round=args.clients_per_round, local_steps=args.local_steps,
                num_directions=args.num_directions, lr=lr, mu=args.mu, batch_size=args.batch_size,
                split=args.split, eval_every=args.eval_every, num_train=args.num_train, num_eval=args.num_eval,
                seed=args.seed, curvature_rule=args.curvature_rule, beta=args.beta,
            )
            rows = run(cfg, setup=build(cfg))
            for r in rows:
                r["lr"] = lr
            runs[f"{method}@{lr:g}"] = rows
            best = max(r["accuracy"] for r in rows)
            print(f"{method:8s} lr {lr:<8g} final acc {rows[-1]['accuracy']:.4f}  best {best:.4f}"
                  f"  ({rows[-1]['seconds']:.0f} s)", flush=True)

    runs = {f"{m}@{lr:g}": runs[f"{m}@{lr:g}"] for m in args.methods for lr in args.lrs}  # the grid asked for
    best = {}
    for method in args.methods:
        cands = [(rows[-1]["accuracy"], key) for key, rows in runs.items() if key.startswith(method + "@")]
        best[method] = max(cands)[1]
    result = {"best_lr_runs": best}
    if "hiso" in best and "decomfl" in best:
        deco, hiso = runs[best["decomfl"]], runs[best["hiso"]]
        target = deco[-1]["accuracy"]
        r_deco = rounds_to_reach(deco, "decomfl", target)
        r_hiso = rounds_to_reach(hiso, "hiso", target)
        result.update(decomfl_final_accuracy=target, rounds_decomfl=r_deco, rounds_hiso=r_hiso,
                      speedup=None if not r_hiso else r_deco / r_hiso)

    stamp = dt.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    seed_tag = f"-seed{args.seed}" if args.seed else ""
    base = os.path.join(args.out, f"{stamp}-{args.task}-claim-{args.rounds}r{seed_tag}")
    # no machine paths in committed results
    settings = dict(vars(args), out=os.path.relpath(args.out), extend=[os.path.basename(e) for e in args.extend])
    conditions = dict(date=stamp, command=recorded_command(sys.argv), earlier_commands=earlier_commands,
                      python=platform.python_version(),
                      torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads(),
                      seconds=time.time() - t0, settings=settings)
    with open(base + ".json", "w") as fh:
        json.dump(dict(conditions=conditions, result=result, runs=runs), fh, indent=1)
    lines = [f"# {args.task}: HiSo vs DeComFL ({stamp})", "", f"Command: `{conditions['command']}`", ""]
    if earlier_commands:
        lines += ["Runs reused from:", ""] + [f"- `{c}`" for c in earlier_commands] + [""]
    lines += ["| method | lr | final acc | best acc |", "|---|---|---|---|"]
    for key, rows in runs.items():
        m, lr = key.split("@")
        mark = " (best)" if best.get(m) == key else ""
        lines.append(f"| {m}{mark} | {lr} | {rows[-1]['accuracy']:.4f} | {max(r['accuracy'] for r in rows):.4f} |")
    if "speedup" in result:
        lines += ["", f"DeComFL's final accuracy {result['decomfl_final_accuracy']:.4f}: DeComFL reaches it at round "
                      f"{result['rounds_decomfl']}, HiSo at round {result['rounds_hiso']} "
                      f"(ratio {result['speedup'] if result['speedup'] is None else round(result['speedup'], 2)})."]
    with open(base + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    plot([r for key in best.values() for r in runs[key]], base + ".png")
    print("\n".join(lines))
    return 0


def recorded_command(argv: list[str]) -> str:
    """The command as run, without machine paths: --out is dropped (it does not change a run) and --extend files
    are named by their file names."""
    out, skip, extending = ["python", argv[0]], False, False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a.startswith("--"):
            extending = a == "--extend"
        out.append(os.path.basename(a) if extending and not a.startswith("--") else a)
    return " ".join(out)


# settings that must agree for runs to be reused (everything that changes a run; not the grid or the output)
_NOT_COMPARED = {"lrs", "methods", "out", "extend"}


def reuse_runs(args) -> tuple[dict, list[str]]:
    runs, commands = {}, []
    mine = {k: v for k, v in vars(args).items() if k not in _NOT_COMPARED}
    for path in args.extend:
        with open(path) as fh:
            doc = json.load(fh)
        theirs = {k: v for k, v in doc["conditions"]["settings"].items() if k not in _NOT_COMPARED}
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise SystemExit(f"fl_claim: {path} was run with other settings ({', '.join(diff)}); cannot reuse it")
        runs.update(doc["runs"])
        for command in [doc["conditions"]["command"], *doc["conditions"].get("earlier_commands", [])]:
            commands.append(recorded_command(command.split()[1:]))  # older results recorded --out
    return runs, commands


if __name__ == "__main__":
    raise SystemExit(main())
