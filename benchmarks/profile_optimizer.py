"""What users run: ``ZOSGD`` / ``HiSo`` ``.step(closure)`` with their defaults, profiled against MeZO's eager loop.

    python benchmarks/profile_optimizer.py                    # both models, CPU; writes results/<date>-optimizer-cpu.md
    python benchmarks/profile_optimizer.py --models mlp --steps 50

Two models:

* ``smollm2``: SmolLM2-135M's architecture (134.5 M parameters, randomly initialised: the cost is the same as the
  pretrained weights), fp32 (the optimizers' exact-restore default), batch 8 x 64 tokens, P = 1, central differences.
* ``mlp``: a 2.4k-parameter MLP (32 -> 64 -> 4), batch 64, P = 4: the per-call Python cost.

Rows: ``ZOSGD`` and ``HiSo`` with their defaults (exact restore on for fp32), the same with ``exact_restore=False``,
and MeZO's eager loop (``torch.manual_seed``, then per parameter ``torch.normal``, multiply, add; the same arithmetic
as a hand-written MeZO step). For each: the median step time, the time spent in the closure's forward passes (timed
inside the closure), the share of the step outside the forwards, and the passes over parameter memory per step
(elements the kernels touched / parameters; counted by wrapping the backends' ``apply``). Peak memory is measured by
``benchmarks/step_memory.py`` (a fresh process per configuration).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib as bl
from hiso.optim import ZOSGD, HiSo
from hiso_kernels.backends import BACKENDS


class PassCounter:
    """Counts the elements every backend's ``apply`` and ``apply_logged`` touch (a program is one pass over the
    tensors it is given; a logged run is one pass too, its simulated rounds stay in registers)."""

    def __init__(self):
        self.elements = 0
        self.calls = 0
        self._saved = {}

    def __enter__(self):
        for name, backend in BACKENDS.items():
            self._saved[name] = (backend.apply, backend.apply_logged)

            def counted(params, *args, _original=backend.apply, **kw):
                self.elements += sum(p.numel() for p in params)
                self.calls += 1
                return _original(params, *args, **kw)

            def counted_logged(params, *args, _original=backend.apply_logged, **kw):
                self.elements += sum(p.numel() for p in params)
                self.calls += 1
                return _original(params, *args, **kw)

            backend.apply = counted
            backend.apply_logged = counted_logged
        return self

    def __exit__(self, *exc):
        for name, (apply, logged) in self._saved.items():
            BACKENDS[name].apply = apply
            BACKENDS[name].apply_logged = logged


def make_model(kind: str):
    if kind == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, cfg.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
        return model, lambda: model(input_ids=ids, labels=ids).loss, 1
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y), 4


def eager_mezo_step(params, loss_fn, seed, mu, lr, num_directions):
    """MeZO's trainer step (central differences, P directions), written by hand with torch ops."""
    grads = []
    for p_dir in range(num_directions):
        def perturb(scale, s=seed * 1000 + p_dir):
            torch.manual_seed(s)
            for p in params:
                z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
                p.data = p.data + scale * mu * z
        perturb(1)
        l1 = float(loss_fn())
        perturb(-2)
        l2 = float(loss_fn())
        perturb(1)
        grads.append((l1 - l2) / (2 * mu))
    for p_dir, g in enumerate(grads):
        torch.manual_seed(seed * 1000 + p_dir)
        for p in params:
            z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
            p.data = p.data - lr * g / num_directions * z


def profile(kind: str, variant: str, steps: int, warmup: int, trivial: bool = False) -> dict:
    model, loss_fn, num_directions = make_model(kind)
    if trivial:  # the step's own work only: the closure returns a constant (no forward)
        loss_fn = lambda: 0.0  # noqa: E731
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    forward_s = [0.0]

    def closure():
        t = time.perf_counter()
        out = loss_fn()
        forward_s[0] += time.perf_counter() - t
        return out

    mu, lr = 1e-3, 1e-6
    if variant != "eager":
        cls = HiSo if variant.startswith("hiso") else ZOSGD
        kw = {"exact_restore": False} if variant.endswith("no-exact-restore") else {}
        opt = cls(model.parameters(), lr=lr, mu=mu, num_directions=num_directions, record_history=False, **kw)
    totals, outside, passes, calls = [], [], [], []
    with torch.no_grad():
        for i in range(warmup + steps):
            forward_s[0] = 0.0
            with PassCounter() as pc:
                t0 = time.perf_counter()
                if variant == "eager":
                    eager_mezo_step(params, closure, 1234 + i, mu, lr, num_directions)
                else:
                    opt.step(closure)
                total = time.perf_counter() - t0
            if i < warmup:
                continue
            totals.append(total)
            outside.append(total - forward_s[0])
            passes.append(pc.elements / n)
            calls.append(pc.calls)
    return {"model": kind, "variant": variant, "params": n, "num_directions": num_directions,
            "step_s": statistics.median(totals), "step_p20_s": bl.percentile(totals, 20),
            "step_p80_s": bl.percentile(totals, 80), "outside_s": statistics.median(outside),
            "outside_share": statistics.median(o / t for o, t in zip(outside, totals)),
            "passes": statistics.median(passes), "kernel_calls": statistics.median(calls), "steps": steps,
            "trivial_closure": trivial}


VARIANTS = ("zosgd", "zosgd-no-exact-restore", "hiso", "hiso-no-exact-restore", "eager")


def markdown(rows: list[dict], cond: dict) -> str:
    out = [f"# Optimizer steps as users run them ({cond['date'][:10]})", "",
           f"{cond['cpu_model']}, {cond['cpu_count']} CPUs, {cond['torch_threads']} torch threads, torch "
           f"{cond['torch']}, commit {cond.get('git_commit')}; load average at start "
           f"{cond['load_average_1_5_15'][0]:.2f}, at end {cond['load_average_at_end'][0]:.2f}. fp32 parameters, "
           "central differences, defaults otherwise (exact restore on for fp32)."
           + (" Trivial closure (returns 0.0, no forward pass)." if any(r.get("trivial_closure") for r in rows)
              else ""),
           "",
           "| model | variant | step (median, p20-p80) | outside the forwards | passes over parameters | "
           "kernel calls | vs eager MeZO |", "|---|---|---|---|---|---|---|"]
    eager = {r["model"]: r["step_s"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        rel = eager.get(r["model"])
        out.append(f"| {r['model']} ({r['params']:,} params, P={r['num_directions']}) | {r['variant']} | "
                   f"{_t(r['step_s'])} ({_t(r['step_p20_s'])}-{_t(r['step_p80_s'])}) | {_t(r['outside_s'])} "
                   f"({100 * r['outside_share']:.1f}%) | {r['passes']:.2f} | {r['kernel_calls']:.0f} | "
                   + (f"{r['step_s'] / rel:.2f}x the time |" if rel else "|"))
    return "\n".join(out) + "\n"


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "smollm2"], choices=["mlp", "smollm2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="measured steps (default: 40 mlp, 3 smollm2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=bl.RESULTS_DIR)
    p.add_argument("--tag", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--trivial-closure", action="store_true",
                   help="a closure that returns 0.0 (no forward): the step's own cost, e.g. exact restore's")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cond = bl.conditions("cpu")
    rows = []
    for kind in args.models:
        steps = args.steps or (40 if kind == "mlp" else 3)
        for variant in args.variants:
            row = profile(kind, variant, steps, args.warmup, args.trivial_closure)
            rows.append(row)
            print(f"{kind:8s} {variant:24s} step {_t(row['step_s'])}  outside {100 * row['outside_share']:.1f}%  "
                  f"passes {row['passes']:.2f}  calls {row['kernel_calls']:.0f}", flush=True)
    cond["load_average_at_end"] = list(os.getloadavg())
    text = markdown(rows, cond)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or f"{datetime.date.today().isoformat()}-optimizer-cpu"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as fh:
        fh.write(text + "\n<!-- raw\n" + json.dumps({"conditions": cond, "rows": rows}, indent=1, default=str)
                 + "\n-->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
