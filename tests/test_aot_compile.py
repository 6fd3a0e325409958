"""Every Triton kernel variant that the wrappers can launch compiles for sm_90 and sm_80 without a GPU
(``hiso_kernels.aot``), with the triton installed here and with triton 3.6.0 (the version on the lent GPU machine),
and its PTX shows what the kernels promise: no contraction, approximation or flush-to-zero, no barriers or shared
memory in the element path, vector loads and stores for aligned tensors.

Triton 3.6.0 lives in ``.cache/triton-3.6.0`` (``./run.sh test`` installs it there with ``pip install --target``).
Without it the 3.6.0 case is skipped, unless ``HISO_AOT_REQUIRED=1`` (set by run.sh), when it fails.
``HISO_AOT_ARCHS`` (default "90,80") chooses the targets.

Time: the compiles are the cost (about 200 of them, 1-5 s each). They are cached outside the checkout, in
``$HISO_CACHE_DIR`` (default ``~/.cache/hiso``), so a fresh clone on a machine that ran the suite before only binds
and looks up (Triton's cache key covers the kernel source, options and versions: a changed kernel recompiles). The
full analysis (SASS, ptxas registers and spills) runs for the device machine's triton 3.6.0; the installed version is
checked for sm_90 on its PTX only (``--ptx-only``: what pass or fail depends on), a quarter of the cost;
``HISO_AOT_FULL=1`` runs the full matrix for both."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = {"3.6.0": os.environ.get("HISO_AOT_TRITON_360", os.path.join(ROOT, ".cache", "triton-3.6.0"))}
ARCHS = [int(a) for a in os.environ.get("HISO_AOT_ARCHS", "90,80").split(",") if a.strip()]
#: constexpr variants per kernel and architecture: 3 dtypes x (no H, H read, gsq, stein) x 2 distributions x aligned,
#: plus the logged variants (exact restore in the kernel: LOG, rule none): 3 dtypes x (no H, H read) x 2 x aligned
EXPECTED = {"zo_program_kernel": 48 + 24, "directions_kernel": 2, "directions_sum_kernel": 2}


#: HISO_AOT_FULL=1: every architecture and the full analysis for the installed triton too (the default checks it for
#: the device's sm_90 on its PTX: about a quarter of the full cost, which CI cannot afford twice)
FULL = os.environ.get("HISO_AOT_FULL", "0") not in ("", "0")


def _archs(version: str) -> list[int]:
    return ARCHS if FULL or version != "installed" else [a for a in ARCHS if a == 90] or ARCHS[:1]


def _run_aot(version: str, tmp_path) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest.py; the interpreter never compiles
    path = [ROOT]
    if version != "installed":
        where = PINNED[version]
        if not os.path.isdir(os.path.join(where, "triton")):
            msg = f"triton {version} is not installed in {where} (./run.sh test installs it)"
            if os.environ.get("HISO_AOT_REQUIRED", "0") not in ("", "0"):
                pytest.fail(msg)
            pytest.skip(msg)
        path.insert(0, where)
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    cache = os.environ.get("HISO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "hiso")
    env["TRITON_CACHE_DIR"] = os.path.join(cache, f"triton-aot-{version}")
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "hiso_kernels.aot", "--json", str(out), "--jobs", str(os.cpu_count() or 1)]
    for arch in _archs(version):
        cmd += ["--arch", str(arch)]
    if version == "installed" and not FULL:
        cmd.append("--ptx-only")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    print(res.stdout[-20000:])  # the table of registers, spills, barriers and vector accesses (pytest -s, or -rA)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("version", ["installed", "3.6.0"])
def test_every_triton_variant_compiles(version, tmp_path):
    report = _run_aot(version, tmp_path)
    if version != "installed":
        assert report["triton"] == version
    assert not report["failures"]
    if version != "installed":  # the full analysis: registers and spills reported for every variant
        assert all(v["registers"] is not None and v["spill_stores"] is not None for v in report["variants"])
    counts = {}
    for v in report["variants"]:
        counts[(v["kernel"], v["arch"])] = counts.get((v["kernel"], v["arch"]), 0) + 1
    assert counts == {(k, a): n for k, n in EXPECTED.items() for a in _archs(version)}, counts
    for v in report["variants"]:
        name, cx, ptx = v["kernel"], v["constexprs"], v["ptx"]
        where = f"{name} sm_{v['arch']} {cx}"
        assert not any(v["ptx_forbidden"].values()), where
        if name == "directions_sum_kernel":
            continue  # its block sum (tl.sum) crosses warps through shared memory: a reduction, not the element path
        if cx.get("LOG"):
            # the logged variant counts and places its log entries with a block-wide sum and prefix sum (shared
            # memory and barriers, once per program after the rounds) for its one atomic reservation
            continue
        assert ptx["bar.sync"] == 0 and ptx["ld.shared"] == 0, f"{where}: barriers or shared memory {ptx}"
        if name == "zo_program_kernel" and cx["ALIGNED"]:
            x_vec = "ld.global.v4" if cx["DTYPE"] == 0 else "ld.global.v2"  # 16 bytes of fp32, 8 of bf16 / fp16
            st_vec = "st.global.v4" if cx["DTYPE"] == 0 else "st.global.v2"
            assert ptx[x_vec] >= 1 and ptx[st_vec] >= 1, f"{where}: x is not moved as vectors {ptx}"
            if cx["HAS_H"]:
                assert ptx["ld.global.v4"] >= 1, f"{where}: H is not loaded as vectors {ptx}"
