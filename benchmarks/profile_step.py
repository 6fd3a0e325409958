"""End-to-end step profile: one MeZO step on SmolLM2-135M (batch 8 x 64 tokens), eager loop vs fused kernels.

    python benchmarks/profile_step.py                      # CPU, writes benchmarks/results/<date>-profile-cpu.md
    python3 benchmarks/profile_step.py --device cuda --out DIR

A MeZO step (Malladi et al., MeZO's trainer) is: perturb +mu, forward, perturb -2 mu, forward, perturb +mu (restore),
then the update x <- x - lr g z with z regenerated from the step's seed. Only the two forward passes do model work;
everything else is parameter traffic. This script times each phase (and the growth of peak memory within it) and
reports

    share outside the forwards = (step time - forward 1 - forward 2) / step time

for the eager loop (``torch.manual_seed`` then per parameter ``torch.normal``, multiply, add: benchlib.mezo_*_loop)
and for the fused kernels (``hk.perturb_`` x 3 + ``hk.zo_update_``), plus the peak-memory growth of the perturb /
update phases and of the forward phases (CPU: peak RSS after a reset of the peak; GPU: max_memory_allocated).
The model is randomly initialised from SmolLM2-135M's config (same cost as the pretrained weights); inputs are random
token ids, labels = inputs.
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
import benchlib as bl
import hiso_kernels as hk

PHASES = ("perturb +mu", "forward 1", "perturb -2mu", "forward 2", "restore +mu", "update")


def smollm2_135m(dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    # SmolLM2-135M's published sizes; RoPE settings and context length do not change the cost of 64 tokens
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype=dtype, device=device).eval()
    return model


def _peak_reset(device: str) -> int:
    """Restart the peak-memory count; returns the current level (the baseline of the next peak)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    bl._reset_peak_rss()
    return bl.peak_rss_bytes()


def _peak(device: str) -> int:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else bl.peak_rss_bytes()


class PhaseTimer:
    """Wall time and peak-memory growth per phase of a step; synchronises the device at each boundary so a phase
    owns its kernels."""

    def __init__(self, device: str):
        self.device = device
        self.times: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self._t = None
        self._base = 0
        self._name = None

    def __call__(self, name: str):
        self._name = name
        return self

    def __enter__(self):
        bl.synchronize(self.device)
        self._base = _peak_reset(self.device)
        self._t = time.perf_counter()

    def __exit__(self, *exc):
        bl.synchronize(self.device)
        self.times[self._name] = time.perf_counter() - self._t
        self.peaks[self._name] = _peak(self.device) - self._base


def eager_step(model, params, batch, seed, mu, lr, timer):
    """MeZO's zo_step + zo_update as its trainer writes them."""
    def loss():
        return model(input_ids=batch, labels=batch).loss.item()

    with timer("perturb +mu"):
        torch.manual_seed(seed)
        bl.mezo_perturb_loop(params, 1, mu)
    with timer("forward 1"):
        loss1 = loss()
    with timer("perturb -2mu"):
        torch.manual_seed(seed)
        bl.mezo_perturb_loop(params, -2, mu)
    with timer("forward 2"):
        loss2 = loss()
    with timer("restore +mu"):
        torch.manual_seed(seed)
        bl.mezo_perturb_loop(params, 1, mu)
    projected_grad = (loss1 - loss2) / (2 * mu)
    with timer("update"):
        torch.manual_seed(seed)
        bl.mezo_update_loop(params, lr, projected_grad)


def fused_step(model, params, batch, seed, mu, lr, timer, backend=None):
    def loss():
        return model(input_ids=batch, labels=batch).loss.item()

    with timer("perturb +mu"):
        hk.perturb_(params, seed, mu, backend=backend)
    with timer("forward 1"):
        loss1 = loss()
    with timer("perturb -2mu"):
        hk.perturb_(params, seed, -2 * mu, backend=backend)
    with timer("forward 2"):
        loss2 = loss()
    with timer("restore +mu"):
        hk.perturb_(params, seed, mu, backend=backend)
    projected_grad = (loss1 - loss2) / (2 * mu)
    with timer("update"):
        hk.zo_update_(params, seed, 0, [lr * projected_grad], backend=backend)


def run_variant(step, model, params, batch, device, steps, warmup, mu, lr) -> dict:
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    totals = []
    outside = []  # per step: step time minus its two forwards (medians of parts would not add up)
    outside_peaks = []
    forward_peaks = []
    for i in range(warmup + steps):
        timer = PhaseTimer(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            step(model, params, batch, 1234 + i, mu, lr, timer)
        bl.synchronize(device)
        total = time.perf_counter() - t0
        if i < warmup:
            continue
        totals.append(total)
        outside.append(total - timer.times["forward 1"] - timer.times["forward 2"])
        outside_peaks.append(max(v for k, v in timer.peaks.items() if not k.startswith("forward")))
        forward_peaks.append(max(v for k, v in timer.peaks.items() if k.startswith("forward")))
        for p in PHASES:
            per_phase[p].append(timer.times[p])
    med = {p: statistics.median(v) for p, v in per_phase.items()}
    return {"phases_s": med, "step_s": statistics.median(totals), "outside_s": statistics.median(outside),
            "outside_share": statistics.median(o / t for o, t in zip(outside, totals, strict=True)),
            "peak_outside_bytes": max(outside_peaks),
            "peak_forward_bytes": max(forward_peaks),
            "step_p20_s": bl.percentile(totals, 20), "step_p80_s": bl.percentile(totals, 80), "steps": len(totals)}


def markdown(res: dict, cond: dict, args, n_params: int) -> str:
    e, f = res["eager"], res["fused"]
    lines = [f"# One MeZO step on SmolLM2-135M ({args.device}, {args.dtype}, batch {args.batch} x {args.seq} tokens)",
             "",
             f"{cond['date']} - {cond.get('gpu', cond['cpu_model'])}, {cond['cpu_count']} CPUs, "
             f"{cond['torch_threads']} torch threads - torch {cond['torch']}, transformers {cond.get('transformers')}, "
             f"hiso_kernels {cond['hiso_kernels']} (commit {cond.get('git_commit')}) - load average at start "
             f"{cond['load_average_1_5_15'][0]:.2f}, at end {cond['load_average_at_end'][0]:.2f}", "",
             f"{n_params / 1e6:.1f} M parameters, median of {e['steps']} steps after {args.warmup} warm-up step(s). "
             "Fused = hk.perturb_ x 3 + hk.zo_update_; eager = MeZO's trainer loop (torch.manual_seed, then per "
             "parameter torch.normal, multiply, add).", "",
             "| phase | eager | fused | eager / fused |", "|---|---|---|---|"]
    for p in PHASES:
        a, b = e["phases_s"][p], f["phases_s"][p]
        lines.append(f"| {p} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}x |")
    lines += [
        f"| **step** | **{e['step_s'] * 1e3:.1f} ms** | **{f['step_s'] * 1e3:.1f} ms** | "
        f"**{e['step_s'] / f['step_s']:.2f}x** |",
        f"| outside the two forwards (per step) | {e['outside_s'] * 1e3:.1f} ms ({100 * e['outside_share']:.1f}%) | "
        f"{f['outside_s'] * 1e3:.1f} ms ({100 * f['outside_share']:.1f}%) | {e['outside_s'] / f['outside_s']:.2f}x |",
        f"| peak-memory growth, perturb / update phases | {bl._fmt_bytes(e['peak_outside_bytes'])} | "
        f"{bl._fmt_bytes(f['peak_outside_bytes'])} | |",
        f"| peak-memory growth, forward phases | {bl._fmt_bytes(e['peak_forward_bytes'])} | "
        f"{bl._fmt_bytes(f['peak_forward_bytes'])} | |",
        "",
        f"Step time p20-p80: eager {e['step_p20_s'] * 1e3:.1f}-{e['step_p80_s'] * 1e3:.1f} ms, fused "
        f"{f['step_p20_s'] * 1e3:.1f}-{f['step_p80_s'] * 1e3:.1f} ms. The forward passes are the same work in both; "
        "a difference between their forward times is noise (or cache effects of the eager loop's temporaries).",
        ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=sorted(bl.DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default=None, help="hiso backend for the fused step (default: automatic)")
    p.add_argument("--out", default=bl.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="file stem (default: <date>-profile-<device>)")
    args = p.parse_args(argv)

    try:
        import transformers
    except ImportError:
        print("profile_step.py needs transformers (pip install transformers)", file=sys.stderr)
        return 2
    device = args.device
    dtype = bl.DTYPES[args.dtype]
    cond = bl.conditions(device)
    cond["transformers"] = transformers.__version__
    model = smollm2_135m(dtype, device)
    params = [q for q in model.parameters() if q.requires_grad]
    n_params = sum(q.numel() for q in params)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(device)
    mu, lr = 1e-3, 1e-6
    print(f"SmolLM2-135M ({n_params / 1e6:.1f} M parameters, {args.dtype}) on {device}, batch {args.batch}x{args.seq}",
          flush=True)
    res = {}
    # fused first, then eager: the order does not favour the fused step (caches, allocator)
    res["fused"] = run_variant(lambda *a: fused_step(*a, backend=args.backend), model, params, batch, device,
                               args.steps, args.warmup, mu, lr)
    res["eager"] = run_variant(eager_step, model, params, batch, device, args.steps, args.warmup, mu, lr)
    cond["load_average_at_end"] = list(os.getloadavg())
    text = markdown(res, cond, args, n_params)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or f"{datetime.date.today().isoformat()}-profile-{torch.device(device).type}"
    path = os.path.join(args.out, f"{stem}.md")
    with open(path, "w") as fh:
        fh.write(text + "\n<!-- raw\n" + json.dumps({"conditions": cond, "results": res}, indent=1, default=str)
                 + "\n-->\n")
    print(f"wrote {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
