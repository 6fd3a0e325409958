"""Shared machinery of the hiso_kernels benchmarks: shapes, the byte model, providers, timing, memory, tables, plots.

Used by the pytest-benchmark suite (``test_bench_*.py``), the standalone runners (``run_cpu.py``, ``run_gpu.py``) and
``report.py``. Everything a number in a results table means is defined here, once.

Vocabulary
----------
case      one (kernel, shape, dtype, terms) point: *what* is computed.
provider  one way of computing it: a hiso backend (``cpu``, ``cuda``, ``triton``, ``torch`` = the reference), the
          eager MeZO loop (``eager``), the same loop under ``torch.compile`` (``compile``), a copy of the same bytes
          (``copy``), the generator alone (``generator:<backend>``), ``torch.randn`` of the same count (``randn``), and
          for multi-term kernels one fused call per direction / per round (``per-direction:<b>``, ``per-round:<b>``).
terms     directions of a multi-direction update, rounds of a replay (one direction each), 1 otherwise.

Byte model (design section 3): a pass reads and writes every parameter element once, and H where the kernel uses it.
With s = bytes per parameter element (bf16 2, fp32 4) and H in fp32:

    perturb            2 s          (bf16: 4 B/element, fp32: 8)
    perturb with H     2 s + 4      (read H;  bf16: 8, fp32: 12)
    update (any D)     2 s          (one pass whatever the number of directions)
    HiSo round         2 s + 8      (read and write H;  bf16: 12, fp32: 16)
    replay (any R)     2 s + 8      (HiSo rounds: one pass whatever the number of rounds)

Metrics
-------
effective GB/s   minimal bytes / median time
% of copy        t_copy / t  (the copy moves the same number of bytes, read half, write half)
elements/s       numel x terms / t   (element x directions per second for multi-term kernels)
roofline         max(t_mem, t_gen): t_mem = minimal bytes / copy bandwidth (= t_copy), t_gen = time of the
                 generator-only kernel ``directions_sum`` drawing numel x terms Gaussian values on the same backend
                 (it regenerates and reduces the directions and touches no parameter memory)
% of roofline    roofline / t;  "bound" names the larger term (memory or generator)
peak-memory      CPU: growth of the peak resident set (VmHWM, the value behind ru_maxrss) during one call, in a fresh
delta            subprocess after a warm-up and a reset of the peak;
                 GPU: torch.cuda.max_memory_allocated() - memory_allocated() before the call
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

import torch

import hiso_kernels as hk
from hiso_kernels.backends import BACKENDS
from hiso_kernels.spec import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")

MU = 1e-3  # perturbation scale (MeZO's zo_eps)
LR = 1e-6  # learning rate used to form update coefficients
BETA = 0.95  # HiSo's H smoothing
H_MIN = 1e-8

# ------------------------------------------------------------------------------------------------------ shapes
# Parameter lists in the order of transformers' named_parameters(), built from the published configs. The totals are
# checked below against the parameter counts of the models instantiated from those configs (transformers 5.x, meta
# device), so a typo here cannot silently change what is measured.


def llama_shapes(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
                 tied: bool) -> list[tuple[int, ...]]:
    """LlamaForCausalLM: embedding, per layer q/k/v/o, gate/up/down and two RMSNorm weights, final norm, lm_head."""
    kv = kv_heads * (hidden // heads)
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                   (intermediate, hidden), (intermediate, hidden), (hidden, intermediate),
                   (hidden,), (hidden,)]
    shapes.append((hidden,))
    if not tied:
        shapes.append((vocab, hidden))
    return shapes


def opt_shapes(*, hidden: int, ffn: int, layers: int, vocab: int, max_positions: int) -> list[tuple[int, ...]]:
    """OPTForCausalLM (tied lm_head): token and learned position embeddings (+2 offset), final LayerNorm, layers with
    biased k/v/q/out projections, two LayerNorms and a biased fc1/fc2."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden), (max_positions + 2, hidden), (hidden,), (hidden,)]
    for _ in range(layers):
        for _proj in range(4):
            shapes += [(hidden, hidden), (hidden,)]
        shapes += [(hidden,), (hidden,), (ffn, hidden), (ffn,), (hidden, ffn), (hidden,), (hidden,), (hidden,)]
    return shapes


MODELS: dict[str, list[tuple[int, ...]]] = {
    # HuggingFaceTB/SmolLM2-135M: hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads, vocab 49152, tied
    "smollm2-135m": llama_shapes(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True),
    # facebook/opt-1.3b: hidden 2048, ffn 8192, 24 layers, vocab 50272, 2048 positions
    "opt-1.3b": opt_shapes(hidden=2048, ffn=8192, layers=24, vocab=50272, max_positions=2048),
    # LLaMA-7B: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000, untied lm_head
    "llama-7b": llama_shapes(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000,
                             tied=False),
}
_EXPECTED = {"smollm2-135m": (272, 134_515_008), "opt-1.3b": (388, 1_315_758_080), "llama-7b": (291, 6_738_415_616)}
for _name, (_count, _total) in _EXPECTED.items():
    assert len(MODELS[_name]) == _count and sum(math.prod(s) for s in MODELS[_name]) == _total, _name


def shape_list(shape: str) -> list[tuple[int, ...]]:
    """Tensor shapes of a named shape: ``flat-2^k`` (one tensor of 2^k elements) or a model in :data:`MODELS`."""
    if shape.startswith("flat-2^"):
        return [(1 << int(shape[len("flat-2^"):]),)]
    return MODELS[shape]


def flat(k: int) -> str:
    return f"flat-2^{k}"


def is_flat(shape: str) -> bool:
    return shape.startswith("flat-")


# ------------------------------------------------------------------------------------------------------ cases
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

#: kernel -> (title, uses H, writes H, label of `terms`)
KERNELS = {
    "perturb": ("perturb", False, False, ""),
    "perturb_h": ("perturb with H", True, False, ""),
    "update": ("multi-direction update", False, False, "directions"),
    "hiso_round": ("HiSo round (1 direction)", True, True, ""),
    "replay": ("replay of HiSo rounds (1 direction each)", True, True, "rounds"),
}


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    shape: str
    dtype: str = "bf16"
    terms: int = 1

    @property
    def key(self) -> str:
        return f"{self.kernel}|{self.shape}|{self.dtype}|{self.terms}"

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return shape_list(self.shape)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def elem_size(self) -> int:
        return torch.empty((), dtype=DTYPES[self.dtype]).element_size()

    @property
    def uses_h(self) -> bool:
        return KERNELS[self.kernel][1]

    @property
    def bytes_per_element(self) -> int:
        """Minimal bytes per element (module docstring): read + write x, + read H, + write H."""
        _, uses_h, writes_h, _ = KERNELS[self.kernel]
        return 2 * self.elem_size + (4 if uses_h else 0) + (4 if writes_h else 0)

    @property
    def min_bytes(self) -> int:
        return self.numel * self.bytes_per_element

    @property
    def param_bytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def largest_tensor_bytes(self) -> int:
        return max(math.prod(s) for s in self.shapes) * self.elem_size

    def label(self) -> str:
        unit = KERNELS[self.kernel][3]
        return f"{self.kernel} {self.shape} {self.dtype}" + (f" x{self.terms} {unit}" if unit else "")


# ------------------------------------------------------------------------------------------------------ plans
def plan(device_type: str, mode: str, dtypes: Sequence[str] = ("bf16",), models: Sequence[str] | None = None
         ) -> list[Case]:
    """The cases of a run, cheapest information first (a GPU run under a time budget keeps what it reached).

    mode "quick": a few minutes on 2 CPU cores; "full": the issue's sweep (CPU: flat 2^16..2^28 for perturb, smaller
    ranges for the heavier kernels so that the whole run stays near 10 minutes; GPU: flat to 2^30 and three models);
    "check": between the two, every kernel, model and provider once (benchmarks/gpu_check.sh).
    ``models`` overrides the parameter lists (default: SmolLM2-135M on the CPU, all three on a GPU).
    """
    gpu = device_type == "cuda"
    if models is None:
        models = ["smollm2-135m"] + (["opt-1.3b", "llama-7b"] if gpu and mode != "quick" else [])
    cases: list[Case] = []
    for dt in dtypes:
        if mode == "quick":
            top = 26 if gpu else 24
            cases += [Case("perturb", m, dt) for m in models[:1]]
            cases += [Case("perturb", flat(k), dt) for k in (16, 20, top)]
            cases += [Case("perturb_h", m, dt) for m in models[:1]] + [Case("perturb_h", flat(20), dt)]
            cases += [Case("update", flat(20), dt, d) for d in (1, 4, 32)]
            cases += [Case("hiso_round", flat(20), dt)]
            cases += [Case("replay", flat(18), dt, r) for r in (1, 10, 100)]
            continue
        if mode == "check":  # gpu_check.sh: every kernel and model once, a few sizes (about 4 minutes on an H100)
            big = models[1:] if models[1:] else models[:1]
            cases += [Case("perturb", m, dt) for m in models]
            cases += [Case("perturb", flat(k), dt) for k in ((16, 20, 24, 28, 30) if gpu else (16, 20, 24, 28))]
            cases += [Case("perturb_h", models[0], dt), Case("perturb_h", flat(28 if gpu else 24), dt)]
            cases += [Case("update", flat(26 if gpu else 22), dt, d) for d in (1, 2, 4, 8, 16, 32)]
            cases += [Case("hiso_round", models[0], dt), Case("hiso_round", flat(28 if gpu else 24), dt)]
            cases += [Case("replay", flat(24 if gpu else 20), dt, r) for r in (1, 10, 100)]
            cases += [Case("hiso_round", big[-1], dt)]
            continue
        top = 30 if gpu else 28
        cases += [Case("perturb", m, dt) for m in models]  # the headline rows first
        cases += [Case("perturb", flat(k), dt) for k in range(16, top + 1, 2)]
        cases += [Case("perturb_h", m, dt) for m in models[:1]]
        cases += [Case("perturb_h", flat(k), dt) for k in range(16, top - 1, 2)]
        upd = flat(26 if gpu else 22)
        cases += [Case("update", upd, dt, d) for d in (1, 2, 4, 8, 16, 32)]
        cases += [Case("update", models[0], dt, d) for d in ((1, 4, 32) if gpu else (1, 4))]
        cases += [Case("hiso_round", m, dt) for m in models[:1]]
        cases += [Case("hiso_round", flat(k), dt) for k in range(16, (28 if gpu else 24) + 1, 4)]
        rep = flat(24 if gpu else 20)
        cases += [Case("replay", rep, dt, r) for r in (1, 10, 100)]
        cases += [Case("replay", models[0], dt, r) for r in ((1, 10, 100) if gpu else (1, 10))]
        for m in models[1:]:  # the rest of the large models last: a run under a time budget drops them first
            cases += [Case("hiso_round", m, dt), Case("update", m, dt, 8)]
    return list(dict.fromkeys(cases))  # no duplicates


# ------------------------------------------------------------------------------------------------------ providers
def fused_backends(device: str) -> list[str]:
    """Compiled hiso backends usable on ``device`` (the Triton interpreter on the CPU is a test tool: excluded)."""
    from hiso_kernels.backends import AUTO_ORDER

    dev = torch.device(device)
    names = [b for b in hk.available_backends(dev) if b != "torch"]
    if dev.type == "cpu":
        names = [b for b in names if b != "triton"]
    order = AUTO_ORDER.get(dev.type, ())
    return sorted(names, key=lambda b: order.index(b) if b in order else len(order))  # preferred backend first


#: the torch reference materialises every direction in fp32: include it only below this many element x terms
REFERENCE_LIMIT = 1 << 20


def providers(case: Case, device: str, *, with_reference: bool = True) -> list[str]:
    """Provider names for a case, in table order."""
    backends = fused_backends(device)
    out = list(backends)
    if with_reference and case.numel * case.terms <= REFERENCE_LIMIT:
        out.append("torch")
    if backends and case.kernel == "update":
        out.append(f"per-direction:{backends[0]}")
    if backends and case.kernel == "replay":
        out.append(f"per-round:{backends[0]}")
    if backends and case.kernel == "perturb_h" and not is_flat(case.shape):
        out.append(f"{backends[0]}+check")  # the default check_hessian=True: one extra read of H
    out += ["eager", "compile", "copy"]
    out += [f"generator:{b}" for b in backends]
    if case.kernel == "perturb" and case.numel * case.terms <= 1 << 30:  # a 4 GiB fp32 buffer at most (7B: skipped)
        out.append("randn")
    return out


def is_fused(provider: str) -> bool:
    return provider in BACKENDS and provider != "torch"


def make_state(case: Case, device: str, seed: int = 0):
    """Parameters ~ N(0, 0.02) in the case's dtype (pages touched) and, for kernels with H, H ~ U(0.5, 2) in fp32."""
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.empty(s, dtype=DTYPES[case.dtype], device=device).normal_(0, 0.02, generator=g)
              for s in case.shapes]
    hessian = None
    if case.uses_h:
        hessian = [torch.empty(s, dtype=torch.float32, device=device).uniform_(0.5, 2.0, generator=g)
                   for s in case.shapes]
    return params, hessian


# --- the eager MeZO loop, as MeZO's trainer writes it (torch.manual_seed, then per tensor torch.normal, mul, add) ---
# The loops below are plain functions so that ``compile`` can wrap the very same code with torch.compile. The seed is
# set outside the loop body (as MeZO does, once before the loop); torch.compile'd random ops draw their own seeds
# from torch's default generator, so the compiled loop is just as reproducible.


def mezo_perturb_loop(params, scaling_factor: float, eps: float):
    """MeZO's zo_perturb_parameters: z ~ N(0, 1) per tensor in the parameter dtype, x <- x + scaling_factor z eps."""
    for param in params:
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        param.data = param.data + scaling_factor * z * eps


def mezo_perturb_h_loop(params, hessian, scaling_factor: float, eps: float):
    """The same loop scaled by 1/sqrt(H) (HiSo's perturbation), rounded back to the parameter dtype."""
    for param, h in zip(params, hessian, strict=True):
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        param.data = (param.data + scaling_factor * z * eps / torch.sqrt(h)).to(param.dtype)


def mezo_update_loop(params, lr: float, projected_grad: float):
    """MeZO's zo_update (no weight decay): z regenerated from the seed, x <- x - lr (projected_grad z)."""
    for param in params:
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        param.data = param.data - lr * (projected_grad * z)


def hiso_round_loop(params, hessian, a: float, b: float, beta: float, h_min: float):
    """A HiSo round written the MeZO way:
    zs = z / sqrt(H);  x <- x - a zs;  H <- max(beta H + (1 - beta) (b zs)^2, h_min)."""
    for param, h in zip(params, hessian, strict=True):
        z = torch.normal(mean=0, std=1, size=param.data.size(), device=param.data.device, dtype=param.data.dtype)
        zs = z / torch.sqrt(h)
        param.data = (param.data - a * zs).to(param.dtype)
        h.data = torch.clamp(beta * h + (1 - beta) * (b * zs) ** 2, min=h_min)


def _loops(case: Case, compiled: bool):
    fns = {"perturb": mezo_perturb_loop, "perturb_h": mezo_perturb_h_loop, "update": mezo_update_loop,
           "hiso_round": hiso_round_loop, "replay": hiso_round_loop}
    fn = fns[case.kernel]
    if compiled:
        # A fresh dynamo cache per case: every case compiles static shapes for itself and never hits the recompile
        # limit (past it, torch.compile silently runs the loop eagerly). HISO_BENCH_COMPILE_DYNAMIC=1 compiles with
        # dynamic=True instead, to check that the baseline is not handicapped by static shapes: on a quiet 2-core
        # machine both ran SmolLM2's 272-tensor loop in the same time (0.72 s; both call ATen's normal and fuse only
        # the multiply-add); on a loaded one the static graph was 2-3x slower.
        torch._dynamo.reset()
        dynamic = True if os.environ.get("HISO_BENCH_COMPILE_DYNAMIC", "") == "1" else None
        fn = torch.compile(fn, dynamic=dynamic)
    return fn


def _seeds(n: int) -> list[int]:
    return [1000 + i for i in range(n)]


def make_callable(case: Case, provider: str, params, hessian, device: str) -> Callable[[], object]:
    """One call = one complete operation of the case (a perturbation of the whole list; an update with all its
    directions; a replay of all its rounds). Repeated calls keep the state finite (tiny steps)."""
    seeds = _seeds(case.terms)
    coefs = [LR * 0.5] * case.terms  # one value: a torch.compile'd loop sees the same float and never recompiles
    curv = [0.5] * case.terms
    kernel = case.kernel
    if provider == "copy":
        return make_copy(case.min_bytes, device)[0]
    if provider.startswith("generator:"):
        impl = BACKENDS[provider.split(":", 1)[1]]
        dev = torch.device(device)
        return lambda: impl.directions_sum(seeds[0], case.terms, 0, case.numel, Distribution.GAUSSIAN, dev)
    if provider == "randn":
        buf = torch.empty(case.numel * case.terms, dtype=torch.float32, device=device)
        return lambda: torch.randn(buf.shape, out=buf)
    if provider in ("eager", "compile"):
        loop = _loops(case, provider == "compile")
        if kernel == "perturb":
            return lambda: (torch.manual_seed(seeds[0]), loop(params, 1.0, MU))
        if kernel == "perturb_h":
            return lambda: (torch.manual_seed(seeds[0]), loop(params, hessian, 1.0, MU))
        if kernel == "update":
            def run_update():
                for s in seeds:  # one regeneration pass per direction, as MeZO's trainer would do it
                    torch.manual_seed(s)
                    loop(params, LR, 0.5)
            return run_update
        if kernel in ("hiso_round", "replay"):
            def run_rounds():
                for s in seeds:
                    torch.manual_seed(s)
                    loop(params, hessian, coefs[0], curv[0], BETA, H_MIN)
            return run_rounds
    check = provider.endswith("+check")
    name = provider.split(":", 1)[-1].removesuffix("+check")
    if kernel == "perturb":
        return lambda: hk.perturb_(params, seeds[0], MU, backend=name)
    if kernel == "perturb_h":
        return lambda: hk.perturb_(params, seeds[0], MU, hessian=hessian, backend=name, check_hessian=check)
    if kernel == "update":
        if provider.startswith("per-direction:"):
            def per_direction():
                for p in range(case.terms):
                    hk.zo_update_(params, seeds[0], [p], [coefs[p]], backend=name)
            return per_direction
        return lambda: hk.zo_update_(params, seeds[0], range(case.terms), coefs, backend=name)
    if kernel == "hiso_round":
        return lambda: hk.hiso_round_(params, hessian, seeds[0], [0], coefs, curv, beta=BETA, h_min=H_MIN,
                                      backend=name, check_hessian=False)
    if kernel == "replay":
        if provider.startswith("per-round:"):
            def per_round():
                for s in seeds:
                    hk.hiso_round_(params, hessian, s, [0], coefs[:1], curv[:1], beta=BETA, h_min=H_MIN,
                                   backend=name, check_hessian=False)
            return per_round
        rounds = [hk.Round([s], [0], coefs[:1], curv[:1]) for s in seeds]
        return lambda: hk.replay_(params, rounds, hessian=hessian, beta=BETA, h_min=H_MIN, backend=name,
                                  check_hessian=False)
    raise ValueError(f"unknown provider {provider!r} for {case.label()}")


#: the copy roofline is measured on at most this many bytes (read + write) and scaled linearly above: bandwidth is flat
#: at these sizes, and a copy of a 7B model with its H would not fit beside the model.
COPY_CAP = {"cpu": 2 << 30, "cuda": 8 << 30}


def make_copy(nbytes: int, device: str) -> tuple[Callable[[], object], float]:
    """dst <- src on two uint8 buffers of nbytes/2 each: reads nbytes/2 and writes nbytes/2 (the same bytes a kernel
    with minimal traffic nbytes moves). Returns (callable, scale) with time(nbytes) = scale * time(callable)."""
    cap = COPY_CAP["cuda" if torch.device(device).type == "cuda" else "cpu"]
    moved = min(nbytes, cap)
    half = max(moved // 2, 1)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.zeros(half, dtype=torch.uint8, device=device)
    return (lambda: dst.copy_(src)), nbytes / (2 * half)


# ------------------------------------------------------------------------------------------------------ timing
def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: str, *, min_repeats: int = 5, max_repeats: int = 30,
               target_s: float = 1.0, warmup: int = 1) -> list[float]:
    """Seconds per call, repeated until ``min_repeats`` and ``target_s`` of measured time are reached (or
    ``max_repeats``). CPU: perf_counter around the call; GPU: CUDA events around the call, which include the host's
    launch time whenever the host is slower than the device (the eager loop's case)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < max_repeats:
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= min_repeats and sum(times) >= target_s:
            break
    return times


def percentile(data: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) without numpy."""
    xs = sorted(data)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "p20_s": percentile(times, 20), "p80_s": percentile(times, 80),
            "repeats": len(times)}


# ------------------------------------------------------------------------------------------------------ memory
def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: ``echo 5 > /proc/self/clear_refs``) to its current RSS. Without it a
    warm-up peak (torch.compile, first allocations) would hide the call's own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak RSS: VmHWM from /proc/self/status where it exists, else ru_maxrss.

    Both are the same high-water mark, but ru_maxrss also keeps the peak recorded when any thread of the process
    exited (Linux folds the address space's peak into the process's maxrss at each thread exit), so after a reset it
    can still report the warm-up's peak; VmHWM is reset by clear_refs alone.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def probe_memory_here(case: Case, provider: str, device: str) -> dict:
    """Peak-memory delta of one call, measured in this process (run it in a fresh one: see memory_delta)."""
    params, hessian = make_state(case, device)
    fn = make_callable(case, provider, params, hessian, device)
    fn()
    fn()  # warm-up: compilation, launch-plan caches, allocator pools
    synchronize(device)
    gc.collect()
    if torch.device(device).type == "cuda":
        return cuda_peak_delta(fn, device)
    reset = _reset_peak_rss()
    before = peak_rss_bytes()
    fn()
    after = peak_rss_bytes()
    method = "peak RSS (VmHWM), reset after warm-up" if reset else \
        "peak RSS, not resettable here: a warm-up peak may hide the call's"
    return {"mem_delta_bytes": after - before, "mem_method": method}


def cuda_peak_delta(fn: Callable[[], object], device: str) -> dict:
    """GPU peak-memory delta of one (warm) call, in this process: the caching allocator's own accounting."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return {"mem_delta_bytes": torch.cuda.max_memory_allocated(device) - base, "mem_method": "max_memory_allocated"}


def memory_delta(case: Case, provider: str, device: str, timeout_s: float = 600) -> dict:
    """CPU: a fresh subprocess per (case, provider), because a process's peak RSS only grows (the subprocess builds
    its own state). GPU: use :func:`cuda_peak_delta` on the state already allocated."""
    arg = json.dumps({"case": dataclasses.asdict(case), "provider": provider, "device": device})
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-memory", arg], capture_output=True,
                             text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"mem_delta_bytes": None, "mem_method": "timeout"}
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"mem_delta_bytes": None, "mem_method": f"probe failed: {why}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ conditions
def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def conditions(device: str) -> dict:
    """What a reader needs to reproduce or discount the numbers."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "hiso_kernels": hk.__version__,
        "direction_spec": hk.SPEC_VERSION,
        "git_commit": _git_commit(),
        "backends": {name: BACKENDS[name].availability()[1] for name in hk.available_backends()},
        "platform": platform.platform(),
        "compile_dynamic": os.environ.get("HISO_BENCH_COMPILE_DYNAMIC", "") == "1",
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        info.update({
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "gpu_sms": props.multi_processor_count,
            "cuda_runtime_torch": torch.version.cuda,
        })
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


# ------------------------------------------------------------------------------------------------------ derivation
def derive(rows: list[dict]) -> list[dict]:
    """Add the relative metrics to measured rows (each: case fields + provider + median_s/p20_s/p80_s [+ mem]).

    Within a case: copy time and generator time give the two roofline terms; eager and compile times give speedups.
    """
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["provider"]] = r
    for r in rows:
        case = by_case[r["case"]]
        t = r["median_s"]
        min_bytes = r["min_bytes"]
        copy = case.get("copy")
        t_copy = copy["median_s"] if copy else None
        gen = r["provider"].startswith("generator:") or r["provider"] == "randn"
        r["eff_GBps"] = None if gen else min_bytes / t / 1e9
        r["pct_copy"] = None if (gen or t_copy is None) else 100 * t_copy / t
        r["elems_per_s"] = r["numel"] * r["terms"] / t
        baseline = gen or r["provider"] == "copy"  # speedups only for rows that compute the kernel
        for base in ("eager", "compile"):
            b = case.get(base)
            r[f"speedup_vs_{base}"] = b["median_s"] / t if b and not baseline else None
        # roofline only for a fused call (per-direction / per-round rows make several passes by design)
        backend = r["provider"].removesuffix("+check")
        g = case.get(f"generator:{backend}")
        if is_fused(backend) and t_copy is not None and g is not None:
            t_mem, t_gen = t_copy, g["median_s"]
            r["t_mem_s"], r["t_gen_s"] = t_mem, t_gen
            r["roofline_s"] = max(t_mem, t_gen)
            r["pct_roofline"] = 100 * r["roofline_s"] / t
            r["bound"] = "generator" if t_gen > t_mem else "memory"
        if r["provider"] == "randn":
            own = case.get(f"generator:{fused_first(case)}")
            r["note"] = (f"generator is {r['median_s'] / own['median_s']:.2f}x faster" if own else "")
    return rows


def fused_first(case: dict[str, dict]) -> str | None:
    for name in case:
        if name.startswith("generator:"):
            return name.split(":", 1)[1]
    return None


# ------------------------------------------------------------------------------------------------------ targets
def _row(rows, case_key, provider):
    for r in rows:
        if r["case"] == case_key and r["provider"] == provider:
            return r
    return None


def check_targets(rows: list[dict], device: str, model: str = "smollm2-135m", dtype: str = "bf16") -> list[dict]:
    """The issue's targets, each: what, measured, required, met, margin (how far above / below) and a note."""
    gpu = torch.device(device).type == "cuda"
    out = []

    def add(what, measured, required, higher_is_better=True, note=""):
        if measured is None:
            out.append({"target": what, "measured": None, "required": required, "met": None,
                        "margin": "not measured", "note": note})
            return
        met = measured >= required if higher_is_better else measured <= required
        # by how much, as a ratio to the requirement: "misses (0.63x required)" is 37 % short
        unit = "required" if higher_is_better else "limit"
        margin = f"{measured / required:.2f}x {unit}"
        out.append({"target": what, "measured": measured, "required": required, "met": met, "margin": margin,
                    "note": note})

    backends = list(dict.fromkeys(r["provider"] for r in rows if is_fused(r["provider"])))
    floor = 80.0 if gpu else 70.0
    for r in rows:
        if r.get("pct_roofline") is not None and not r["provider"].endswith("+check"):
            note = f"{r['bound']}-bound (t_mem {r['t_mem_s'] * 1e3:.3g} ms, t_gen {r['t_gen_s'] * 1e3:.3g} ms)"
            if r["pct_roofline"] < floor:
                note += "; " + _why_slow(r)
            add(f"{r['provider']} {r['kernel']} {r['shape']} {r['dtype']} x{r['terms']}: % of roofline",
                r["pct_roofline"], floor, note=note)
    key = Case("perturb", model, dtype).key
    for b in backends:
        fused = _row(rows, key, b)
        for base, need in (("eager", 4.0 if gpu else 3.0), ("compile", 1.5)):
            add(f"{b} perturb {model} {dtype}: speedup over {base} MeZO loop",
                fused and fused.get(f"speedup_vs_{base}"), need)
        if fused and fused.get("mem_delta_bytes") is not None:
            pb = Case("perturb", model, dtype).param_bytes
            add(f"{b} perturb {model} {dtype}: peak-memory delta, % of parameter bytes",
                100 * fused["mem_delta_bytes"] / pb, 1.0, higher_is_better=False)
    eager = _row(rows, key, "eager")
    if eager and eager.get("mem_delta_bytes") is not None:
        lt = Case("perturb", model, dtype).largest_tensor_bytes
        out.append({"target": f"eager perturb {model} {dtype}: peak-memory delta / largest tensor (expected 3-4x)",
                    "measured": eager["mem_delta_bytes"] / lt, "required": None, "met": None, "margin": "reference",
                    "note": ""})
    for r in rows:
        if r["provider"] == "randn":
            case = {x["provider"]: x for x in rows if x["case"] == r["case"]}
            for b in backends:
                g = case.get(f"generator:{b}")
                if g:
                    add(f"generator:{b} vs torch.randn, {r['shape']} ({r['numel']} values): speed ratio",
                        r["median_s"] / g["median_s"], 1.0)
    if gpu:
        for r in rows:
            if r["kernel"] in ("update", "replay") and r["terms"] > 1 and is_fused(r["provider"]) and r.get("t_gen_s"):
                one = _row(rows, Case(r["kernel"], r["shape"], r["dtype"], 1).key, r["provider"])
                per_term = r["median_s"] / r["terms"]
                gen_per_term = r["t_gen_s"] / r["terms"]
                out.append({"target": f"{r['provider']} {r['kernel']} {r['shape']} x{r['terms']}: time per term vs "
                            "generator-only time per term", "measured": per_term / gen_per_term, "required": None,
                            "met": None, "margin": "-> 1 is ideal",
                            "note": "" if not one else f"1-term call {one['median_s'] * 1e3:.3g} ms"})
    return out


def _single_thread_below() -> int | None:
    """The cpu backend's size threshold for using more than one thread (None if it has none)."""
    try:
        from hiso_kernels.backends import cpu as cpu_backend

        return getattr(cpu_backend, "PARALLEL_MIN_WORK", None)
    except ImportError:
        return None


def _why_slow(r: dict) -> str:
    """A first explanation for a kernel below its roofline, from the numbers alone."""
    limit = _single_thread_below()
    if r["provider"] == "cpu" and limit and r["numel"] * r["terms"] < limit and torch.get_num_threads() > 1:
        # the generator-only kernel has no such threshold, so the generator term assumes every thread
        return (f"the cpu backend runs one thread below PARALLEL_MIN_WORK = {limit} element x terms, the generator "
                "term uses all of them; plus fixed per-call costs")
    if r["median_s"] < 2e-3:
        # A tiny call still pays Python dispatch (torch.library op, validation, program packing) and an OpenMP or
        # kernel launch: about 0.1-0.3 ms on the CPU, tens of microseconds on a GPU.
        gap = 1e6 * (r["median_s"] - r["roofline_s"])
        return f"{gap:.0f} us above the roofline: at this size fixed per-call costs (Python dispatch, launch) weigh"
    if r["kernel"] in ("hiso_round", "replay") and r["bound"] == "generator":
        return "the H update (division, square root, second accumulator) is work the generator-only kernel does not do"
    if r["bound"] == "generator":
        return "per-element work beyond the generator (load, convert, round, store) is not hidden"
    return "below copy bandwidth: access pattern or threading"


# ------------------------------------------------------------------------------------------------------ output
CSV_FIELDS = ["kernel", "shape", "dtype", "terms", "numel", "provider", "median_s", "p20_s", "p80_s", "repeats",
              "min_bytes", "eff_GBps", "pct_copy", "elems_per_s", "speedup_vs_eager", "speedup_vs_compile", "t_mem_s",
              "t_gen_s", "roofline_s", "pct_roofline", "bound", "mem_delta_bytes", "mem_method", "note"]


def row_for(case: Case, provider: str, stats: dict, **extra) -> dict:
    row = {"case": case.key, "kernel": case.kernel, "shape": case.shape, "dtype": case.dtype, "terms": case.terms,
           "numel": case.numel, "provider": provider, "min_bytes": case.min_bytes}
    row.update(stats)
    row.update(extra)
    return row


def _fmt_time(s) -> str:
    if s is None:
        return ""
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _fmt(x, spec="{:.3g}") -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def _fmt_bytes(b) -> str:
    if b is None:
        return ""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b} B"


def _fmt_rate(x) -> str:
    if x is None:
        return ""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _shape_label(shape: str, numel: int) -> str:
    return shape if is_flat(shape) else f"{shape} ({numel / 1e6:.1f} M)"


def markdown(rows: list[dict], targets: list[dict], cond: dict, title: str) -> str:
    lines = [f"# {title}", ""]
    load = cond.get("load_average_1_5_15")
    load_end = cond.get("load_average_at_end_1_5_15")
    gpu = f"{cond['gpu']}, " if cond.get("gpu") else ""
    lines += [
        f"{cond['date']} - {gpu}{cond['cpu_model']}, {cond['cpu_count']} CPUs, {cond['torch_threads']} torch threads - "
        f"torch {cond['torch']}, triton {cond['triton']}, python {cond['python']}, hiso_kernels {cond['hiso_kernels']}"
        f" (commit {cond.get('git_commit')})" + (f" - load average (1 min) at start {load[0]:.2f}" if load else "")
        + (f", at end {load_end[0]:.2f}" if load_end else "")
        + (f" - {cond['wall_s']} s" if cond.get("wall_s") else ""),
        "",
        "The load average counts this run's own threads too (up to the torch thread count): compare the start value "
        "with zero. Times: median over repeats (p20-p80 in brackets). GB/s: minimal bytes of the kernel / time. "
        "% copy: a copy of the same bytes in the same process. Roofline = max(t_mem, t_gen): t_mem = minimal bytes at "
        "copy bandwidth, t_gen = the generator-only kernel drawing the same element x directions. Peak mem: growth of "
        "the peak during one call (CPU: RSS, fresh subprocess; GPU: max_memory_allocated). Fused kernels with H run "
        "with check_hessian=False; `+check` rows show the default.",
        "",
    ]
    if targets:
        lines += ["## Targets", "", "| target | measured | required | result | note |", "|---|---|---|---|---|"]
        for t in targets:
            res = {True: "met", False: "**missed**", None: ""}[t["met"]]
            lines.append(f"| {t['target']} | {_fmt(t['measured'])} | {_fmt(t['required'])} | {res} ({t['margin']}) | "
                         f"{t['note']} |")
        lines.append("")
    for kernel, (ktitle, *_rest) in KERNELS.items():
        krows = [r for r in rows if r["kernel"] == kernel]
        if not krows:
            continue
        unit = KERNELS[kernel][3]
        lines += [f"## {ktitle}", "",
                  f"| shape | dtype | {unit or 'terms'} | provider | time | GB/s | % copy | "
                  f"elem{'xdir' if unit else ''}/s"
                  " | vs eager | vs compile | t_mem / t_gen | % roofline | bound | peak mem |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in krows:
            terms = f"t_mem {_fmt_time(r.get('t_mem_s'))} / t_gen {_fmt_time(r.get('t_gen_s'))}" \
                if r.get("t_mem_s") is not None else ""
            lines.append(
                f"| {_shape_label(r['shape'], r['numel'])} | {r['dtype']} | {r['terms']} | {r['provider']} | "
                f"{_fmt_time(r['median_s'])} [{_fmt_time(r['p20_s'])}-{_fmt_time(r['p80_s'])}] | "
                f"{_fmt(r.get('eff_GBps'))} | {_fmt(r.get('pct_copy'), '{:.0f}%')} | "
                f"{_fmt_rate(r.get('elems_per_s'))} | "
                f"{_fmt(r.get('speedup_vs_eager'), '{:.2f}x')} | {_fmt(r.get('speedup_vs_compile'), '{:.2f}x')} | "
                f"{terms} | {_fmt(r.get('pct_roofline'), '{:.0f}%')} | {r.get('bound') or ''} | "
                f"{_fmt_bytes(r.get('mem_delta_bytes'))} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def read_csv(path: str) -> list[dict]:
    import csv

    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out = {}
            for k, v in r.items():
                if v in ("", None):
                    out[k] = None
                    continue
                try:
                    out[k] = int(v)
                except ValueError:
                    try:
                        out[k] = float(v)
                    except ValueError:
                        out[k] = v
            out["case"] = Case(out["kernel"], out["shape"], out["dtype"], out["terms"]).key
            rows.append(out)
    return rows


#: one colour per provider in every panel
_COLORS = {"cpu": "tab:blue", "cuda": "tab:blue", "triton": "tab:cyan", "torch": "tab:gray", "eager": "tab:red",
           "compile": "tab:orange", "copy": "black", "randn": "tab:pink", "cpu+check": "tab:olive",
           "cuda+check": "tab:olive"}


def _color(prov: str) -> str:
    if prov in _COLORS:
        return _COLORS[prov]
    if prov.startswith("generator:"):
        return "tab:green" if prov.endswith(("cpu", "cuda")) else "tab:olive"
    if prov.startswith(("per-direction:", "per-round:")):
        return "tab:purple"
    return "tab:brown"


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "not measured in this run", transform=ax.transAxes, ha="center", va="center")


def plot(rows: list[dict], path: str, title: str) -> bool:
    """Four panels: perturb GB/s over the flat sweep; update element x directions/s over D; replay time per round over
    R; model-list times per kernel. Returns False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    styles = {"eager": ":", "compile": "-.", "copy": "--"}

    ax = axes[0][0]
    dtype = rows[0]["dtype"] if rows else "bf16"
    pr = [r for r in rows if r["kernel"] == "perturb" and is_flat(r["shape"]) and r["dtype"] == dtype]
    for prov in dict.fromkeys(r["provider"] for r in pr):
        if prov == "randn":
            continue
        pts = sorted((r["numel"], r["min_bytes"] / r["median_s"] / 1e9) for r in pr if r["provider"] == prov)
        label = prov if not prov.startswith("generator:") else f"{prov} (bytes / t_gen)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(prov, "-"), marker="o", label=label,
                color=_color(prov))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("elements")
    ax.set_ylabel("effective GB/s (minimal bytes / time)")
    ax.set_title(f"perturb, {dtype}, one flat tensor")
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[0][1]
    ur = [r for r in rows if r["kernel"] == "update"]
    shapes = sorted({r["shape"] for r in ur}, key=lambda s: (not is_flat(s), s))
    if ur:
        shape = shapes[0]
        for prov in dict.fromkeys(r["provider"] for r in ur if r["shape"] == shape):
            if prov == "copy":
                continue
            pts = sorted((r["terms"], r["elems_per_s"]) for r in ur if r["provider"] == prov and r["shape"] == shape)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(prov, "-"), marker="o", label=prov,
                    color=_color(prov))
        ax.set_title(f"multi-direction update, {shape}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("directions")
    ax.set_ylabel("element x directions / s")
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1][0]
    rr = [r for r in rows if r["kernel"] == "replay"]
    if rr:
        shape = sorted({r["shape"] for r in rr}, key=lambda s: (not is_flat(s), s))[0]
        for prov in dict.fromkeys(r["provider"] for r in rr if r["shape"] == shape):
            if prov == "copy":
                continue
            pts = sorted((r["terms"], r["median_s"] / r["terms"]) for r in rr
                         if r["provider"] == prov and r["shape"] == shape)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], styles.get(prov, "-"), marker="o", label=prov,
                    color=_color(prov))
        ax.set_title(f"replay of HiSo rounds, {shape}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("rounds")
    ax.set_ylabel("ms per round")
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1][1]
    mr = [r for r in rows if not is_flat(r["shape"]) and r["terms"] == 1 and r["provider"] != "randn"]
    if mr:
        model = mr[0]["shape"]
        mr = [r for r in mr if r["shape"] == model]
        kernels = list(dict.fromkeys(r["kernel"] for r in mr))
        provs = list(dict.fromkeys(r["provider"] for r in mr))
        width = 0.8 / max(len(provs), 1)
        for i, prov in enumerate(provs):
            ys = []
            for k in kernels:
                r = next((x for x in mr if x["kernel"] == k and x["provider"] == prov), None)
                ys.append(r["median_s"] * 1e3 if r else 0)
            ax.bar([j + i * width for j in range(len(kernels))], ys, width, label=prov, color=_color(prov))
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kernels))])
        ax.set_xticklabels(kernels)
        ax.set_yscale("log")
        ax.set_ylabel("ms per call")
        ax.set_title(f"{model} parameter list, {mr[0]['dtype']}")
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.07))  # below: bars stay visible
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_outputs(rows: list[dict], targets: list[dict], cond: dict, out_dir: str, stem: str, title: str) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    md = os.path.join(out_dir, f"{stem}.md")
    png = os.path.join(out_dir, f"{stem}.png")
    text = markdown(rows, targets, cond, title)
    if plot(rows, png, title):
        text += f"\n![{title}]({os.path.basename(png)})\n"
        paths.append(png)
    with open(md, "w") as f:
        f.write(text)
    paths.append(md)
    csv_path = os.path.join(out_dir, f"{stem}.csv")
    write_csv(rows, csv_path)
    paths.append(csv_path)
    js = os.path.join(out_dir, f"{stem}.json")
    with open(js, "w") as f:
        json.dump({"conditions": cond, "targets": targets}, f, indent=2, default=str)
    paths.append(js)
    return paths


# ------------------------------------------------------------------------------------------------------ runner
class Runner:
    """Measures cases on one device in one process: every provider of a case back to back, state shared."""

    def __init__(self, device: str, *, target_s: float, min_repeats: int, max_repeats: int, memory: Callable[[Case,
                 str], bool] = lambda c, p: False, budget_s: float | None = None, slow_s: float = 1.0, log=print):
        self.device = device
        self.slow_s = slow_s
        self.target_s = target_s
        self.min_repeats = min_repeats
        self.max_repeats = max_repeats
        self.memory = memory
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.rows: list[dict] = []
        self.skipped: list[str] = []
        self.log = log

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def run(self, cases: Iterable[Case], skip: Callable[[Case, str], bool] = lambda c, p: False,
            defer: Callable[[Case, str], bool] = lambda c, p: False) -> list[dict]:
        """Measure every provider of every case; ``skip`` drops a (case, provider), ``defer`` moves it after all the
        others (expensive rows that should not starve the rest of a time budget)."""
        deferred: list[tuple[Case, str]] = []
        self._state_key = self._state = None
        for case in cases:
            provs = []
            for prov in providers(case, self.device):
                if skip(case, prov):
                    continue
                (deferred.append((case, prov)) if defer(case, prov) else provs.append(prov))
            self._run_case(case, provs)
        for case, prov in deferred:
            self._run_case(case, [prov])
        self._state_key = self._state = None
        return derive(self.rows)

    def _run_case(self, case: Case, provs: list[str]) -> None:
        if not provs:
            return
        if self.out_of_time():
            self.skipped.append(f"{case.label()} ({', '.join(provs)}): time budget exhausted")
            return
        key = (case.shape, case.dtype, case.uses_h)
        if self._state_key != key:
            self._state_key = self._state = None
            torch._dynamo.reset()  # compiled loops may keep the old tensors alive
            gc.collect()
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
            try:
                self._state = make_state(case, self.device)
            except (RuntimeError, MemoryError) as exc:  # e.g. torch.cuda.OutOfMemoryError: skip, keep going
                self.log(f"  {case.label():<45} state allocation FAILED: {type(exc).__name__}: {str(exc)[:120]}")
                self.skipped.append(f"{case.label()}: could not allocate the parameters ({type(exc).__name__})")
                return
            self._state_key = key
        params, hessian = self._state
        for prov in provs:
            if self.out_of_time():
                self.skipped.append(f"{case.label()} {prov}: time budget exhausted")
                continue
            self.rows.append(self.measure(case, prov, params, hessian))

    def measure(self, case: Case, prov: str, params, hessian) -> dict:
        t0 = time.perf_counter()
        extra: dict = {}
        try:
            if prov == "copy":
                fn, scale = make_copy(case.min_bytes, self.device)
                if scale != 1.0:
                    extra["note"] = f"copy measured on {_fmt_bytes(case.min_bytes / scale)}, scaled x{scale:.3g}"
            else:
                fn, scale = make_callable(case, prov, params, hessian, self.device), 1.0
            warm = time.perf_counter()
            fn()  # first call: compilation (torch.compile, Triton JIT), plan caches
            synchronize(self.device)
            first = time.perf_counter() - warm
            if prov == "compile":
                extra["note"] = f"first call (compile) {first:.1f} s"
            # slow providers (the eager loop over a whole model) get fewer repeats, so a full run stays affordable
            min_repeats = self.min_repeats if first * scale < self.slow_s else min(3, self.min_repeats)
            times = time_calls(fn, self.device, min_repeats=min_repeats, max_repeats=self.max_repeats,
                               target_s=self.target_s, warmup=1 if prov == "compile" else 0)
            times = [t * scale for t in times]
            stats = summarize(times)
            if self.memory(case, prov) and torch.device(self.device).type == "cuda":
                extra.update(cuda_peak_delta(fn, self.device))
            del fn
        except Exception as exc:  # a provider that fails is reported, not fatal (e.g. torch.compile on a bare box)
            self.log(f"  {case.label():<45} {prov:<22} FAILED: {type(exc).__name__}: {exc}")
            gc.collect()
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()  # after an out-of-memory error, give the next provider a clean pool
            return row_for(case, prov, {"median_s": math.nan, "p20_s": math.nan, "p80_s": math.nan, "repeats": 0},
                           note=f"failed: {type(exc).__name__}: {str(exc)[:120]}")
        if self.memory(case, prov) and torch.device(self.device).type != "cuda":
            extra.update(memory_delta(case, prov, self.device))
        row = row_for(case, prov, stats, **extra)
        mem = f"  mem {_fmt_bytes(row.get('mem_delta_bytes'))}" if "mem_delta_bytes" in row else ""
        self.log(f"  {case.label():<45} {prov:<22} {_fmt_time(stats['median_s']):>10} "
                 f"[{_fmt_time(stats['p20_s'])}-{_fmt_time(stats['p80_s'])}] x{stats['repeats']}{mem}"
                 f"  ({time.perf_counter() - t0:.1f} s)")
        return row


def _probe_main(arg: str) -> None:
    spec = json.loads(arg)
    case = Case(**spec["case"])
    print(json.dumps(probe_memory_here(case, spec["provider"], spec["device"])))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe-memory":
        _probe_main(sys.argv[2])
    else:
        print(__doc__)
