"""A real Flower deployment on this machine: a SuperLink (persistent state, ``--database``) and N SuperNodes on
127.0.0.1 (``--insecure``), ``flwr run`` of this App, then checks that the run finished: every round journaled, the
run ``finished:completed`` in the SuperLink, the model and its fingerprint written.

    python examples/flower/deploy_local.py --out /tmp/hiso-deploy --nodes 3 --run-config "num-server-rounds=3"

``--restart-superlink-after R`` also crashes and restarts the SuperLink mid-run: once round R is in the ServerApp's
journal it SIGKILLs the SuperLink (its SuperExec and the ServerApp follow it down), starts ``flower-superlink`` again
with the same ``--database`` and port, waits until every SuperNode is back online (they retry on their own, keeping
their node ids), and submits the run again with ``resume = true``: the new ServerApp continues the journal (same
seeds, clients and bits as an uninterrupted run). Flower 1.42 does not restart a run itself; see docs/reliability.md.

Exit status 0 and a JSON summary on stdout (timings, the journal path, per-round protocol bytes) when the run
finished; otherwise 1 and one line ``deploy_local: <reason>`` on stderr, whatever failed: a SuperLink or SuperNode
that exits or does not come back, ``flwr run`` exiting non-zero, a run the SuperLink reports failed or stopped (a
dead ServerApp: ``flwr run`` itself exits 0 then), missing rounds or outputs, or the ``--timeout``. Bad arguments
exit 2. The processes' logs stay in ``--out``. Used by ``tests/test_flower_deploy.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: Flower depends on tomli
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
NODES_BACK_S = 180.0  # SuperNodes retry with backoff (up to ~1 min apart in Flower 1.42); seen back after 96 s loaded
BACK_MARKS = (b"Connection successful", b"Received successfully")  # a SuperNode's log lines that show it is back
# the SuperLink's SuperExec and ServerApp poll for their parent every 0.2 s, but a ServerApp still importing torch
# on a loaded 2-core machine has been seen to take longer than 30 s to notice
DEAD_CHILDREN_S = 90.0


class DeployError(RuntimeError):
    """Why the deployment failed, in one line (printed as ``deploy_local: <reason>``, exit status 1)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_journal_module():
    """hiso/fl/journal.py loaded on its own: it needs only the standard library, so counting the journaled rounds
    while the run goes does not import torch (hiso.fl's package import does)."""
    spec = importlib.util.spec_from_file_location("_hiso_journal", ROOT / "hiso" / "fl" / "journal.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


_JOURNAL = load_journal_module()


def journaled_rounds(path: Path) -> int:
    """Entries in the journal at ``path`` (0 if none yet; a read that races an append counts the entries before)."""
    try:
        return len(_JOURNAL.Journal.open(str(path)).entries)
    except FileNotFoundError:
        return 0
    except _JOURNAL.JournalError as exc:  # an entry being appended right now: count the intact ones
        return max(exc.entry, 0)


def _proc_stat(pid: int) -> tuple[int, str, str] | None:
    """(parent pid, state, start time) of a live process from /proc, None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return int(fields[1]), fields[0], fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid``: pid -> start time (so that a reused pid is never taken for it)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            children.setdefault(st[0], []).append(int(entry))
            starts[int(entry)] = st[2]
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found[child] = starts[child]
        todo += children.get(child, [])
    return found


def _command(pid: int) -> str:
    """A process's command line (best effort, for messages)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return f"pid {pid} (gone)"


def _alive(pid: int, start: str) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[2] == start and st[1] != "Z"


class Deployment:
    """The SuperLink and SuperNodes of one deployment, each in its own session, logging to ``out/<name>.log``."""

    def __init__(self, out: Path, nodes: int, env: dict, bin_dir: Path | None = None):
        self.out, self.n_nodes, self.env, self.bin_dir = out, nodes, env, bin_dir
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen] = []
        self.link: subprocess.Popen | None = None
        # Flower 1.42 serves the Fleet, Control and Runtime APIs over one HTTP port (--host/--port)
        self.port = free_port()

    def tool(self, name: str) -> str:
        for folder in (self.bin_dir, BIN):
            if folder is not None and (folder / name).exists():
                return str(folder / name)
        return name

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.out,
                                start_new_session=True)
        log.close()  # the child holds its own descriptor
        self.procs.append(proc)
        return proc

    def superlink(self, ready_s: float = 90.0) -> subprocess.Popen:
        """Start ``flower-superlink`` on the database ``out/superlink.db`` and wait until it accepts connections."""
        self.link = proc = self.start("superlink", [
            self.tool("flower-superlink"), "--insecure", "--database", str(self.out / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DeployError(f"flower-superlink exited with code {proc.returncode} before it listened on "
                                  f"127.0.0.1:{self.port}; see {self.out}/superlink.log")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return proc
            time.sleep(0.2)
        raise DeployError(f"flower-superlink did not listen on 127.0.0.1:{self.port} within {ready_s:.0f} s; "
                          f"see {self.out}/superlink.log")

    def supernode(self, i: int) -> subprocess.Popen:
        state = self.out / "node-state"
        config = f"partition-id={i} num-partitions={self.n_nodes} state-dir='{state}'"
        proc = self.start(f"supernode-{i}", [
            self.tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--node-config", config, "--host", "127.0.0.1", "--port", str(free_port())])
        self.nodes.append(proc)
        return proc

    def check_alive(self) -> None:
        """Raise if the SuperLink or a SuperNode has exited."""
        if self.link is not None and self.link.poll() is not None:
            raise DeployError(f"flower-superlink exited with code {self.link.returncode} during the run; "
                              f"see {self.out}/superlink.log")
        for i, node in enumerate(self.nodes):
            if node.poll() is not None:
                raise DeployError(f"flower-supernode {i} exited with code {node.returncode}; "
                                  f"see {self.out}/supernode-{i}.log")

    def kill_superlink(self) -> list[str]:
        """SIGKILL the SuperLink (a crash: no shutdown handler runs) and wait until the processes it started (its
        SuperExec and the ServerApp, each watching its parent) are gone; returns the command lines of those alive after
        DEAD_CHILDREN_S, which are then SIGKILLed too (an orphaned ServerApp must never write the journal beside the
        resumed one)."""
        assert self.link is not None
        tree = descendants(self.link.pid)
        os.killpg(self.link.pid, signal.SIGKILL)
        self.link.wait()  # reaped at once: a zombie still "exists" for the children's parent checks
        deadline = time.monotonic() + DEAD_CHILDREN_S
        while time.monotonic() < deadline and any(_alive(p, s) for p, s in tree.items()):
            time.sleep(0.2)
        left = [p for p, s in tree.items() if _alive(p, s)]
        commands = [_command(p) for p in left]  # read before the kill, for the summary
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return commands

    def flwr(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run([self.tool("flwr"), *args], env=self.env, cwd=self.out, capture_output=True,
                              text=True, timeout=timeout)

    def flwr_json(self, *args: str) -> dict:
        """A ``flwr ... --format json`` command's answer; DeployError if it fails."""
        res = self.flwr(*args, "--format", "json")
        try:
            answer = json.loads(res.stdout)
        except json.JSONDecodeError:
            answer = {}
        if res.returncode != 0 or not answer.get("success"):
            last = (res.stdout + res.stderr).strip().splitlines()[-1:] or [""]
            raise DeployError(f"`flwr {' '.join(args)}` failed (exit {res.returncode}): {last[0][:200]}")
        return answer

    def wait_nodes_back(self, offsets: list[int], timeout: float | None = None) -> float:
        """After a SuperLink restart: wait until every SuperNode's log shows it back past ``offsets`` (the log sizes
        at the crash) and the SuperLink lists them all online (which alone could be the database's stale word);
        returns the seconds it took. A node is back when it logged "Connection successful after ..." (Flower 1.42's
        retry message) or received a message from the new SuperLink: a node can come back without the first (seen
        under a loaded suite: a node retried for 95 s, then served the resubmitted run and never logged it)."""
        timeout = NODES_BACK_S if timeout is None else timeout
        started = time.monotonic()
        back: list[int] = []
        online = 0
        while time.monotonic() - started < timeout:
            self.check_alive()
            logs = [(self.out / f"supernode-{i}.log").read_bytes()[offsets[i]:] for i in range(self.n_nodes)]
            back = [i for i, log in enumerate(logs) if any(mark in log for mark in BACK_MARKS)]
            if len(back) == self.n_nodes:
                nodes = self.flwr_json("supernode", "ls")["nodes"]
                online = sum(n.get("status") == "online" for n in nodes)
                if online >= self.n_nodes:
                    return time.monotonic() - started
            time.sleep(1.0)
        missing = sorted(set(range(self.n_nodes)) - set(back))
        what = (f"SuperNodes {missing} did not reconnect" if missing else
                f"the SuperLink lists {online} of {self.n_nodes} SuperNodes online")
        raise DeployError(f"{what} {timeout:.0f} s after the SuperLink restart; see {self.out}/supernode-*.log")

    def run_status(self, run_id: int) -> tuple[str, str]:
        """(status, details) of a run as the SuperLink reports it, e.g. ('finished:completed', 'N/A')."""
        run = self.flwr_json("ls", "--run-id", str(run_id))["runs"][0]
        return run["status"], run["status-details"]

    def stop(self) -> None:
        for proc in self.procs:  # each was started in its own session: end it and its children
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Submission:
    """One ``flwr run --stream`` of the App; its output goes to ``out/<log>``."""

    def __init__(self, dep: Deployment, run_config: str, log: str):
        self.dep, self.log = dep, dep.out / log
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(
                [dep.tool("flwr"), "run", str(HERE), "deploy", "--run-config", run_config, "--stream"],
                stdout=fh, stderr=subprocess.STDOUT, env=dep.env, cwd=dep.out, start_new_session=True)
        dep.procs.append(self.proc)  # ended with the deployment if it is still running

    def run_id(self) -> int | None:
        found = re.search(r"Successfully started run (\d+)", self.log.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    def follow(self, journal: Path, deadline: float, until_rounds: int | None = None) -> bool:
        """Wait until ``flwr run`` exits (False) or the journal holds ``until_rounds`` rounds (True), checking the
        SuperLink and SuperNodes on the way."""
        while self.proc.poll() is None:
            if until_rounds is not None and journaled_rounds(journal) >= until_rounds:
                return True
            self.dep.check_alive()
            if time.monotonic() > deadline:
                raise DeployError(f"the run did not finish within --timeout; see {self.dep.out}/*.log")
            time.sleep(0.5)
        return False

    def check_finished(self) -> int:
        """After ``flwr run`` exited: raise unless it exited 0 and the SuperLink says the run completed (``flwr
        run`` exits 0 when the ServerApp died, so only the run's status tells). Returns the run id."""
        rc = self.proc.returncode
        last = (self.log.read_text(errors="replace").strip().splitlines() or [""])[-1][:200]
        if rc != 0:
            raise DeployError(f"flwr run exited with code {rc}: {last}; see {self.log}")
        run_id = self.run_id()
        if run_id is None:
            raise DeployError(f"flwr run started no run: {last}; see {self.log}")
        status, details = self.dep.run_status(run_id)
        if status != "finished:completed":
            raise DeployError(f"run {run_id} ended {status} ({details}); see {self.log}")
        return run_id


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--run-config", default="", help="extra run-config overrides (k=v ...)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    parser.add_argument("--restart-superlink-after", type=int, default=None, metavar="R",
                        help="SIGKILL and restart the SuperLink once round R is journaled, then resubmit the run "
                             "with resume = true")
    parser.add_argument("--flower-bin", type=Path, default=None,
                        help="folder of the Flower executables (default: beside this Python, then PATH)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes must be >= 1")
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        overrides = dict(item.split("=", 1) for item in shlex.split(args.run_config))
    except ValueError:
        parser.error(f"--run-config must be k=v pairs, not {args.run_config!r}")
    if "resume" in overrides or "out" in overrides or "n-clients" in overrides:
        parser.error("--run-config must not set out, n-clients or resume: this script sets them")
    with open(HERE / "pyproject.toml", "rb") as fh:
        rounds = overrides.get("num-server-rounds", tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
                               ["num-server-rounds"])
    try:
        rounds = int(rounds)
    except ValueError:
        parser.error(f"num-server-rounds must be an integer, not {rounds!r}")
    if (args.out / "run" / "journal.hsj").exists():
        parser.error(f"{args.out / 'run' / 'journal.hsj'} exists (an earlier run): use a fresh --out")
    if args.restart_superlink_after is not None and not 1 <= args.restart_superlink_after < rounds:
        parser.error(f"--restart-superlink-after must be in [1, {rounds}) (num-server-rounds = {rounds})")
    return args, rounds


def main(argv: list[str] | None = None) -> int:
    args, rounds = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    flwr_home = out / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    run_out = out / "run"
    journal = run_out / "journal.hsj"
    bins = [str(p) for p in (args.flower_bin, BIN) if p is not None]
    env = {**os.environ, "FLWR_HOME": str(flwr_home),
           "PYTHONPATH": os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if "PYTHONPATH" in os.environ
                                                          else [])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           # Flower starts flower-superexec, flwr-serverapp and flwr-clientapp by name
           "PATH": os.pathsep.join([*bins, os.environ.get("PATH", "")])}
    dep = Deployment(out, args.nodes, env, args.flower_bin)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{dep.port}"\n'
        'insecure = true\n')
    run_config = f"n-clients={args.nodes} out='{run_out}' node-wait=120.0 {args.run_config}".strip()
    summary: dict = {"out": str(run_out)}
    started = time.monotonic()
    deadline = started + args.timeout
    try:
        dep.superlink()
        for i in range(args.nodes):
            dep.supernode(i)
        first = final = Submission(dep, run_config, "flwr-run.log")
        if args.restart_superlink_after is not None:
            restart = summary["restart"] = crash_superlink(dep, first, journal, args.restart_superlink_after,
                                                           deadline)
            # the same run again: our ServerApp resumes from its journal (Flower 1.42 does not restart a run)
            final = Submission(dep, run_config + " resume=true", "flwr-run-resumed.log")
            # meanwhile the SuperNodes must come back (the new ServerApp waits for them too)
            restart["nodes_back_s"] = round(dep.wait_nodes_back(restart.pop("offsets")), 1)
        final.follow(journal, deadline)
        summary["run_id"] = final.check_finished()
        if args.restart_superlink_after is not None and restart["old_run"] is not None:
            restart["old_run_status"] = list(dep.run_status(restart["old_run"]))  # what Flower made of it
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary.update(check_outputs(run_out, rounds))
        print(json.dumps(summary))
        return 0
    except DeployError as exc:
        print(f"deploy_local: {exc}", file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired as exc:
        print(f"deploy_local: {' '.join(map(str, exc.cmd))[:120]} took longer than {exc.timeout:.0f} s",
              file=sys.stderr)
        return 1
    finally:
        dep.stop()


def crash_superlink(dep: Deployment, first: Submission, journal: Path, after: int, deadline: float) -> dict:
    """Once round ``after`` is journaled, SIGKILL the SuperLink and start it again on the same database and port;
    returns what happened (for the summary) and the SuperNode log sizes at the crash (see ``wait_nodes_back``)."""
    if not first.follow(journal, deadline, until_rounds=after):
        first.check_finished()  # raises if the run failed; else it finished before round `after` was seen
        raise DeployError(f"the run ended before round {after} was journaled")
    journaled = journaled_rounds(journal)
    offsets = [(dep.out / f"supernode-{i}.log").stat().st_size for i in range(dep.n_nodes)]
    killed_at = time.monotonic()
    left = dep.kill_superlink()
    try:  # `flwr run --stream` loses its SuperLink: how it ends is recorded, not judged
        first_exit = first.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.proc.pid, signal.SIGKILL)
        first_exit = first.proc.wait()
    try:
        dep.superlink()
    except DeployError as exc:
        raise DeployError(f"the SuperLink did not come back after the restart: {exc}") from None
    return {"after_round": after, "journaled_at_kill": journaled, "killed_children_left": len(left),
            "killed_children_left_commands": left,
            "first_flwr_run_exit": first_exit, "old_run": first.run_id(), "offsets": offsets,
            "down_s": round(time.monotonic() - killed_at, 1)}


def check_outputs(run_out: Path, rounds: int) -> dict:
    """The run's own outputs: every round journaled, fingerprints written; per-round bytes from the journal."""
    journal, prints = run_out / "journal.hsj", run_out / "fingerprints.json"
    if not prints.exists() or not journal.exists():
        raise DeployError(f"the run did not finish (no {prints.name} in {run_out})")
    sys.path.insert(0, str(ROOT))
    from hiso.fl import Journal
    from hiso.fl.server import RoundEntry

    entries = [RoundEntry.decode(b) for b in Journal.open(str(journal)).entries]
    if len(entries) != rounds:
        raise DeployError(f"{len(entries)} of {rounds} rounds journaled")
    return {"journal": str(journal), "rounds": len(entries), "fingerprints": json.loads(prints.read_text()),
            "bytes_down": [e.meta.get("bytes_down") for e in entries],
            "bytes_up": [e.meta.get("bytes_up") for e in entries],
            "resent": sum(e.meta.get("resent", 0) for e in entries)}


if __name__ == "__main__":
    sys.exit(main())
