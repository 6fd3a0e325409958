"""Peak memory of a ZO step on SmolLM2-135M against the peak of a plain forward pass (issue 4's memory target).

Each configuration runs in a fresh process: load the model (fp32), then either one forward pass or one optimizer
step (two forward passes per direction, perturbations, restore, fused update) on a batch of 8 x 64 tokens, and read
the process's peak RSS. The eager MeZO step (torch.normal per tensor, as MeZO's trainer) is measured the same way.

    python benchmarks/step_memory.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent(
    """
    import json, resource, sys, torch
    sys.path.insert(0, {root!r})
    from hiso.models import load_causal_lm
    mode = sys.argv[1]
    model, _ = load_causal_lm("smollm2-135m")
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
    def loss():
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss
    if mode == "hiso":  # H is optimizer state (4 bytes per parameter, like one Adam moment): allocate it first
        from hiso.optim import HiSo
        opt = HiSo(model.parameters(), lr=1e-6, mu=1e-3, record_history=False)
        opt._hessians(opt._layout())
    loss()  # warm up allocator and kernels; the peak of this call is the forward baseline of every mode
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "forward":
        loss()
    elif mode in ("zosgd", "zosgd-no-exact-restore"):
        from hiso.optim import ZOSGD
        opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3, exact_restore=(mode == "zosgd"), record_history=False)
        opt.step(loss)
        opt.step(loss)
    elif mode == "hiso":
        opt.step(loss)
        opt.step(loss)
    elif mode == "eager-mezo":
        with torch.no_grad():
            for _ in range(2):
                def perturb(scale, seed=7):
                    torch.manual_seed(seed)
                    for p in params:
                        z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
                        p.data = p.data + scale * 1e-3 * z
                perturb(1); l1 = loss(); perturb(-2); l2 = loss(); perturb(1)
                g = float(l1 - l2) / 2e-3
                torch.manual_seed(7)
                for p in params:
                    z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
                    p.data = p.data - 1e-6 * g * z
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    undo = getattr(opt, "last_undo_elements", None) if mode in ("zosgd", "hiso") else None
    print(json.dumps(dict(mode=mode, peak_kib=peak, after_warmup_kib=rss_model,
                          param_bytes=sum(p.numel() * p.element_size() for p in params),
                          undo_elements=undo, numel=sum(p.numel() for p in params))))
    """
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(root=root)
    rows = {}
    for mode in ("forward", "zosgd", "hiso", "zosgd-no-exact-restore", "eager-mezo"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["forward"]["peak_kib"]
    lines = [f"# Peak RSS of a step on SmolLM2-135M, fp32, batch 8 x 64 ({dt.date.today().isoformat()})", "",
             "| mode | peak RSS (MiB) | vs a forward-only process | vs its own warm-up forward (with its state) | "
             "elements in the exact-restore log (last step) |",
             "|---|---|---|---|---|"]
    for mode, r in rows.items():
        undo = r.get("undo_elements")
        logged = f"{undo:,} ({100 * undo / r['numel']:.2f}%)" if undo is not None else ""
        lines.append(f"| {mode} | {r['peak_kib'] / 1024:.0f} | {100 * (r['peak_kib'] / base - 1):+.1f}% | "
                     f"{100 * (r['peak_kib'] / r['after_warmup_kib'] - 1):+.1f}% | {logged} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{dt.date.today().isoformat()}-step-memory")
    with open(stem + ".md", "w") as fh:
        fh.write(text + "\n")
    with open(stem + ".json", "w") as fh:
        json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
