"""Build of hiso's native parts: the C++ CPU kernels (always) and the CUDA kernels (when a toolkit is found).

Neither extension includes torch headers: they take raw addresses, so the build needs only pybind11 (and nvcc for
CUDA), runs in pip's isolated build environment, and one build works with any torch release.

Environment variables:
  HISO_SKIP_NATIVE=1        build no extension (pure Python; the torch and triton backends remain)
  HISO_REQUIRE_NATIVE=1     fail the install if an extension that should build does not (CI sets this)
  HISO_BUILD_CUDA=auto|1|0  CUDA extension: auto = when nvcc is found and a CUDA-enabled torch or an NVIDIA driver
                            is present (a failed build warns); 1 = always, and a failed CUDA build fails the install
                            (compile-only machines too); 0 = never
  HISO_CUDA_ARCH_LIST       e.g. "8.0;9.0", "80;90+PTX" or "9.0a;10.0a" (falls back to TORCH_CUDA_ARCH_LIST, then a
                            default); architectures this nvcc cannot build are dropped with a warning
  HISO_BUILD_JOBS           parallel C++ compile jobs (default: number of CPUs)
  CUDA_HOME / CUDA_PATH     toolkit location (else nvcc on PATH, else /usr/local/cuda)
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import shutil
import subprocess
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, has_flag
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;86;89;90;100;120+PTX"
# -ffp-contract=off and no fast-math: the direction spec needs every fp32 operation rounded on its own.
# -fno-math-errno lets sqrt vectorise (it changes no result); do not add -fno-fast-math, which turns errno back on
# and makes the Gaussian transform five times slower.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
# Added where the compiler takes them (GCC): keeps a zeroing loop a vector loop instead of a `rep stos` memset call
# per round of the CPU kernel (15% of a logged pass). Speed only, no result depends on it.
OPTIONAL_CXX_FLAGS = ["-fno-tree-loop-distribute-patterns"]
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-Xcompiler", "-fPIC", "-Xcompiler", "-ffp-contract=off"]


ON = ("1", "yes", "true", "on")


def _env_flag(name: str, default: str = "0") -> str:
    return os.environ.get(name, default).strip().lower()


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.exists(default) else None


def _cuda_lib_dir(nvcc: str) -> str | None:
    """Directory holding libcudart_static.a (nvcc may be a wrapper script outside the toolkit)."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.environ[var])
    candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "/usr/local/cuda"]
    for home in candidates:
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            d = os.path.join(home, sub)
            if os.path.exists(os.path.join(d, "libcudart_static.a")):
                return d
    return None


def _gpu_runtime_present() -> tuple[bool, str]:
    try:
        import torch  # visible only in non-isolated builds

        if torch.version.cuda is not None:
            return True, f"torch {torch.__version__} is CUDA-enabled"
    except Exception:
        pass
    if ctypes.util.find_library("cuda") or os.path.exists("/usr/lib/x86_64-linux-gnu/libcuda.so.1"):
        return True, "an NVIDIA driver (libcuda) is installed"
    return False, "neither a CUDA-enabled torch nor an NVIDIA driver was found"


def parse_cuda_archs(raw: str) -> tuple[list[tuple[str, bool]], list[str]]:
    """("8.0;9.0a;10.0f+PTX" ...) -> ([("80", False), ("90a", False), ("100f", True)], [items that are not
    architectures]). Suffixes: a / f (architecture- and family-specific targets of CUDA 12+), +PTX (also embed PTX)."""
    archs, bad = [], []
    for item in raw.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.upper().endswith("+PTX")
        num = (item[: -len("+PTX")] if ptx else item).replace(".", "").lower().removeprefix("sm_")
        suffix = num[-1] if num[-1:] in ("a", "f") else ""
        digits = num[: len(num) - len(suffix)]
        if not digits.isdigit() or len(digits) < 2:
            bad.append(item)
            continue
        archs.append((digits + suffix, ptx))
    return archs, bad


def nvcc_supported_archs(nvcc: str) -> set[str] | None:
    """The sm_XX codes this nvcc can build ("80", "90a", ...), or None if it cannot say (nvcc < 11.5)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return {code[len("sm_"):] for code in out.stdout.split() if code.startswith("sm_")}


def _cuda_archs(nvcc: str) -> list[tuple[str, bool]]:
    """The requested architectures that this nvcc can build. Raises (at build time, not at import) if none remain."""
    raw = os.environ.get("HISO_CUDA_ARCH_LIST") or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    archs, bad = parse_cuda_archs(raw)
    for item in bad:
        print(f"hiso: ignoring {item!r} in the CUDA arch list {raw!r} (not an architecture)", flush=True)
    supported = nvcc_supported_archs(nvcc)
    if supported is not None:  # nvcc lists plain codes; an a / f variant is judged by its base architecture
        dropped = [num for num, _ in archs if num.rstrip("af") not in supported]
        if dropped:
            print(f"hiso: {nvcc} cannot build sm_{', sm_'.join(dropped)}; building the others", flush=True)
        archs = [(num, ptx) for num, ptx in archs if num.rstrip("af") in supported]
    if not archs:
        raise RuntimeError(f"no buildable CUDA architecture in {raw!r} for {nvcc}")
    return archs


def _want_cuda() -> tuple[bool, str]:
    mode = _env_flag("HISO_BUILD_CUDA", "auto")
    if mode in ("0", "no", "false", "off"):
        return False, "HISO_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if nvcc is None:
        if mode in ON:
            raise RuntimeError("HISO_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return False, "nvcc not found"
    if mode in ON:
        return True, "HISO_BUILD_CUDA=1"
    ok, why = _gpu_runtime_present()
    return ok, why


class BuildExt(build_ext):
    """pybind11's build_ext plus nvcc for .cu sources and optional (warn-and-continue) extensions. A failure is fatal
    with HISO_REQUIRE_NATIVE=1, and for the CUDA extension with HISO_BUILD_CUDA=1 (asked for, so never skipped)."""

    def build_extension(self, ext):
        cuda = bool(getattr(ext, "cuda_sources", None))
        try:
            ext.extra_compile_args = list(ext.extra_compile_args or []) + [
                f for f in OPTIONAL_CXX_FLAGS if f not in ext.extra_compile_args and has_flag(self.compiler, f)]
            if cuda:
                ext.extra_objects = list(ext.extra_objects or []) + self._nvcc_compile(ext)
            super().build_extension(ext)
        except Exception as exc:
            if _env_flag("HISO_REQUIRE_NATIVE") in ON or (cuda and _env_flag("HISO_BUILD_CUDA", "auto") in ON):
                raise RuntimeError(f"hiso: building {ext.name} failed: {exc}") from exc
            self.warn(f"hiso: could not build {ext.name} ({exc}); the package falls back to other backends")

    def _nvcc_compile(self, ext) -> list[str]:
        nvcc = _find_nvcc()
        gencode = []
        archs = _cuda_archs(nvcc)
        for num, ptx in archs:
            gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
            if ptx:
                gencode += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
        # the module reports what it was built for (hiso_kernels._cuda.ARCHS, in python -m hiso_kernels.info)
        arch_names = ";".join(num + ("+PTX" if ptx else "") for num, ptx in archs)
        ext.define_macros = list(ext.define_macros or []) + [("HISO_CUDA_ARCHS", f'"{arch_names}"')]
        objects = []
        os.makedirs(self.build_temp, exist_ok=True)
        includes = [f"-I{os.path.join(ROOT, d)}" for d in ext.include_dirs if not os.path.isabs(d)]
        for src in ext.cuda_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, *NVCC_FLAGS, *includes, *gencode, "-c", os.path.join(ROOT, src), "-o", obj]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        return objects


def _openmp_flags() -> list[str]:
    if sys.platform == "darwin":
        return []  # Apple clang has no -fopenmp; the kernels run single-threaded there
    return ["-fopenmp"]


def extensions():
    if _env_flag("HISO_SKIP_NATIVE") in ("1", "yes", "true", "on"):
        print("hiso: HISO_SKIP_NATIVE set, building no native extension", flush=True)
        return []
    omp = _openmp_flags()
    exts = [
        Pybind11Extension(
            "hiso_kernels._cpu",
            sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))),
            include_dirs=["csrc/include", "csrc/cpu"],
            extra_compile_args=CXX_FLAGS + omp,
            extra_link_args=omp,
            cxx_std=17,
        )
    ]
    want, why = _want_cuda()
    print(f"hiso: CUDA extension {'enabled' if want else 'skipped'} ({why})", flush=True)
    if want:
        nvcc = _find_nvcc()
        lib_dir = _cuda_lib_dir(nvcc)
        if lib_dir is None:
            raise RuntimeError(f"libcudart_static.a not found next to {nvcc} (set CUDA_HOME)")
        ext = Pybind11Extension(
            "hiso_kernels._cuda",
            sources=_rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))),
            include_dirs=["csrc/include", "csrc/cuda"],
            extra_compile_args=CXX_FLAGS,
            library_dirs=[lib_dir],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            cxx_std=17,
        )
        ext.cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
        exts.append(ext)
    return exts


if __name__ == "__main__":  # pip and `python setup.py` run this file as __main__; tests import its helpers
    ParallelCompile("HISO_BUILD_JOBS", default=0).install()
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
