"""Measure every hiso kernel on a CUDA device (cuda and triton backends) against the eager MeZO loop, the same loop
under torch.compile, the copy roofline and the generator alone, and write ``<out>/<stem>.{md,csv,png,json}``.

    python3 benchmarks/run_gpu.py --out results/ [--quick] [--budget-s 240]

Like run_cpu.py (the definitions are in benchmarks/benchlib.py), with: CUDA events around each call (they include
the host's launch time when the host is the bottleneck, as for the eager loop over hundreds of tensors); flat sizes up
to 2^30 elements; SmolLM2-135M, OPT-1.3B and LLaMA-7B parameter lists (random values, bf16); the peak-memory delta as
torch.cuda.max_memory_allocated() - memory_allocated() around one warm call, in-process.

``--budget-s`` bounds the measuring time: the cases are ordered so that the targets' rows come first, and whatever
was measured is written when the budget runs out (the skipped cases are listed in the JSON).

``--plan check`` (benchmarks/gpu_check.sh) has its own order, most important first: flat perturb 2^28 in fp32 and
bf16 (with the copy roofline and the generator-only rate), SmolLM2-135M perturb against eager MeZO and one
torch.compile of it (the only compiled loop of the plan: each compile costs seconds), then perturb with H, updates,
HiSo rounds, replay, and the larger models last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl

LARGE = ("opt-1.3b", "llama-7b")


def check_plan(dtypes) -> list:
    """gpu_check.sh's cases, most important first (a run under a time budget keeps what it reached)."""
    first = [bl.Case("perturb", bl.flat(28), "fp32"), bl.Case("perturb", bl.flat(28), "bf16"),
             bl.Case("perturb", "smollm2-135m", "bf16")]
    rest = []
    for dt in dtypes:
        rest += [bl.Case("perturb_h", "smollm2-135m", dt), bl.Case("perturb", bl.flat(30), dt),
                 bl.Case("perturb", bl.flat(20), dt)]
        rest += [bl.Case("update", bl.flat(26), dt, d) for d in (1, 4, 32)]
        rest += [bl.Case("hiso_round", "smollm2-135m", dt), bl.Case("hiso_round", bl.flat(28), dt)]
        rest += [bl.Case("replay", bl.flat(24), dt, r) for r in (1, 10, 100)]
        rest += [bl.Case("perturb", "opt-1.3b", dt), bl.Case("hiso_round", "llama-7b", dt)]
    return list(dict.fromkeys(first + rest))


def check_skip(case, prov: str) -> bool:
    """Providers left out of the check plan: torch.compile except on SmolLM2's perturb, the reference backend as a
    'fused' provider, and the reference on anything large."""
    if prov == "compile":
        return not (case.kernel == "perturb" and case.shape == "smollm2-135m")
    return prov in ("reference", "torch") and case.numel * case.terms > (1 << 20)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--plan", choices=("quick", "check", "full"), default=None,
                   help="case list (default full, or quick with --quick); gpu_check.sh uses check")
    p.add_argument("--tag", default=None, help="file stem (default: <date>-<gpu name>)")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(bl.MODELS))
    p.add_argument("--kernels", default=",".join(bl.KERNELS))
    p.add_argument("--providers", default=None, help="comma-separated subset of providers (default: all)")
    p.add_argument("--no-compile-on-large", action="store_true",
                   help="skip torch.compile on OPT-1.3B / LLaMA-7B (by default measured last: its compilation of "
                   "hundreds of tensors takes a minute or more)")
    p.add_argument("--budget-s", type=float, default=None, help="stop measuring after this many seconds")
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("run_gpu.py: torch sees no CUDA device", file=sys.stderr)
        return 2
    device = args.device
    mode = args.plan or ("quick" if args.quick else "full")
    models = args.models.split(",") if args.models else None
    kernels = set(args.kernels.split(","))
    wanted = None if args.providers is None else set(args.providers.split(","))
    if mode == "check" and models is None:
        cases = [c for c in check_plan(args.dtypes.split(",")) if c.kernel in kernels]
    else:
        cases = [c for c in bl.plan("cuda", mode, args.dtypes.split(","), models) if c.kernel in kernels]

    def memory(case: bl.Case, prov: str) -> bool:
        return not (prov.startswith("generator:") or prov in ("randn", "copy"))

    def skip(case: bl.Case, prov: str) -> bool:
        if wanted is not None and prov not in wanted:
            return True
        if mode == "check" and check_skip(case, prov):
            return True
        if prov.split(":")[-1].removesuffix("+check") == "reference":
            return True  # the reference backend among the fused ones (benchlib filters its old name only)
        return args.no_compile_on_large and prov == "compile" and case.shape in LARGE

    runner = bl.Runner(device, target_s=0.25 if mode == "full" else 0.1, min_repeats=10, max_repeats=100,
                       memory=memory, budget_s=args.budget_s, slow_s=0.5)
    cond = bl.conditions(device)
    print(f"hiso GPU benchmark ({mode}) on {cond.get('gpu')}: {len(cases)} cases, budget {args.budget_s} s",
          flush=True)
    start = time.monotonic()

    def on_term(signum, frame):  # a hard time limit (gpu_check.sh's timeout): stop measuring, keep what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        rows = runner.run(cases, skip=skip, defer=lambda c, prov: prov == "compile" and c.shape in LARGE)
    except KeyboardInterrupt:
        print("interrupted: writing the rows measured so far", flush=True)
        runner.skipped.append("interrupted (SIGTERM or Ctrl-C) after the rows in the table")
        rows = bl.derive(runner.rows)
    cond.update(mode=mode, wall_s=round(time.monotonic() - start, 1), skipped=runner.skipped)
    targets = bl.check_targets(rows, device)
    gpu = re.sub(r"[^A-Za-z0-9._-]+", "-", (cond.get("gpu") or "gpu").replace("NVIDIA ", ""))  # a safe file name
    stem = args.tag or f"{datetime.date.today().isoformat()}-{gpu}" + ("" if mode == "full" else f"-{mode}")
    paths = bl.write_outputs(rows, targets, cond, args.out, stem, f"hiso_kernels GPU benchmark ({cond.get('gpu')})")
    print(f"\n{len(rows)} rows in {cond['wall_s']} s; {len(runner.skipped)} skipped for time")
    for t in targets:
        if t["met"] is False or "speedup" in t["target"] or "memory" in t["target"]:
            missed = ", MISSED" if t["met"] is False else ""
            print(f"  {t['target']}: {bl._fmt(t['measured'])} ({t['margin']}{missed}) {t['note']}")
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
