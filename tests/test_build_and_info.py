"""Build-side checks: every .cu file compiles with nvcc for sm_80 and sm_90 (when nvcc is present), the CUDA extension
links against the static CUDA runtime and imports without a GPU, `python -m hiso_kernels.info` reports, and a
missing native part makes automatic selection fall back with a warning."""

from __future__ import annotations

import glob
import os
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


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("cu", CU_FILES, ids=[os.path.basename(c) for c in CU_FILES])
def test_cuda_sources_compile(tmp_path, cu, arch):
    cmd = [NVCC, "-std=c++17", "-O3", "-fmad=false", f"-I{ROOT}/csrc/include", f"-I{os.path.dirname(cu)}",
           "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-Xcompiler", "-fPIC", "-c", cu, "-o",
           str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    # contraction off and IEEE division / square root: the PTX must not contain fma or approximate sqrt / div
    ptx = subprocess.run([*cmd[:-4], "-ptx", cu, "-o", str(tmp_path / "k.ptx")], capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    text = (tmp_path / "k.ptx").read_text()
    assert "fma.rn.f32" not in text
    assert "sqrt.approx" not in text and "div.approx" not in text and "div.full" not in text
    assert ".ftz" not in text


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
        "print(m.device_count(), m.runtime_version(), m.GROUPS_PER_CHUNK)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    count, version, groups = out.stdout.split()
    assert int(count) == torch.cuda.device_count() and int(groups) == 256 and version.startswith("13")


def test_info_reports():
    out = subprocess.run([sys.executable, "-m", "hiso_kernels.info"], capture_output=True, text=True, check=True)
    assert f"direction spec v{hk.SPEC_VERSION}" in out.stdout
    for name in ("torch", "cpu", "triton", "cuda"):
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
    assert torch.equal(x, hk.directions(1, 5, backend="torch"))


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
    assert "'cpu'" not in out.stdout and "torch" in out.stdout
