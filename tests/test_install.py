"""``pip install .`` into a fresh virtual environment, then the ``hiso`` command from a folder outside the
repository: the wheel carries the packaged configs, the task specs and ``py.typed``; the installed torch (CPU here)
satisfies the dependency and nothing is downloaded; BoolQ, WiC and COPA jobs run on SuperGLUE-layout folders with a
saved model, and so does the packaged Fashion-MNIST config.

The fresh environment sees this interpreter's packages through a ``.pth`` file (torch and transformers are not
downloaded again), and the build uses ``--no-build-isolation`` (pybind11 and setuptools from here). ``-I`` (ignore
installed) keeps pip from touching any hiso installed in this interpreter's environment. About 3-4 minutes on two
shared cores, most of it the C++ build.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FASHION = Path(os.environ.get("HISO_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

pytestmark = pytest.mark.slow


def _source_copy(dest: Path) -> Path:
    """The tracked and untracked-but-not-ignored files (no build products, no venv): pip builds in the source tree."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    for f in files:
        src = REPO / f
        if src.is_file() and not src.is_symlink():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def _run(cmd, cwd, env, timeout=900):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_pip_install_in_a_fresh_venv_then_train_outside_the_repo(tmp_path):
    pytest.importorskip("transformers")
    src = _source_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    # --without-pip: pip, setuptools (>= 77 for the licence field) and pybind11 come from this environment too
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "_hiso_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HISO_REQUIRE_NATIVE="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HISO_BUILD_CUDA="0")
    work = tmp_path / "elsewhere"
    work.mkdir()

    # resolution: with torch (any build) present, installing hiso with its text extra needs nothing from an index
    report = tmp_path / "report.json"
    _run([py, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation", "--report", str(report),
          f"{src}[llm]"], work, env)
    assert [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]] == ["hiso"]

    _run([py, "-m", "pip", "install", "-q", "-I", "--no-deps", "--no-build-isolation", str(src)], work, env)
    hiso = venv / "bin" / "hiso"
    assert _run([hiso, "--version"], work, env).stdout.startswith("hiso ")
    probe = ("import hiso, importlib.resources as r, hiso_kernels.info as i; f = r.files('hiso'); "
             "print(hiso.__file__); print((f / 'py.typed').is_file(), (f / 'configs' / 'fashion_mnist.toml').is_file(),"
             " (f / 'tasks' / 'specs' / 'copa.toml').is_file()); print(i.report())")
    out = _run([py, "-c", probe], work, env).stdout.splitlines()
    assert out[0].startswith(str(venv)) and out[1] == "True True True"
    assert "cpu" in "\n".join(out[2:])

    # SuperGLUE-layout folders (folder names as SuperGLUE ships them) and a saved model, all outside the repository
    data = work / "SuperGLUE"
    shutil.copytree(REPO / "tests" / "data" / "superglue", data)
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_lm import make_tiny_lm

    model = make_tiny_lm(work / "my-model")
    common = ["--data-dir", str(data), "--model", str(model), "--rounds", "2", "--n-clients", "2",
              "--clients-per-round", "1", "--num-directions", "1", "--batch-size", "2", "--eval-every", "1",
              "--methods", "hiso", "--quiet", "--no-plot"]
    res = _run([hiso, "train", "--task", "boolq", *common, "--out", "boolq"], work, env)
    assert (work / "boolq" / "metrics.jsonl").is_file(), res.stdout
    script = ("import sys; from hiso.cli import main\n"
              f"for t in ('wic', 'copa'): assert main(['train', '--task', t, *{common!r}, '--out', t]) == 0")
    _run([py, "-c", script], work, env)
    for task in ("boolq", "wic", "copa"):
        rows = [json.loads(line) for line in (work / task / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["bytes_up"] > 0, task
    bad = subprocess.run([hiso, "train", "--task", "copa", "--data-dir", str(work / "nothing")], cwd=work, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1

    if (FASHION / "train-images-idx3-ubyte.gz").is_file():  # the packaged config, found by name
        _run([hiso, "train", "--config", "fashion_mnist", "--rounds", "1", "--num-train", "200", "--num-eval", "100",
              "--methods", "hiso", "--quiet", "--out", "fm"], work, env)
        assert (work / "fm" / "curves.png").is_file()
