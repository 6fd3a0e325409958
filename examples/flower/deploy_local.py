"""A real Flower deployment on this machine: a SuperLink (persistent state, ``--database``) and N SuperNodes on
127.0.0.1 (``--insecure``), ``flwr run`` of this App, then checks that the run finished: every round journaled
and the model written. Exits non-zero on any failure, including a ``flwr run`` that "succeeds" while the
ServerApp died (Flower reports that only in the run's status).

    python examples/flower/deploy_local.py --out /tmp/hiso-deploy --nodes 3 --run-config "num-server-rounds=3"

Prints a JSON summary (timings, the journal path, per-round protocol bytes); ``--keep`` leaves the processes'
logs in ``--out``. Used by ``tests/test_flower_deploy.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


class Deployment:
    def __init__(self, out: Path, nodes: int, env: dict):
        self.out, self.nodes, self.env = out, nodes, env
        self.procs: list[subprocess.Popen] = []
        # Flower 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port (--host/--port)
        self.port = free_port()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.out,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def superlink(self) -> subprocess.Popen:
        return self.start("superlink", [
            tool("flower-superlink"), "--insecure", "--database", str(self.out / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])

    def supernode(self, i: int) -> subprocess.Popen:
        state = self.out / "node-state"
        config = f"partition-id={i} num-partitions={self.nodes} state-dir='{state}'"
        return self.start(f"supernode-{i}", [
            tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", config, "--host", "127.0.0.1", "--port", str(free_port())])

    def stop(self) -> None:
        for proc in self.procs:  # each was started in its own session: end it and its children
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config overrides (k=v ...)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    flwr_home = out / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    root = HERE.parents[1]
    env = {**os.environ, "FLWR_HOME": str(flwr_home),
           "PYTHONPATH": os.pathsep.join([str(root)] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                                                          else [])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    dep = Deployment(out, args.nodes, env)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{dep.port}"\n'
        'insecure = true\n')
    run_out = out / "run"
    rounds = None
    summary: dict = {"out": str(run_out)}
    started = time.monotonic()
    try:
        dep.superlink()
        time.sleep(2)
        for i in range(args.nodes):
            dep.supernode(i)
        run_config = (f"n-clients={args.nodes} out='{run_out}' node-wait=120.0 " + args.run_config).strip()
        for item in shlex.split(args.run_config):
            if item.startswith("num-server-rounds="):
                rounds = int(item.split("=", 1)[1])
        cmd = [tool("flwr"), "run", str(HERE), "deploy", "--run-config", run_config, "--stream"]
        result = subprocess.run(cmd, env=env, cwd=out, capture_output=True, text=True, timeout=args.timeout)
        (out / "flwr-run.log").write_text(result.stdout + result.stderr)
        summary["flwr_run_exit"] = result.returncode
        summary["seconds"] = round(time.monotonic() - started, 1)
        if result.returncode != 0:
            print(f"deploy_local: flwr run exited with {result.returncode}; see {out}/flwr-run.log", file=sys.stderr)
            return 1
        # `flwr run` exits 0 even when the ServerApp failed: the run's own outputs say whether it finished
        journal, prints = run_out / "journal.hsj", run_out / "fingerprints.json"
        if not prints.exists() or not journal.exists():
            print(f"deploy_local: the run did not finish (no {prints.name}); see {out}/*.log", file=sys.stderr)
            return 1
        sys.path.insert(0, str(root))
        from hiso.fl import Journal
        from hiso.fl.server import RoundEntry

        entries = [RoundEntry.decode(b) for b in Journal.open(str(journal)).entries]
        if rounds is not None and len(entries) != rounds:
            print(f"deploy_local: {len(entries)} of {rounds} rounds journaled", file=sys.stderr)
            return 1
        summary.update(journal=str(journal), rounds=len(entries), fingerprints=json.loads(prints.read_text()),
                       bytes_down=[e.meta.get("bytes_down") for e in entries],
                       bytes_up=[e.meta.get("bytes_up") for e in entries],
                       resent=sum(e.meta.get("resent", 0) for e in entries))
        print(json.dumps(summary))
        return 0
    except subprocess.TimeoutExpired:
        print(f"deploy_local: flwr run took longer than {args.timeout:.0f} s; see {out}/*.log", file=sys.stderr)
        return 1
    finally:
        dep.stop()


if __name__ == "__main__":
    sys.exit(main())
