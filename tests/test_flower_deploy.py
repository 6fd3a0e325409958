"""A real loopback deployment: ``flower-superlink`` (with ``--database``) and three ``flower-supernode`` processes on
127.0.0.1 with ``--insecure``, ``flwr run`` of examples/flower for 3 rounds of the Fashion-MNIST CNN. The deployed
journal must equal, entry for entry, the in-process Grid's journal of the same App and run config, its records
must equal ``hiso train``'s simulator's, and its protocol bytes per round the simulator's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

flwr = pytest.importorskip("flwr")

from hiso.fl import Journal  # noqa: E402
from hiso.fl.server import RoundEntry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = {"num-server-rounds": 3, "clients-per-round": 3, "num-train": 120, "num-eval": 60, "batch-size": 16,
       "eval-every": 3, "num-directions": 2, "lr": 0.003, "deterministic-seeds": True, "timeout": 240.0}


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v)


def _entries(path) -> list[RoundEntry]:
    return [RoundEntry.decode(b) for b in Journal.open(str(path)).entries]


@pytest.mark.slow
def test_loopback_deployment_equals_the_in_process_grid_and_the_simulator(tmp_path):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed beside this Python")
    from hiso.fl import simulation
    from hiso.integrations import flower as hf

    try:
        simulation.build(simulation.SimulationConfig(num_train=10, num_eval=10))
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in RUN.items())
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "flower" / "deploy_local.py"), "--out",
                           str(tmp_path / "deploy"), "--nodes", "3", "--run-config", overrides, "--timeout", "900"],
                          capture_output=True, text=True, timeout=1000)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(
        p.read_text()[-3000:] for p in (tmp_path / "deploy").glob("*.log"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"deployment: {seconds:.0f} s for {summary['rounds']} rounds; protocol bytes per round down "
          f"{summary['bytes_down']}, up {summary['bytes_up']}")
    deployed = tmp_path / "deploy" / "run" / "journal.hsj"

    # the same App and run config over the in-process Grid
    import tomllib

    with open(ROOT / "examples" / "flower" / "pyproject.toml", "rb") as fh:
        run_config = {**tomllib.load(fh)["tool"]["flwr"]["app"]["config"], **RUN, "n-clients": 3,
                      "out": str(tmp_path / "inproc")}
    hf.drop_resident()
    grid = hf.InProcessGrid(hf.client_app, 3, run_config=run_config, node_ids=[11, 7, 3])  # any ids: slots count
    grid.run_server_app(hf.server_app)
    inproc = tmp_path / "inproc" / "journal.hsj"
    assert Journal.open(str(deployed)).header == Journal.open(str(inproc)).header
    assert Journal.open(str(deployed)).entries == Journal.open(str(inproc)).entries  # record for record, bytes too
    assert json.loads((tmp_path / "inproc" / "fingerprints.json").read_text()) == summary["fingerprints"]

    # and hiso train's simulator: the same records, the same protocol bytes per round
    config = hf.config_from_run_config(run_config)
    simulation.run(config, journal=str(tmp_path / "sim.hsj"))
    sim, dep = _entries(tmp_path / "sim.hsj"), _entries(deployed)
    assert [e.record for e in sim] == [e.record for e in dep]
    assert [e.meta["bytes_down"] for e in sim] == summary["bytes_down"]
    assert [e.meta["bytes_up"] for e in sim] == summary["bytes_up"]
