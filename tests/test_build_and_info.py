"""Build-side checks: every .cu file compiles with nvcc for sm_80 and sm_90 (when nvcc is present) with clean PTX and
no register spills, the CUDA extension links against the static CUDA runtime and imports without a GPU, setup.py
parses architecture lists and fails loudly when a forced CUDA build fails, the integer codes agree between Python and
C++, `python -m hiso_kernels.info` reports, and a missing native part makes automatic selection fall back."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import hiso_kernels as hk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))


def ptxas_report(log: str) -> dict[str, dict]:
    """nvcc -Xptxas -v output -> {kernel: {"registers", "spill_stores", "stack"}} (names demangled when c++filt is
    installed)."""
    out = {}
    for m in re.finditer(r"Compiling entry function '(\S+)' for '(\w+)'\n(?:[^\n]*Function properties[^\n]*\n)?"
                         r"\s*(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                         r"[^\n]*Used (\d+) registers", log):
        name = m.group(1)
        if shutil.which("c++filt"):
            name = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
            name = re.sub(r"^void |\(.*$|hiso::(cuda::\(anonymous namespace\)::)?", "", name)
        out[name] = {"registers": int(m.group(6)), "spill_stores": int(m.group(4)), "stack": int(m.group(3))}
    return out


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(c) for c in CU_FILES])
def test_cuda_sources_compile(tmp_path, cu, arch):
    cmd = [NVCC, "-std=c++17", "-O3", "-fmad=false", f"-I{ROOT}/csrc/include", f"-I{os.path.dirname(cu)}",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", "-c", cu, "-o",
           str(tmp_path / "k.o")]
    res = subprocess.run([*cmd[:-4], "-Xptxas", "-v", *cmd[-4:]], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    kernels = ptxas_report(res.stderr)
    assert kernels, res.stderr[-2000:]
    print(f"sm_{arch} registers / spill bytes per kernel (ptxas -v):")  # pytest -s or -rA shows it
    for name, r in sorted(kernels.items()):
        print(f"  {r['registers']:>3} regs {r['spill_stores']:>3} B spills  {name}")
    assert not {k: r for k, r in kernels.items() if r["spill_stores"]}, "register spills"
    # contraction off and IEEE division / square root: the PTX must not contain fma or approximate sqrt / div
    ptx = subprocess.run([*cmd[:-4], "-ptx", cu, "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    text = (tmp_path / "k.ptx").read_text()
    assert "fma.rn.f32" not in text
    assert "sqrt.approx" not in text and "div.approx" not in text and "div.full" not in text
    assert ".ftz" not in text


def _setup_module():
    """setup.py's helpers, without running setup() (it runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("hiso_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_setup_parses_architecture_suffixes():
    archs, bad = _setup_module().parse_cuda_archs("8.0;9.0a, 10.0a;100f;12.0+PTX;sm_86;86;bogus;7")
    assert archs == [("80", False), ("90a", False), ("100a", False), ("100f", False), ("120", True), ("86", False),
                     ("86", False)]
    assert bad == ["bogus", "7"]


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_setup_drops_architectures_nvcc_cannot_build(monkeypatch, capsys):
    mod = _setup_module()
    monkeypatch.setenv("HISO_CUDA_ARCH_LIST", "30;80;9.0a;75+PTX")  # nvcc 12 / 13 cannot build sm_30
    assert mod._cuda_archs(NVCC) == [("80", False), ("90a", False), ("75", True)]
    assert "cannot build sm_30" in capsys.readouterr().out
    monkeypatch.setenv("HISO_CUDA_ARCH_LIST", "30;35")
    with pytest.raises(RuntimeError, match="no buildable CUDA architecture"):
        mod._cuda_archs(NVCC)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_forced_cuda_build_fails_loudly(monkeypatch):
    """HISO_BUILD_CUDA=1 turns a failed CUDA build into a failed install; automatic mode warns and goes on."""
    from setuptools import Distribution, Extension

    mod = _setup_module()
    cmd = mod.BuildExt(Distribution({"name": "hiso"}))
    cmd.initialize_options()
    cmd.finalize_options()
    monkeypatch.delenv("HISO_REQUIRE_NATIVE", raising=False)
    monkeypatch.setenv("HISO_CUDA_ARCH_LIST", "30")  # nothing nvcc can build: fails before compiling anything
    ext = Extension("hiso_kernels._cuda", sources=[])
    ext.cuda_sources = ["csrc/cuda/zo_cuda.cu"]
    monkeypatch.setenv("HISO_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match=r"building hiso_kernels\._cuda failed"):
        cmd.build_extension(ext)
    monkeypatch.setenv("HISO_BUILD_CUDA", "auto")
    warned = []
    monkeypatch.setattr(cmd, "warn", warned.append)
    cmd.build_extension(ext)
    assert warned and "could not build hiso_kernels._cuda" in warned[0]


def test_integer_codes_agree_with_the_cpp_header():
    """One table each for dtypes, distributions and curvature rules: hiso_kernels/_codes.py and spec.py against
    csrc/include/hiso/codes.h."""
    from hiso_kernels._codes import DTYPE_CODES, DType
    from hiso_kernels.spec import CurvatureRule, Distribution

    with open(os.path.join(ROOT, "csrc", "include", "hiso", "codes.h")) as fh:
        text = fh.read()
    enums = {m.group(1): dict((k, int(v)) for k, v in re.findall(r"(k\w+)\s*=\s*(\d+)", m.group(2)))
             for m in re.finditer(r"enum (\w+) : int \{([^}]*)\}", text)}
    camel = {"FLOAT32": "kFloat32", "BFLOAT16": "kBFloat16", "FLOAT16": "kFloat16", "GAUSSIAN": "kGaussian",
             "RADEMACHER": "kRademacher", "NONE": "kRuleNone", "GSQ": "kRuleGsq", "STEIN": "kRuleStein"}
    for py_enum, cpp_name in ((DType, "DType"), (Distribution, "Distribution"), (CurvatureRule, "CurvatureRule")):
        assert enums[cpp_name] == {camel[m.name]: int(m) for m in py_enum}, cpp_name
    assert {d: int(c) for d, c in DTYPE_CODES.items()} == {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
    # no other file defines them
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True):
        if not path.endswith("codes.h"):
            with open(path) as fh:
                assert not re.search(r"enum \w+ : int \{ *k(Float32|Gaussian|RuleNone)", fh.read()), path


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_extension_builds_links_and_imports_without_gpu(tmp_path):
    """Force the CUDA build (as a compile-only machine would) and import the module: it must load and report no
    devices rather than crash."""
    build = tmp_path / "build"
    env = dict(os.environ, HISO_BUILD_CUDA="1", HISO_REQUIRE_NATIVE="1", HISO_CUDA_ARCH_LIST="80")
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", str(build), "--build-temp",
                          str(tmp_path / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    so = glob.glob(str(build / "hiso_kernels" / "_cuda*.so"))
    assert so, os.listdir(build / "hiso_kernels")
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_cuda', {so[0]!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.device_count(), m.runtime_version(), m.GROUPS_PER_CHUNK, m.ARCHS)\n"
        "why, version = m.probe(0)\n"
        "assert (why == '') == (m.device_count() > 0 and version > 0), (why, version)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, version, groups, archs = out.stdout.split()
    assert int(count) == torch.cuda.device_count() and int(groups) == 256 and version.startswith("13")
    assert archs == "80"


def test_info_reports():
    out = subprocess.run([sys.executable, "-m", "hiso_kernels.info"], capture_output=True, text=True, check=True)
    assert f"direction spec v{hk.SPEC_VERSION}" in out.stdout
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"  {name}" in out.stdout
    assert "automatic choice for cpu tensors" in out.stdout


def test_fallback_warns_and_still_works(monkeypatch):
    from hiso_kernels import backends

    monkeypatch.setattr(backends.BACKENDS["cpu"], "availability", lambda: (False, "pretend it is not built"))
    monkeypatch.setattr(backends, "_warned", set())
    x = torch.zeros(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hk.perturb_([x], 1, 1.0)
    assert any("pretend it is not built" in str(w.message) for w in caught)
    assert torch.equal(x, hk.directions(1, 5, backend="reference"))


def test_import_without_native_modules():
    """With the compiled modules hidden, the package imports and runs on the torch backend."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name in ('hiso_kernels._cpu', 'hiso_kernels._cuda'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, hiso_kernels as hk\n"
        "x = torch.zeros(4); hk.perturb_([x], 1, 1.0)\n"
        "print(hk.available_backends('cpu'))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'cpu'" not in out.stdout and "'reference'" in out.stdout
