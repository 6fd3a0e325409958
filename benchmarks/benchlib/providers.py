"""Providers: the ways of computing a case (hiso backends, the eager MeZO loop, torch.compile of it, a copy, the
generator alone) and the state and callables they run on."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

import hiso_kernels as hk
from hiso_kernels.backends import BACKENDS
from hiso_kernels.spec import Distribution

from .cases import *
from .cases import _EXPECTED  # noqa: F401


def fused_backends(device: str) -> list[str]:
    """Compiled hiso backends usable on ``device`` (the Triton interpreter on the CPU is a test tool: excluded)."""
    from hiso_kernels.backends import AUTO_ORDER

    dev = torch.device(device)
    names = [b for b in hk.available_backends(dev) if b != "reference"]
    if dev.type == "cpu":
        names = [b for b in names if b != "triton"]
    order = AUTO_ORDER.get(dev.type, ())
    return sorted(names, key=lambda b: order.index(b) if b in order else len(order))  # preferred backend first


#: the reference backend materialises every direction in fp32: include it only below this many element x terms
REFERENCE_LIMIT = 1 << 20


def providers(case: Case, device: str, *, with_reference: bool = True) -> list[str]:
    """Provider names for a case, in table order."""
    backends = fused_backends(device)
    out = list(backends)
    if with_reference and case.numel * case.terms <= REFERENCE_LIMIT:
        out.append("reference")
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
    return provider in BACKENDS and provider != "reference"


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
