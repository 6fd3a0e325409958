"""The shipped Flower App deployed for real, and everything that can go wrong with a deployment.

* A loopback deployment (slow): ``flower-superlink --database FILE`` and three ``flower-supernode`` processes on
  127.0.0.1 with ``--insecure``, ``flwr run`` of examples/flower for 3 rounds of the Fashion-MNIST CNN, the SuperLink
  SIGKILLed once round 1 is journaled (round 2 open), restarted on the same database and port, and the run submitted
  again with ``resume = true``. The final journal must equal, entry for entry, the in-process Grid's journal of an
  uninterrupted run of the same App and run config (with the same fingerprint), its records ``hiso train``'s
  simulator's, and its protocol bytes per round the simulator's.
* The App's own resume (``resume = true``) in process, after its ServerApp died with a round open (fast).
* Every failure of a deployment (a SuperLink that exits or does not come back, ``flwr run`` failing, a ServerApp
  that dies while ``flwr run`` exits 0, SuperNodes that exit or do not reconnect, missing outputs) is a non-zero exit
  of ``deploy_local.py`` with a one-line reason: checked with fake Flower executables, without a deployment (fast).
"""

from __future__ import annotations

import importlib.util
import json
import os
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
DEPLOY = ROOT / "examples" / "flower" / "deploy_local.py"
RUN = {"num-server-rounds": 3, "clients-per-round": 3, "num-train": 120, "num-eval": 60, "batch-size": 16,
       "eval-every": 3, "num-directions": 2, "lr": 0.003, "deterministic-seeds": True, "timeout": 240.0}
RESTART_AFTER = 1  # the SuperLink is killed with round 2 open, and round 2 asked again after the resume


def _toml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v)


def _entries(path) -> list[RoundEntry]:
    return [RoundEntry.decode(b) for b in Journal.open(str(path)).entries]


def _app_run_config(**overrides) -> dict:
    """The App's run config (examples/flower/pyproject.toml) with ``overrides``."""
    import tomllib

    with open(ROOT / "examples" / "flower" / "pyproject.toml", "rb") as fh:
        return {**tomllib.load(fh)["tool"]["flwr"]["app"]["config"], **overrides}


def _fashion_mnist_or_skip():
    from hiso.fl import simulation

    try:
        simulation.build(simulation.SimulationConfig(num_train=10, num_eval=10))
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"Fashion-MNIST not available: {exc}")


def _run_in_process(run_config: dict, node_ids=(11, 7, 3)) -> None:
    from hiso.integrations import flower as hf

    hf.drop_resident()
    grid = hf.InProcessGrid(hf.client_app, len(node_ids), run_config=run_config, node_ids=list(node_ids))
    grid.run_server_app(hf.server_app)


@pytest.mark.slow
def test_loopback_deployment_survives_a_superlink_restart_and_equals_the_in_process_grid(tmp_path):
    if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("flower-superlink is not installed beside this Python")
    _fashion_mnist_or_skip()
    from hiso.fl import simulation
    from hiso.integrations import flower as hf

    overrides = " ".join(f"{k}={_toml(v)}" for k, v in RUN.items())
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(DEPLOY), "--out", str(tmp_path / "deploy"), "--nodes", "3",
                           "--run-config", overrides, "--restart-superlink-after", str(RESTART_AFTER),
                           "--timeout", "1200"], capture_output=True, text=True, timeout=1300)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr + "".join(
        p.read_text()[-3000:] for p in (tmp_path / "deploy").glob("*.log"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    restart = summary["restart"]
    print(f"deployment: {seconds:.0f} s for {summary['rounds']} rounds; the SuperLink killed after round "
          f"{restart['journaled_at_kill']} and back {restart['down_s']} s later, the SuperNodes "
          f"{restart['nodes_back_s']} s after that; first `flwr run` exit {restart['first_flwr_run_exit']}; the old "
          f"run {restart['old_run_status']}; protocol bytes per round down {summary['bytes_down']}, up "
          f"{summary['bytes_up']}")
    # the crash came after round 1 and before the end: the resumed ServerApp journaled the rest
    assert RESTART_AFTER <= restart["journaled_at_kill"] < RUN["num-server-rounds"]
    assert restart["first_flwr_run_exit"] != 0  # `flwr run --stream` lost its SuperLink
    # Flower's SuperExec and ServerApp watch their parent, but on a loaded 2-core machine a ServerApp has outlived its
    # crashed SuperLink by more than 90 s; the harness SIGKILLs such a child before the resume (no orphan can write
    # the journal), so what is asserted is that it was recorded, and that the resumed run equals the in-process grid
    assert restart["killed_children_left"] == len(restart["killed_children_left_commands"])
    print(f"children of the crashed SuperLink SIGKILLed after 90 s: {restart['killed_children_left_commands']}")
    # the SuperLink kept the old run (its database), but not alive: once its ServerApp's heartbeat lapsed, Flower
    # marked it failed; the run that finished is the resubmitted one
    assert restart["old_run_status"][0] == "finished:failed" and summary["run_id"] != restart["old_run"]
    deployed = tmp_path / "deploy" / "run" / "journal.hsj"

    # the same App and run config over the in-process Grid, uninterrupted
    run_config = _app_run_config(**RUN, **{"n-clients": 3, "out": str(tmp_path / "inproc")})
    _run_in_process(run_config)
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


def test_the_app_resumes_from_its_journal_after_its_serverapp_died_mid_round(tmp_path):
    """``resume = true``: a ServerApp that died with round 2 open (its nodes had answered) is started again on a new
    grid (new node ids: they re-join by proof, their state read from the state folder) and ends with the journal and
    fingerprint of an uninterrupted run."""
    _fashion_mnist_or_skip()
    from flwr.app import MessageType

    from hiso.integrations import flower as hf

    small = {**RUN, "num-server-rounds": 2, "num-train": 40, "num-eval": 10, "eval-every": 2, "n-clients": 2,
             "clients-per-round": 2}
    _run_in_process(_app_run_config(**small, out=str(tmp_path / "whole")), node_ids=(11, 7))

    class Died(Exception):
        pass

    class DyingGrid(hf.InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            if any(m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == "1" for m in messages):
                raise Died  # round index 1 (the second round) answered by the nodes, never journaled
            return replies

    run_config = _app_run_config(**small, out=str(tmp_path / "run"))
    nodes = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / "nodes")} for i in range(2)]
    hf.drop_resident()
    with pytest.raises(Died):
        DyingGrid(hf.client_app, 2, run_config=run_config, node_ids=[11, 7], node_configs=nodes).run_server_app(
            hf.server_app)
    assert len(Journal.open(str(tmp_path / "run" / "journal.hsj")).entries) == 1
    hf.drop_resident()  # new processes everywhere
    grid = hf.InProcessGrid(hf.client_app, 2, run_config={**run_config, "resume": True}, node_ids=[5, 9],
                            node_configs=nodes, run_id=2)
    grid.run_server_app(hf.server_app)
    whole, resumed = (Journal.open(str(tmp_path / d / "journal.hsj")) for d in ("whole", "run"))
    assert resumed.header == whole.header and resumed.entries == whole.entries
    prints = [(tmp_path / d / "fingerprints.json").read_text() for d in ("whole", "run")]
    assert prints[0] == prints[1]


# ------------------------------------------------------------------ failures, without a deployment
# Fake Flower executables (deploy_local.py --flower-bin) stand for the real ones; FAKE (comma-separated flags) says
# what they do. Each failure must end deploy_local.py with exit status 1 and one line "deploy_local: <reason>".
FAKE = r'''
import json, os, socket, sys, time
role, args, mode = os.path.basename(sys.argv[0]), sys.argv[1:], os.environ.get("FAKE", "").split(",")

def port_after(flag):
    return int(args[args.index(flag) + 1].rsplit(":", 1)[-1])

def link_up():
    text = open(os.path.join(os.environ["FLWR_HOME"], "config.toml")).read()
    try:
        socket.create_connection(("127.0.0.1", int(text.split("127.0.0.1:")[1].split('"')[0])), timeout=1).close()
        return True
    except OSError:
        return False

if role == "flower-superlink":
    with open("superlink-starts", "a+") as fh:
        fh.seek(0)
        starts = len(fh.read())
        fh.write("x")
    if "link-exits" in mode or ("link-stays-down" in mode and starts >= 1):
        sys.exit(3)
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port_after("--port")))
    server.listen(64)
    time.sleep(600)
elif role == "flower-supernode":
    if "node-exits" in mode:
        sys.exit(5)
    while True:  # like Flower's: retries a lost SuperLink, and says when it is back
        time.sleep(0.2)
        if not link_up():
            while not link_up():
                time.sleep(0.2)
            if "node-silent" not in mode:
                print("Connection successful after 1.00 seconds and 2 tries.", flush=True)
elif role == "flwr" and args[0] == "run":
    if "run-fails" in mode:
        sys.exit(print("Error: the SuperLink refused the FAB") or 1)
    print("Successfully started run 7", flush=True)
    if "journal" in mode:  # a ServerApp that journals round 1, then loses its SuperLink
        import importlib.util
        spec = importlib.util.spec_from_file_location("journal", os.environ["HISO_JOURNAL_PY"])
        journal = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(journal)
        config = args[args.index("--run-config") + 1]
        out = config.split("out='")[1].split("'")[0]
        os.makedirs(out, exist_ok=True)
        journal.Journal.create(os.path.join(out, "journal.hsj"), {"fake": True}).append(b"round 1")
        while link_up():
            time.sleep(0.2)
        sys.exit(1)
    if "run-hangs" in mode:
        time.sleep(600)
elif role == "flwr" and args[0] == "ls":
    status = "finished:failed" if "serverapp-dies" in mode else "finished:completed"
    print(json.dumps({"success": True, "runs": [{"run-id": "7", "status": status,
                                                 "status-details": "ServerApp exited with code 1"}]}))
elif role == "flwr" and args[:2] == ["supernode", "ls"]:
    print(json.dumps({"success": True, "nodes": [{"node-id": str(i), "status": "online"} for i in range(2)]}))
else:
    sys.exit(f"fake flower: unexpected {role} {args}")
'''


@pytest.fixture
def fake_flower(tmp_path, monkeypatch):
    folder = tmp_path / "bin"
    folder.mkdir()
    for role in ("flower-superlink", "flower-supernode", "flwr"):
        (folder / role).write_text(f"#!{sys.executable}\n{FAKE}")
        (folder / role).chmod(0o755)
    monkeypatch.setenv("HISO_JOURNAL_PY", str(ROOT / "hiso" / "fl" / "journal.py"))
    return folder


def _deploy_local_module():
    spec = importlib.util.spec_from_file_location("deploy_local", DEPLOY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _processes_of(folder: Path) -> list[int]:
    """Live processes started from ``folder`` (the fakes), from /proc."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder).encode() in cmdline and state != "Z":
            found.append(int(pid))
    return found


@pytest.mark.parametrize("mode, restart, reason", [
    ("link-exits", False, "flower-superlink exited with code 3 before it listened on 127.0.0.1:"),
    ("run-fails", False, "flwr run exited with code 1: Error: the SuperLink refused the FAB; see "),
    ("serverapp-dies", False, "run 7 ended finished:failed (ServerApp exited with code 1); see "),
    ("", False, "the run did not finish (no fingerprints.json in "),
    ("node-exits,run-hangs", False, "flower-supernode 0 exited with code 5; see "),
    ("journal,link-stays-down", True,
     "the SuperLink did not come back after the restart: flower-superlink exited with code 3 before it listened"),
    ("journal,node-silent", True, "SuperNodes [0, 1] did not reconnect 3 s after the SuperLink restart; see "),
    ("run-hangs", False, "the run did not finish within --timeout; see "),
])
def test_every_deployment_failure_is_a_nonzero_exit_with_a_one_line_reason(fake_flower, tmp_path, monkeypatch,
                                                                           capsys, mode, restart, reason):
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs Linux /proc")
    module = _deploy_local_module()
    module.NODES_BACK_S = 3.0
    monkeypatch.setenv("FAKE", mode)
    timeout = "3" if mode == "run-hangs" else "60"
    argv = ["--out", str(tmp_path / "out"), "--nodes", "2", "--flower-bin", str(fake_flower), "--timeout", timeout,
            "--run-config", "num-server-rounds=2"] + (["--restart-superlink-after", "1"] if restart else [])
    rc = module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith(f"deploy_local: {reason}"), (rc, err)
    deadline = time.monotonic() + 10
    while _processes_of(fake_flower) and time.monotonic() < deadline:  # and nothing it started is left running
        time.sleep(0.2)
    assert not _processes_of(fake_flower)


@pytest.mark.parametrize("argv, message", [
    (["--restart-superlink-after", "3", "--run-config", "num-server-rounds=3"], "must be in [1, 3)"),
    (["--restart-superlink-after", "0", "--run-config", "num-server-rounds=3"], "must be in [1, 3)"),
    (["--run-config", "resume=true"], "must not set out, n-clients or resume"),
    (["--run-config", "num-server-rounds"], "must be k=v pairs"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--run-config", "num-server-rounds=many"], "num-server-rounds must be an integer"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        _deploy_local_module().main(["--out", str(tmp_path), *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "flwr-home").exists()  # nothing started, nothing written


def test_an_earlier_run_in_out_is_refused(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "journal.hsj").write_bytes(b"HSJ")
    with pytest.raises(SystemExit) as exit_:
        _deploy_local_module().main(["--out", str(tmp_path)])
    assert exit_.value.code == 2 and "exists (an earlier run): use a fresh --out" in capsys.readouterr().err


def test_a_supernode_is_back_when_it_logs_a_reconnection_or_receives_from_the_new_superlink(tmp_path):
    # A node can come back without Flower 1.42's "Connection successful after ..." line (seen in a loaded full
    # suite: it retried for 95 s, then served the resubmitted run and never logged it). Lines before the offset (the
    # log's size at the crash) are the old SuperLink's and do not count.
    import types

    module = _deploy_local_module()
    old = b"INFO :      Received successfully\n"
    logs = [old + b"INFO :      Connection successful after 9.1 seconds and 3 tries.\n",
            old + b"INFO :      [RUN 2, ROUND join]\nINFO :      Received successfully\n",
            old + b"WARNING :   Connection attempt failed, retrying in 8.22 seconds\n"]
    for i, text in enumerate(logs):
        (tmp_path / f"supernode-{i}.log").write_bytes(text)
    online = {"nodes": [{"status": "online"}] * 3}
    stub = types.SimpleNamespace(n_nodes=2, out=tmp_path, check_alive=lambda: None, flwr_json=lambda *a: online)
    assert module.Deployment.wait_nodes_back(stub, [len(old)] * 2, timeout=5.0) < 5.0
    stub.n_nodes = 3
    with pytest.raises(module.DeployError, match=r"SuperNodes \[2\] did not reconnect 1 s after the SuperLink"):
        module.Deployment.wait_nodes_back(stub, [len(old)] * 3, timeout=1.0)
