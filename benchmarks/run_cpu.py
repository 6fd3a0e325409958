"""Measure every hiso kernel against the MeZO-style loops, torch.compile and the copy roofline on the CPU, in one
process, and write ``benchmarks/results/<date>-cpu.{md,csv,png,json}``.

    python benchmarks/run_cpu.py            # full run (about 10 minutes on 2 cores)
    python benchmarks/run_cpu.py --quick    # a few minutes
    ./run.sh bench [--quick]                # the same through the project's entry point

What one row means (benchmarks/benchlib.py has the definitions): for a case (kernel, shape, dtype, directions or
rounds) and a provider, the median time of one complete operation over repeats, with p20/p80; the effective bandwidth
minimal bytes / time and its share of a copy of the same bytes; element x directions per second; the roofline
max(bytes / copy bandwidth, generator-only time) and the share of it reached; the peak-RSS growth of one call, each
provider in its own fresh subprocess (model parameter lists only: it costs a process start and a warm-up each).

Other processes on the machine distort CPU timings (two cores are easily shared): the load average at start and end
is written into the conditions; rerun on a quiet machine before publishing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sweep, fewer repeats (a few minutes)")
    p.add_argument("--out", default=bl.RESULTS_DIR, help="output folder (default: benchmarks/results)")
    p.add_argument("--tag", default=None, help="file stem (default: <date>-cpu[-quick])")
    p.add_argument("--dtypes", default="bf16", help="comma-separated parameter dtypes: bf16, fp32, fp16")
    p.add_argument("--kernels", default=",".join(bl.KERNELS), help="comma-separated subset of " + ", ".join(bl.KERNELS))
    p.add_argument("--providers", default=None, help="comma-separated subset of providers (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads (default: torch's choice)")
    p.add_argument("--target-s", type=float, default=None, help="measured seconds per row before stopping repeats")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mode = "quick" if args.quick else "full"
    kernels = set(args.kernels.split(","))
    wanted = None if args.providers is None else set(args.providers.split(","))
    cases = [c for c in bl.plan("cpu", mode, args.dtypes.split(",")) if c.kernel in kernels]

    def measure_memory(case: bl.Case, prov: str) -> bool:
        # Model parameter lists only; the generator, randn and copy rows allocate nothing worth a subprocess.
        if args.no_memory or bl.is_flat(case.shape) or prov.startswith("generator:") or prov in ("randn", "copy"):
            return False
        if mode == "quick":
            return case.kernel == "perturb"
        # single-term cases only: a multi-term call allocates what one term does (fused: nothing; the loops: one
        # pass's temporaries at a time), and its subprocess would repeat the slow eager loop several times
        return case.terms == 1

    def skip(case: bl.Case, prov: str) -> bool:
        return wanted is not None and prov not in wanted

    runner = bl.Runner("cpu", target_s=args.target_s or (0.3 if args.quick else 1.0), min_repeats=5,
                       max_repeats=15 if args.quick else 30, memory=measure_memory)
    cond = bl.conditions("cpu")
    print(f"hiso CPU benchmark ({mode}): {len(cases)} cases, {torch.get_num_threads()} threads, "
          f"load average {cond['load_average_1_5_15']}", flush=True)
    start = time.monotonic()
    rows = runner.run(cases, skip=skip)
    cond["load_average_at_end_1_5_15"] = list(os.getloadavg())
    cond["wall_s"] = round(time.monotonic() - start, 1)
    cond["mode"] = mode
    targets = bl.check_targets(rows, "cpu")
    stem = args.tag or f"{datetime.date.today().isoformat()}-cpu" + ("-quick" if args.quick else "")
    title = f"hiso_kernels CPU benchmark ({mode})"
    paths = bl.write_outputs(rows, targets, cond, args.out, stem, title)
    print(f"\n{len(rows)} rows in {cond['wall_s']} s; load average at end {cond['load_average_at_end_1_5_15']}")
    for t in targets:
        if t["met"] is False or "speedup" in t["target"] or "memory" in t["target"]:
            missed = ", MISSED" if t["met"] is False else ""
            print(f"  {t['target']}: {bl._fmt(t['measured'])} ({t['margin']}{missed}) {t['note']}")
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
