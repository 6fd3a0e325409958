"""The built-in tasks (``hiso train``'s tasks and models) as a Flower App: the ServerApp evaluates the server's model
and writes metrics; each ClientApp trains on its node's partition (``partition-id`` / ``num-partitions`` node config,
as in Flower's own examples). Configured by the run config with the keys of ``hiso train`` (dashes for underscores).
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
from ...fl.metrics import RunMetrics
from ...fl.simulation import SimulationConfig
from .transport import RoundTraffic, log, make_client_app, params_digest, run_server, wait_for_nodes

_RUN_CONFIG_ALIASES = {"num-server-rounds": "rounds", "curvature": "curvature_rule"}
_FIELDS = {f.name: f for f in dataclasses.fields(SimulationConfig)}
_SERVER_ONLY = {"out", "timeout", "deterministic-seeds", "node-wait"}


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
    for name in ("model", "data_dir", "backend"):
        if values[name] == "":
            values[name] = None
    for name in ("num_train", "num_eval"):
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
                  functools.partial(stream.next_closure, setup.model))


def task_server_main(grid: Grid, context: Context, defaults: SimulationConfig | None = None) -> list[dict]:
    """The ServerApp of a built-in task: rounds over the grid's nodes, evaluation of the server's model every
    ``eval-every`` rounds, metrics as JSON lines in ``out`` (run config) if given. Returns the metrics."""
    run_config = dict(context.run_config)
    config = config_from_run_config(run_config, defaults)
    nodes = wait_for_nodes(grid, config.n_clients, float(run_config.get("node-wait", 300.0)))
    config = dataclasses.replace(config, n_clients=len(nodes),
                                 clients_per_round=min(config.clients_per_round, len(nodes)))
    setup = build(config)
    replica = Replica(setup.model.parameters(), config.fl_config())
    digest = params_digest(replica.params)
    # Seeds come from the OS's cryptographic source unless a reproducible experiment asks otherwise.
    deterministic = bool(run_config.get("deterministic-seeds", False))
    server = Server(config.fl_config(), len(nodes), config.clients_per_round, aggregation=config.aggregation,
                    replica=replica, sampling_seed=config.seed if deterministic else None,
                    experiment_seed=config.seed if deterministic else None)
    out = run_config.get("out") or None
    rows: list[dict] = []
    metrics = RunMetrics(config.method)

    def evaluate(rnd: int) -> None:
        res = setup.task.evaluate(setup.model, setup.eval_batches)
        metrics.rejections = len(server.rejections)
        row = metrics.row(rnd, res.accuracy, res.loss)
        rows.append(row)
        log.info("hiso round %d: %s accuracy %.4f, eval loss %.4f, %d B up / %d B down so far, %d rejected",
                 rnd, config.method, res.accuracy, res.loss, metrics.bytes_up, metrics.bytes_down,
                 metrics.rejections)
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_round(srv: Server, traffic: RoundTraffic) -> None:
        metrics.bytes_up += traffic.bytes_up
        metrics.bytes_down += traffic.bytes_down
        metrics.resent += traffic.resent
        if traffic.iteration % config.eval_every == 0 or traffic.iteration == config.rounds:
            evaluate(traffic.iteration)

    evaluate(0)
    timeout = run_config.get("timeout") or None
    run_server(grid, server, config.rounds, nodes=nodes, initial_digest=digest, timeout=timeout, on_round=on_round)
    if out:
        with open(os.path.join(out, "server.ckpt"), "wb") as f:
            f.write(server.checkpoint())
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
