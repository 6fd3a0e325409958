"""The built-in tasks (``hiso train``'s tasks and models) as a Flower App: the ServerApp evaluates the server's model
and writes metrics; each ClientApp trains on its node's partition (``partition-id`` / ``num-partitions`` node config,
as in Flower's own examples; the partition is the node's slot). Configured by the run config with the keys of
``hiso train`` (dashes for underscores), plus the server's own keys:

* ``out``: a folder for ``journal.hsj`` (the round log, fsync'd every round), ``slots.hsj`` (enrolled node keys),
  ``metrics.jsonl`` and, at the end, ``model/`` and ``fingerprints.json`` (as ``hiso train`` writes them);
* ``resume = true``: continue the journal in ``out`` (same seeds, clients and bits as an uninterrupted run);
* ``deterministic-seeds``: keys from ``seed`` (experiments); else a secret key kept in the journal;
* ``timeout`` (seconds a round may wait, default 300), ``node-wait`` (seconds to wait for the SuperNodes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from ...fl import Client, Replica, Server
from ...fl.experiment import build, client_stream
from ...fl.journal import Journal, atomic_write
from ...fl.metrics import RunMetrics
from ...fl.runs import save_weights
from ...fl.simulation import SimulationConfig, params_sha256
from .admission import Admission
from .transport import RoundTraffic, log, make_client_app, params_digest, run_server, wait_for_nodes

_RUN_CONFIG_ALIASES = {"num-server-rounds": "rounds", "curvature": "curvature_rule"}
_FIELDS = {f.name: f for f in dataclasses.fields(SimulationConfig)}
_SERVER_ONLY = {"out", "timeout", "deterministic-seeds", "node-wait", "resume"}


def config_from_run_config(run_config: dict, defaults: SimulationConfig | None = None) -> SimulationConfig:
    """A :class:`SimulationConfig` from a Flower run config (keys as in ``hiso train`` with dashes, e.g.
    ``num-directions``; ``num-server-rounds`` is ``rounds``). Unknown keys are an error."""
    values = dataclasses.asdict(defaults or SimulationConfig())
    for key, value in run_config.items():
        if key in _SERVER_ONLY:
            continue
        name = _RUN_CONFIG_ALIASES.get(key, key.replace("-", "_"))
        if name not in _FIELDS:
            raise ValueError(f"unknown run-config key {key!r}; known: "
                             f"{sorted(k.replace('_', '-') for k in _FIELDS)} and num-server-rounds")
        values[name] = value
    # TOML has no null: an empty string (a path) or 0 (a count) means "not set"
    for name in ("model", "data_dir", "backend", "h_init"):
        if values[name] == "":
            values[name] = None
    for name in ("num_train", "num_eval", "scalar_bound"):
        if values[name] == 0:
            values[name] = None
    config = SimulationConfig(**values)
    if config.method not in ("hiso", "decomfl"):
        raise ValueError(f"the Flower app runs the scalar-only methods 'hiso' and 'decomfl', not {config.method!r}")
    return config


def _partition(context: Context) -> tuple[int, int]:
    try:
        pid, num = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError:
        raise ValueError("each SuperNode needs node config 'partition-id' and 'num-partitions' "
                         "(flower-supernode --node-config \"partition-id=0 num-partitions=10\")") from None
    if not 0 <= pid < num:
        raise ValueError(f"partition-id {pid} is not in [0, {num})")
    return pid, num


def task_client(context: Context, defaults: SimulationConfig | None = None) -> Client:
    """A client of a built-in task: the model from the run config, the data of the node's partition."""
    pid, num = _partition(context)
    config = dataclasses.replace(config_from_run_config(context.run_config, defaults), n_clients=num,
                                 clients_per_round=1)
    setup = build(config, with_eval=False)  # the server evaluates; a client only trains
    stream = client_stream(config, setup, pid)
    return Client(pid, Replica(setup.model.parameters(), config.fl_config()),
                  functools.partial(stream.next_closure, setup.model), data_state=stream)


def task_server_main(grid: Grid, context: Context, defaults: SimulationConfig | None = None) -> list[dict]:
    """The ServerApp of a built-in task: rounds over the grid's nodes, evaluation of the server's model every
    ``eval-every`` rounds, the journal and metrics in ``out`` (see the module doc). Returns the metrics rows."""
    run_config = dict(context.run_config)
    config = config_from_run_config(run_config, defaults)
    out = run_config.get("out") or None
    journal = os.path.join(out, "journal.hsj") if out else None
    setup = build(config)
    replica = Replica(setup.model.parameters(), config.fl_config())
    digest = params_digest(replica.params)
    metrics = RunMetrics(config.method)
    if run_config.get("resume", False) and journal and os.path.exists(journal):
        opened = Journal.open(journal)
        # checked before the replay, which moves the weights to the journal's head
        if opened.header.get("initial_sha256") != params_sha256(replica.params):
            raise ValueError(f"the initial weights differ from those of the journal {journal}")
        server = Server.resume(opened, replica)
        for entry in server.entries():
            metrics.bytes_up += entry.meta.get("bytes_up", 0)
            metrics.bytes_down += entry.meta.get("bytes_down", 0)
        log.info("hiso: resumed %s at round %d of %d", journal, server.iteration, config.rounds)
    else:
        # seeds come from a secret key unless a reproducible experiment asks otherwise
        server = config.make_server(replica, deterministic=bool(run_config.get("deterministic-seeds", False)))
        if journal:
            os.makedirs(out, exist_ok=True)  # type: ignore[arg-type]
            server.create_journal(journal, initial_sha256=params_sha256(replica.params),
                                  simulation=dataclasses.asdict(config))
    admission = Admission(config.n_clients, os.path.join(out, "slots.hsj") if out else None)
    wait_for_nodes(grid, config.n_clients, float(run_config.get("node-wait", 300.0)))
    rows: list[dict] = []

    def evaluate(rnd: int) -> None:
        res = setup.task.evaluate(setup.model, setup.eval_batches)
        metrics.rejections = len(server.rejections)
        row = metrics.row(rnd, res.accuracy, res.loss)
        rows.append(row)
        log.info("hiso round %d: %s accuracy %.4f, eval loss %.4f, %d B up / %d B down so far, %d rejected",
                 rnd, config.method, res.accuracy, res.loss, metrics.bytes_up, metrics.bytes_down,
                 metrics.rejections)
        if out:
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_round(srv: Server, traffic: RoundTraffic) -> None:
        metrics.bytes_up += traffic.bytes_up
        metrics.bytes_down += traffic.bytes_down
        metrics.resent += traffic.resent
        done = srv.iteration
        if done % config.eval_every == 0 or done == config.rounds:
            evaluate(done)

    if server.iteration == 0:
        evaluate(0)
    timeout = float(run_config.get("timeout") or 300.0)
    run_server(grid, server, config.rounds - server.iteration, initial_digest=digest, timeout=timeout,
               on_round=on_round, admission=admission)
    if out:  # the trained model, and its fingerprint: the marks of a finished run
        save_weights(setup.model, setup.tokenizer, os.path.join(out, "model"))
        prints = {config.method: params_sha256(setup.model.parameters())}
        atomic_write(os.path.join(out, "fingerprints.json"), (json.dumps(prints, indent=1) + "\n").encode())
    return rows


def make_task_apps(defaults: SimulationConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp for the built-in tasks (``hiso train``'s tasks and models), configured by the run
    config on top of ``defaults``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        task_server_main(grid, context, defaults)

    return server_app, make_client_app(lambda context: task_client(context, defaults))


_APPS: tuple[ServerApp, ClientApp] | None = None


def __getattr__(name: str):
    """``server_app`` / ``client_app``: the Flower App of the built-in tasks (``[tool.flwr.app.components]`` of
    ``examples/flower/pyproject.toml``), built on first use rather than at import."""
    global _APPS
    if name in ("server_app", "client_app"):
        if _APPS is None:
            _APPS = make_task_apps()
        return _APPS[0] if name == "server_app" else _APPS[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
