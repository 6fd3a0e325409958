"""Durability of ``hiso train``: SIGKILL at a random round, ``--resume``, the same final bits as an uninterrupted
run (Fashion-MNIST CNN, in subprocesses); the journal's integrity checks; ``hiso export`` from the log alone."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hiso.fl import Journal, JournalError

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--task", "fashion_mnist", "--methods", "hiso", "decomfl", "--rounds", "10", "--n-clients", "4",
        "--clients-per-round", "3", "--num-train", "160", "--num-eval", "40", "--batch-size", "16",
        "--eval-every", "3", "--lr", "3e-3", "--save-every", "4", "--quiet"]


def _env() -> dict:
    # one thread: results must not depend on how torch splits a convolution between threads
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def hiso_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "hiso.cli", *args]


def _fashion_mnist_or_skip():
    from hiso.tasks import get_task

    try:
        get_task("fashion_mnist", num_train=10, num_eval=10)
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def _entries(path: Path) -> int:
    try:
        return len(Journal.open(str(path)).entries)
    except (OSError, JournalError):  # not there yet, or caught between a write and its fsync
        return -1


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_sigkill_at_a_random_round_then_resume_gives_the_uninterrupted_fingerprint(tmp_path):
    _fashion_mnist_or_skip()
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen(hiso_cmd("train", *ARGS, "--out", str(whole)), env=_env(), cwd=tmp_path,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # kill during the second method's run, or the first's: a random round of either
    method = random.choice(["hiso", "decomfl"])
    kill_at = random.randint(1, 9)
    print(f"SIGKILL once {method}'s journal holds {kill_at} rounds")
    victim = subprocess.Popen(hiso_cmd("train", *ARGS, "--out", str(killed)), env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while _entries(killed / method / "journal.hsj") < kill_at:
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "fingerprints.json").exists() or method not in json.loads(
        (killed / "fingerprints.json").read_text())
    resumed = subprocess.run(hiso_cmd("train", "--resume", str(killed), "--quiet"), env=_env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert reference.wait(timeout=600) == 0, reference.stderr.read().decode()
    want = json.loads((whole / "fingerprints.json").read_text())
    got = json.loads((killed / "fingerprints.json").read_text())
    assert got == want and set(got) == {"hiso", "decomfl"}
    assert _rows(killed) == _rows(whole)  # the same evaluation rows, bytes and losses (wall time aside)
    for m in ("hiso", "decomfl"):  # the journals agree entry for entry
        assert Journal.open(str(killed / m / "journal.hsj")).entries == Journal.open(
            str(whole / m / "journal.hsj")).entries
        state = torch.load(killed / m / "model" / "model.pt")
        from hiso.fl.simulation import params_sha256

        assert params_sha256(state.values()) == want[m]
    # the log is the model: export rebuilds the same bits from the journal alone
    exported = subprocess.run(hiso_cmd("export", "--log", str(whole / "hiso" / "journal.hsj"), "--out",
                                       str(tmp_path / "exported")), env=_env(), capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    assert f"sha256 {want['hiso']}" in exported.stdout
    assert (tmp_path / "exported" / "model.pt").read_bytes() and (tmp_path / "exported" / "README.txt").exists()
