"""Ahead-of-time compile of every Triton kernel variant that hiso_kernels' wrappers can launch, without a GPU.

    python -m hiso_kernels.aot [--arch 90 --arch 80] [--jobs N] [--json PATH] [--ptx-dir DIR] [--list]

The public functions (``perturb_``, ``zo_update_``, ``hiso_round_``, ``replay_``, ``directions``) and the generator-only
benchmark kernel are called on CPU tensors over a grid of inputs: every parameter dtype, with and without H, every
curvature rule and distribution, both rounding modes, aligned tensors and unaligned views (``big[1:]``), and integer
arguments equal to 1 and 16 (the values Triton specialises on), small and beyond 2^32. The Triton launches they make
are captured instead of run, bound with Triton's own specialisation code for each target (``GPUTarget("cuda", 90,
32)`` ...) and compiled with ``triton.compile``: the same source, signature, constants, attributes and options, hence
the same on-disk cache entries, as the JIT would use on a GPU of that architecture. So this also pre-warms the Triton
cache of a GPU machine before its first launch.

Checks (a failure exits non-zero):

* every captured launch compiles;
* the integer and pointer arguments create no variants: one compiled kernel per combination of ``tl.constexpr``
  values (``do_not_specialize``), so what is compiled here is all a GPU will ever compile;
* the PTX has no ``fma.rn.f32`` (contraction), no ``.approx`` and no ``.ftz`` instruction (docs/directions.md);
Reported per variant: registers and spill bytes (ptxas -v), barriers (``bar.sync``) and vector / scalar global loads
and stores in the PTX, and the matching SASS counts. Must run without ``TRITON_INTERPRET`` (triton reads it when it
is imported).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

PTX_FORBIDDEN = {"fma.rn.f32": r"\bfma\.rn\.f32\b", ".approx": r"\.approx\b", ".ftz": r"\.ftz\b"}
PTX_COUNTS = {
    "bar.sync": r"\bbar\.sync\b|\bbarrier\.sync\b",
    "ld.global.v4": r"\bld\.global(?:\.\w+)*\.v4\b",
    "ld.global.v2": r"\bld\.global(?:\.\w+)*\.v2\b",
    "ld.global": r"\bld\.global[\w.]*",
    "st.global.v4": r"\bst\.global(?:\.\w+)*\.v4\b",
    "st.global.v2": r"\bst\.global(?:\.\w+)*\.v2\b",
    "st.global": r"\bst\.global[\w.]*",
    "ld.shared": r"\bld\.shared\b",
}
SASS_COUNTS = {
    "LDG.128": r"\bLDG\.E\.128\b",
    "LDG.64": r"\bLDG\.E\.64\b",
    "LDG": r"\bLDG\b",
    "STG.128": r"\bSTG\.E\.128\b",
    "STG.64": r"\bSTG\.E\.64\b",
    "STG": r"\bSTG\b",
    "BAR": r"\bBAR\.SYNC\b",
}


def _require_compiler_mode() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("hiso_kernels.aot: unset TRITON_INTERPRET (the interpreter never compiles)")


# ------------------------------------------------------------------------------------------------ capture
def _triton_kernels():
    """Every @triton.jit kernel of the Triton backend's modules (name -> JITFunction)."""
    from triton.runtime.jit import JITFunction

    from .backends import triton as backend_module

    modules = [backend_module] + [sys.modules[m] for m in getattr(backend_module, "KERNEL_MODULES", ())]
    found = {}
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[name] = obj
    return found


@contextlib.contextmanager
def capturing():
    """Within the block, Triton launches of the backend are recorded instead of run, and the backend accepts CPU
    tensors as a GPU backend would accept CUDA tensors. Yields the list of (kernel name, args, kwargs)."""
    from .backends import BACKENDS

    kernels = _triton_kernels()
    launches = []
    backend = BACKENDS["triton"]
    saved = {"availability": backend.availability, "supports": backend.supports}
    backend.availability = lambda: (True, "captured by hiso_kernels.aot")
    backend.supports = lambda device: True

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):
            launches.append((name, args, dict(kwargs)))

        return run

    for name, k in kernels.items():
        k.run = recorder(name)  # JITFunction.__getitem__ calls self.run(grid=..., warmup=False, ...)
    try:
        yield launches
    finally:
        for k in kernels.values():
            k.__dict__.pop("run", None)
        backend.availability = saved["availability"]
        backend.supports = saved["supports"]


#: (seed, direction, offset, numel, rounds): 1 and 16 in every integer position (Triton's specialisation values),
#: values beyond 2^31 (int64 signatures) and a plain case
INTEGER_PROBES = [(1, 1, 1, 1, 1), (16, 16, 16, 16, 16), (2**40 + 1, 3, 2**33 + 1, 4099, 2), (0, 0, 0, 64, 1)]


def _tensor(numel: int, dtype, aligned: bool):
    import torch

    if aligned:
        return torch.zeros(numel, dtype=dtype)
    return torch.zeros(numel + 1, dtype=dtype)[1:]  # an unaligned view, like big[1:]


def drive_wrappers() -> list:
    """Call every public operation over the input grid; return the captured launches."""
    import torch

    import hiso_kernels as hk

    from .backends import BACKENDS
    from .spec import Distribution

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    modes = (("none", False), ("none", True), ("gsq", True), ("stein", True))  # (curvature rule, with H)
    with capturing() as launches:
        for dtype, (rule, with_h), dist, sr, aligned, ints in itertools.product(
            dtypes, modes, ("gaussian", "rademacher"), (False, True), (True, False), INTEGER_PROBES
        ):
            seed, p, offset, numel, rounds = ints
            params = [_tensor(numel, dtype, aligned), _tensor(3, dtype, True)]
            hessian = [_tensor(numel, torch.float32, aligned) + 1, _tensor(3, torch.float32, True) + 1] if with_h \
                else None
            kw: dict[str, Any] = dict(offset=offset, distribution=dist, stochastic_rounding=sr, backend="triton")
            if rule == "none":
                hk.perturb_(params, seed, 1e-3, direction=p, hessian=hessian, **kw)
                hk.zo_update_(params, seed, [p] * rounds, [1e-3] * rounds, hessian=hessian, weight_decay=1e-4, **kw)
            else:
                hk.hiso_round_(params, hessian, seed, [p] * rounds, [1e-3] * rounds, [0.5] * rounds,
                               curvature_rule=rule, **kw)
            rnds = [hk.Round([seed], [p], [1e-3], [0.5] if with_h else None) for _ in range(rounds)]
            hk.replay_(params, rnds, hessian=hessian, curvature_rule=rule, **kw)
            if rule == "none":  # the logged variant (exact restore in the kernel): the optimizers' perturbation
                bound = hk.bind(params, hessian=hessian, check_hessian=False, **kw)
                bound.apply_logged(bound.shift_program(seed, p, [1e-3, -1e-3]), 1)
        for dist, (seed, p, offset, numel, rounds) in itertools.product(("gaussian", "rademacher"), INTEGER_PROBES):
            hk.directions(seed, numel, direction=p, offset=offset, distribution=dist, device="cpu", backend="triton")
            BACKENDS["triton"].directions_sum(seed, rounds, offset, numel, Distribution.parse(dist),
                                              torch.device("cpu"))
    return launches


# ------------------------------------------------------------------------------------------------ bind and compile
def bind(kernel, args, kwargs, arch: int):
    """Triton's own specialisation of one launch for ``GPUTarget("cuda", arch, 32)``: (signature, constexprs, attrs,
    options), exactly what JITFunction.run computes on such a GPU."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound, specialization, options)


def _variant_key(name, arch, packed) -> str:
    options, signature, constexprs, attrs = packed
    return json.dumps({"kernel": name, "arch": arch, "signature": signature, "options": options.__dict__,
                       "constexprs": {str(k): repr(v) for k, v in sorted(constexprs.items())},
                       "attrs": {str(k): v for k, v in sorted(attrs.items())}}, sort_keys=True, default=str)


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path
    flags = ["-lineinfo", "-v", "--fmad=false", f"--gpu-name={nv.sm_arch_from_capability(arch)}"]
    if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")  # as triton >= 3.7 itself runs ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        res = subprocess.run([ptxas, *flags, src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "stack_frame": int(stack.group(1)) if stack else None}


def _ptx_counts(ptx: str) -> dict:
    counts = {k: len(re.findall(rx, ptx)) for k, rx in PTX_COUNTS.items()}
    for op in ("ld.global", "st.global"):
        counts[f"{op}.scalar"] = counts.pop(op) - counts[f"{op}.v4"] - counts[f"{op}.v2"]
    return counts


class _analysis_cache:
    """The PTX / SASS / ptxas analysis of one PTX text, kept beside Triton's own cache (a warm run of this tool then
    costs binding and cache lookups only)."""

    def __init__(self, ptx: str, arch: int):
        import hashlib

        from triton import knobs

        digest = hashlib.sha256(f"{ANALYSIS_VERSION}\n{arch}\n{ptx}".encode()).hexdigest()
        self.path = os.path.join(knobs.cache.dir, "hiso-aot", digest + ".json")

    def load(self):
        try:
            with open(self.path) as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def store(self, analysis: dict) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            json.dump(analysis, fh)
        os.replace(tmp, self.path)


#: bump when the analysis (the patterns above, the ptxas report) changes, to invalidate cached analyses
ANALYSIS_VERSION = 1


def _sass(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        res = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", fh.name], capture_output=True, text=True)
    return res.stdout


_JOBS: list = []  # (kernel name, arch, args, kwargs, ptx dir): set before the worker processes fork
_PTX_ONLY = [False]  # set before the workers fork, like _JOBS


def compile_variant(index: int) -> dict:
    """Compile one variant; return its report (an "error" entry instead when it does not compile)."""
    name, arch, args, kwargs, ptx_dir = _JOBS[index]
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler import compile as triton_compile

    kernel = _triton_kernels()[name]
    out = {"kernel": name, "arch": arch}
    t0 = time.perf_counter()
    try:
        options, signature, constexprs, attrs = bind(kernel, args, kwargs, arch)
        out["constexprs"] = {kernel.params[k[0]].name: v for k, v in constexprs.items()}
        out["signature"] = {k: v for k, v in signature.items() if v != "constexpr"}
        compiled = triton_compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                  options=options.__dict__)
    except Exception as exc:  # the report says which variant failed and why
        out["error"] = f"{type(exc).__name__}: {exc}"
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = compiled.asm["ptx"]
    sass = None
    cached = _analysis_cache(ptx, arch)
    analysis = cached.load()
    if _PTX_ONLY[0]:
        # what the tests assert on: the PTX alone (the SASS dump and the ptxas -v run cost as much as the compile)
        analysis = {"ptx_forbidden": {k: len(re.findall(rx, ptx)) for k, rx in PTX_FORBIDDEN.items()},
                    "ptx": _ptx_counts(ptx), "sass": None, "sass_instructions": None, "registers": None,
                    "spill_stores": None, "spill_loads": None, "stack_frame": None}
    elif analysis is None or ptx_dir:
        sass = _sass(compiled.asm["cubin"])
        analysis = {
            "ptx_forbidden": {k: len(re.findall(rx, ptx)) for k, rx in PTX_FORBIDDEN.items()},
            "ptx": _ptx_counts(ptx),
            "sass": {k: len(re.findall(rx, sass)) for k, rx in SASS_COUNTS.items()},
            "sass_instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, flags=re.M)),
            **_ptxas_report(ptx, arch),
        }
        cached.store(analysis)
    out.update(analysis)
    if ptx_dir and not _PTX_ONLY[0]:
        tag = "-".join(f"{k}{v}" for k, v in out["constexprs"].items() if k != "BLOCK_GROUPS")
        stem = os.path.join(ptx_dir, f"{name}-sm{arch}-{tag}")
        with open(stem + ".ptx", "w") as fh:
            fh.write(ptx)
        with open(stem + ".sass", "w") as fh:
            fh.write(sass or "")
    return out


def problems(report: dict) -> list[str]:
    """What is wrong with one compiled variant (empty if nothing). Spills are reported, not failed: a few bytes of
    spill cost little next to the generator's arithmetic, and their amount moves with the Triton release."""
    if "error" in report:
        return [report["error"]]
    return [f"PTX contains {k} x{n}" for k, n in report["ptx_forbidden"].items() if n]


# ------------------------------------------------------------------------------------------------ main
def run(archs, jobs: int, ptx_dir: str | None = None, only=None, log=print, ptx_only: bool = False) -> dict:
    """Compile every variant for ``archs``; ``ptx_only`` skips the SASS and ptxas register / spill analysis (about
    half the time; the PTX checks that decide pass or fail are the same)."""
    _require_compiler_mode()
    _PTX_ONLY[0] = ptx_only
    import triton

    t0 = time.perf_counter()
    launches = drive_wrappers()
    kernels = _triton_kernels()
    if only:
        launches = [launch for launch in launches if launch[0] in only]
    variants: dict[str, tuple] = {}
    by_constexprs: dict[tuple, set] = {}
    failures = []
    for arch in archs:
        for name, args, kwargs in launches:
            try:
                packed = bind(kernels[name], args, kwargs, arch)
            except Exception as exc:
                failures.append(f"{name}: binding failed: {type(exc).__name__}: {exc}")
                continue
            key = _variant_key(name, arch, packed)
            variants.setdefault(key, (name, arch, args, kwargs, ptx_dir))
            declared = tuple(sorted((kernels[name].params[k[0]].name, repr(v)) for k, v in packed[2].items()
                                    if kernels[name].params[k[0]].is_constexpr))
            by_constexprs.setdefault((name, arch, declared, repr(packed[0])), set()).add(key)
    for (name, arch, cvals, _), keys in sorted(by_constexprs.items()):
        if len(keys) > 1:
            sigs = [json.loads(k)["signature"] for k in sorted(keys)]
            differ = sorted({a for s in sigs for a in s if len({str(t.get(a)) for t in sigs}) > 1})
            seen = {a: sorted({str(t.get(a)) for t in sigs}) for a in differ}
            failures.append(f"{name} sm_{arch} {dict(cvals)}: the argument values create {len(keys)} variants "
                            f"(types seen: {seen}); mark the arguments do_not_specialize")
    log(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}): {len(launches)} launches captured from "
        f"the wrappers, {len(variants)} variants for sm_{', sm_'.join(map(str, archs))}")
    if ptx_dir:
        os.makedirs(ptx_dir, exist_ok=True)
    _JOBS[:] = list(variants.values())
    indices = range(len(_JOBS))
    if jobs > 1 and len(_JOBS) > 1:
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(_JOBS)), mp_context=ctx) as pool:
            reports = list(pool.map(compile_variant, indices))
    else:
        reports = [compile_variant(i) for i in indices]
    for r in reports:
        for p in problems(r):
            failures.append(f"{r['kernel']} sm_{r['arch']} {r.get('constexprs', '')}: {p}")
    result = {"triton": triton.__version__, "archs": list(archs), "launches": len(launches),
              "variants": reports, "failures": failures, "wall_s": round(time.perf_counter() - t0, 1)}
    log(summary(result))
    return result


def summary(result: dict) -> str:
    lines = [f"{'kernel':<24} {'arch':<6} {'constexprs':<44} {'regs':>4} {'spill':>5} {'bar':>3} "
             f"{'ld.v4/v2/sc':>12} {'st.v4/v2/sc':>12} {'LDG128/64':>9} {'sass':>5}"]
    for r in sorted(result["variants"], key=lambda r: (r["kernel"], r["arch"], str(r.get("constexprs")))):
        cx = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r.get("constexprs", {}).items()
                      if k != "BLOCK_GROUPS")
        if "error" in r:
            lines.append(f"{r['kernel']:<24} sm_{r['arch']:<3} {cx:<44} ERROR {r['error'][:200]}")
            continue
        p, s = r["ptx"], r["sass"] or {"LDG.128": "-", "LDG.64": "-"}
        lines.append(
            f"{r['kernel']:<24} sm_{r['arch']:<3} {cx:<44} {r['registers']!s:>4} {r['spill_stores']!s:>5} "
            f"{p['bar.sync']:>3} {p['ld.global.v4']:>4}/{p['ld.global.v2']}/{p['ld.global.scalar']:<4} "
            f"{p['st.global.v4']:>4}/{p['st.global.v2']}/{p['st.global.scalar']:<4} "
            f"{s['LDG.128']:>5}/{s['LDG.64']:<3} {r['sass_instructions']!s:>5}")
    lines.append(f"{len(result['variants'])} variants, {len(result['failures'])} failures, {result['wall_s']} s "
                 f"(triton {result['triton']})")
    lines += [f"FAIL {f}" for f in result["failures"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability x 10 (default: 90 and 80)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write the full report here")
    ap.add_argument("--ptx-dir", help="write each variant's PTX and SASS here")
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable; default: all)")
    ap.add_argument("--ptx-only", action="store_true",
                    help="check the PTX only: no SASS, no ptxas register / spill report (about half the time)")
    args = ap.parse_args(argv)
    result = run(args.arch or [90, 80], args.jobs, args.ptx_dir, args.kernel, ptx_only=args.ptx_only)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
