"""Turn a benchmark run into Markdown / CSV tables and a PNG plot.

    python -m pytest benchmarks --benchmark-json=bench.json
    python benchmarks/report.py bench.json                       # -> benchmarks/results/<date>-<device>-pytest.*
    python benchmarks/report.py benchmarks/results/X-cpu.csv     # re-render a run_cpu.py / run_gpu.py CSV

The pytest suite stores each row's case and metrics in ``extra_info`` (benchmarks/conftest.py); this script derives
the relative metrics (% of copy, roofline terms, speedups) across the rows of a case, checks the issue's targets and
writes the same outputs as the standalone runners.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl


def rows_from_pytest_json(data: dict) -> list[dict]:
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if "case" not in info:
            continue  # not one of ours
        rows.append(dict(info))
    return rows


def conditions_from_pytest_json(data: dict, device: str) -> dict:
    cond = bl.conditions(device)  # this machine's versions; the run's own machine info overrides what it has
    mi = data.get("machine_info") or {}
    cpu = mi.get("cpu") or {}
    cond.update({
        "date": data.get("datetime", cond["date"]),
        "cpu_model": cpu.get("brand_raw") or cond["cpu_model"],
        "python": mi.get("python_version", cond["python"]),
        "git_commit": (data.get("commit_info") or {}).get("id", cond["git_commit"]),
        "source": "pytest-benchmark JSON",
    })
    return cond


def run_load(rows: list[dict], cond: dict) -> None:
    """The load average seen by the first and the last test of the run (not the load now, at report time)."""
    loads = [r["load_1m"] for r in rows if r.get("load_1m") is not None]
    if loads:
        cond["load_average_1_5_15"] = [loads[0], None, None]
        cond["load_average_at_end_1_5_15"] = [loads[-1], None, None]
        cond["load_1m_max"] = max(loads)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="pytest-benchmark JSON (--benchmark-json) or a CSV written by run_cpu.py / run_gpu.py")
    p.add_argument("--out", default=bl.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="file stem (default: <date>-<device>-pytest, or the CSV's stem)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any row ran there, else cpu)")
    args = p.parse_args(argv)

    if args.run.endswith(".csv"):
        rows = bl.read_csv(args.run)
        side = os.path.splitext(args.run)[0] + ".json"
        if os.path.exists(side):
            with open(side) as f:
                cond = json.load(f)["conditions"]
        else:
            cond = bl.conditions(args.device or "cpu")
        device = args.device or cond.get("device", "cpu")
        stem = args.tag or os.path.splitext(os.path.basename(args.run))[0]
    else:
        with open(args.run) as f:
            data = json.load(f)
        rows = rows_from_pytest_json(data)
        device = args.device or ("cuda" if any(r.get("device") == "cuda" for r in rows) else "cpu")
        cond = conditions_from_pytest_json(data, device)
        run_load(rows, cond)
        stem = args.tag or f"{datetime.date.today().isoformat()}-{device}-pytest"
    if not rows:
        print("no hiso benchmark rows found", file=sys.stderr)
        return 1
    rows = bl.derive(rows)
    targets = bl.check_targets(rows, device)
    paths = bl.write_outputs(rows, targets, cond, args.out, stem, f"hiso_kernels benchmark ({device}, {stem})")
    print("wrote " + ", ".join(os.path.relpath(x) for x in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
