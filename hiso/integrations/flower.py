"""Scalar-only federated fine-tuning on Flower (HiSo, DeComFL), over Flower's Message API.

Flower is the transport and the runtime (simulation on one machine, or SuperLink + SuperNodes across machines); the
protocol is :mod:`hiso.fl` unchanged. Each round the ServerApp sends every sampled SuperNode one ``train`` message
whose ``ConfigRecord "hiso"`` holds the encoded :class:`~hiso.fl.RoundAssignment` (this round's seeds and the log
records the node missed); the ClientApp catches up in one fused pass, runs K local ZO steps and answers with the
encoded :class:`~hiso.fl.ClientReply` (K x P float32 scalars) and the number of records it holds.

What this layer adds to the protocol, because a real deployment needs it:

* Resident models. Flower may run a ClientApp per message; the model and H of a node stay in a process-wide cache
  keyed by (run, node), so a node pays the model load once. A node whose process restarted (or that missed an
  assignment) holds fewer records than the server expects: it answers ``applied = n`` without scalars, and the
  server sends it the round again, in the same round, with the records from n on.
* Same starting point. Every replica must start from the same weights. A node sends a 16-byte digest of its initial
  parameters on first contact, whenever it holds no record yet (a restart) and when asked; the server ignores its
  answers until the digest matches its own.
* Node identity is Flower's: the server maps its sorted node ids to client indices 0..n-1, and a reply counts only
  for the node Flower says sent it.

The built-in tasks run as a Flower App (``server_app`` / ``client_app`` below, configured by the run config; see
``examples/flower/``). Data partitions come from each node's ``partition-id`` / ``num-partitions`` node config,
as in Flower's own examples. Bytes: the protocol payload is counted as in :mod:`hiso.fl.simulation`; Flower's own
envelope (message ids, timestamps, metadata) comes on top and is measured by :func:`envelope_bytes`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

import torch

try:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("hiso.integrations.flower needs Flower: pip install 'hiso[flower]' (flwr>=1.21)") from exc

from ..fl import Client, Replica, RoundAssignment, Server
from ..fl.simulation import BatchStream, SimulationConfig, build

# a child of Flower's logger: what the ServerApp reports shows in Flower's log stream (`flwr run --stream`, `flwr log`)
log = logging.getLogger("flwr.hiso")

#: name of the ConfigRecord that carries hiso's bytes in both directions
RECORD = "hiso"


def params_digest(params) -> bytes:
    """16-byte SHA-256 digest of parameters' shapes, dtypes and bytes (to check that replicas start equal)."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:16]


# ---------------------------------------------------------------------------------------------------- client side
@dataclasses.dataclass
class _Resident:
    client: Client
    initial_digest: bytes


_RESIDENT: dict[tuple[int, int], _Resident] = {}


def drop_resident(run_id: int | None = None) -> None:
    """Forget the resident models (of one run, or all): the next message rebuilds them, as a restarted process would."""
    for key in [k for k in _RESIDENT if run_id is None or k[0] == run_id]:
        del _RESIDENT[key]


def handle_assignment(message: Message, context: Context, make_client: Callable[[Context], Client]) -> Message:
    """The ClientApp's ``train`` handler: catch up, K local steps, reply with the scalars (see the module doc)."""
    key = (context.run_id, context.node_id)
    resident = _RESIDENT.get(key)
    if resident is None:
        client = make_client(context)
        if client.replica.applied != 0:
            raise ValueError("make_client must return a client at the initial weights (no record applied)")
        resident = _RESIDENT[key] = _Resident(client, params_digest(client.replica.params))
    content = message.content[RECORD]
    assignment = RoundAssignment.decode(bytes(content["assignment"]))
    client = resident.client
    client.id = assignment.client  # the server's index for this node (Flower authenticates the node itself)
    applied = client.replica.applied
    answer: dict = {}
    if content.get("verify", False) or applied == 0:  # asked, or a fresh replica (perhaps a restarted process)
        answer["initial"] = resident.initial_digest
    needed = tuple(r for r in assignment.catch_up if r.round >= applied)
    first = needed[0].round if needed else assignment.round
    if first == applied:
        reply = client.handle(dataclasses.replace(assignment, catch_up=needed))
        answer["reply"] = reply.encode()
    # else a gap (a restarted process, a lost assignment): no scalars, only how many records we hold; the server
    # sends the round again with the records from there
    answer["applied"] = client.replica.applied
    return Message(RecordDict({RECORD: ConfigRecord(answer)}), reply_to=message)


def make_client_app(make_client: Callable[[Context], Client]) -> ClientApp:
    """A Flower ClientApp for any model: ``make_client(context)`` returns a :class:`hiso.fl.Client` at the initial
    weights (called once per node and process; the client's id is set from the server's assignments)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_assignment(message, context, make_client)

    return app


# ---------------------------------------------------------------------------------------------------- server side
@dataclasses.dataclass
class RoundTraffic:
    """One round over Flower: protocol bytes (hiso's payload and framing; Flower's envelope not included)."""

    iteration: int  # 1, 2, ... (a round in which no reply was valid appends no record)
    round: int  # the log index of this round's record
    bytes_down: int
    bytes_up: int
    accepted: int
    failed: int
    resent: int  # assignments sent again with older records to nodes that had fallen behind


def run_server(
    grid: Grid,
    server: Server,
    num_rounds: int,
    *,
    nodes: list[int] | None = None,
    initial_digest: bytes | None = None,
    timeout: float | None = None,
    on_round: Callable[[Server, RoundTraffic], None] | None = None,
) -> list[RoundTraffic]:
    """Drive ``num_rounds`` rounds of ``server`` over a Flower grid; returns the traffic of each round.

    ``nodes`` (default: the grid's nodes now), sorted by id, are clients 0..n-1 (there must be
    ``server.n_clients`` of them; nodes that join later are not used). With ``initial_digest`` (see
    :func:`params_digest`) a node's answers count only once its initial weights match the server's. A node that
    reports fewer records than it was sent (a restarted process, a lost message) is sent the round again, in the
    same round, with the records it lacks. Failures (Flower errors, timeouts, wrong weights, invalid replies) are
    logged in ``server.rejections``; the round completes with the other clients.
    """
    if num_rounds < 0:
        raise ValueError("num_rounds must be >= 0")
    nodes = sorted(int(n) for n in (grid.get_node_ids() if nodes is None else nodes))
    if len(nodes) != server.n_clients:
        raise ValueError(f"the server expects {server.n_clients} clients, the grid has {len(nodes)} nodes")
    index = {node: i for i, node in enumerate(nodes)}
    verified = [initial_digest is None] * len(nodes)
    traffic: list[RoundTraffic] = []
    for it in range(1, num_rounds + 1):
        rnd = server.round
        pending = {a.client: a for a in server.begin_round()}
        stats = RoundTraffic(it, rnd, 0, 0, 0, len(pending), 0)
        for attempt in range(2):  # the second attempt only for nodes that had fallen behind
            messages = []
            for a in pending.values():
                payload = a.encode()
                stats.bytes_down += len(payload)
                record = {"assignment": payload}
                if not verified[a.client]:
                    record["verify"] = True
                messages.append(Message(RecordDict({RECORD: ConfigRecord(record)}), dst_node_id=nodes[a.client],
                                        message_type=MessageType.TRAIN, group_id=str(rnd)))
            behind: dict[int, RoundAssignment] = {}
            answered = set()
            for reply in grid.send_and_receive(messages, timeout=timeout):
                client = index.get(int(reply.metadata.src_node_id))
                if client is None or client in answered or client not in pending:
                    log.warning("round %d: ignored a reply from node %s", rnd, reply.metadata.src_node_id)
                    continue
                answered.add(client)
                outcome, held = _take_reply(server, reply, client, initial_digest, verified, last_try=attempt == 1)
                if outcome == "behind":
                    behind[client] = dataclasses.replace(pending[client], catch_up=tuple(server.records[held:]))
                elif outcome == "accepted":
                    stats.accepted += 1
                    stats.bytes_up += len(reply.content[RECORD]["reply"])
            for client in pending:
                if client not in answered:
                    server.record_failure(client, f"no reply within the timeout ({timeout} s)")
            if not behind:
                break
            pending = behind
            stats.resent += len(behind)
        server.end_round()
        stats.failed -= stats.accepted
        traffic.append(stats)
        if on_round is not None:
            on_round(server, stats)
    return traffic


def _take_reply(server: Server, reply: Message, client: int, initial_digest, verified,
                last_try: bool) -> tuple[str, int]:
    """Check one Flower reply and submit its scalars. Returns ("accepted" | "rejected" | "behind", records the node
    holds); "rejected" reasons go to ``server.rejections``; a node "behind" should be sent the round again."""
    if reply.has_error():
        server.record_failure(client, f"Flower error {reply.error.code}: {reply.error.reason}")
        return "rejected", -1
    if RECORD not in reply.content:
        server.record_failure(client, f"reply without the {RECORD!r} record")
        return "rejected", -1
    content = reply.content[RECORD]
    applied = content.get("applied")
    if not isinstance(applied, int) or isinstance(applied, bool) or not 0 <= applied <= server.round:
        server.record_failure(client, f"reply with an invalid record count {applied!r}")
        return "rejected", -1
    server.resync(client, applied)
    if "initial" in content or not verified[client]:
        got = content.get("initial")
        verified[client] = got == initial_digest if initial_digest is not None else True
        if not verified[client]:
            shown = got.hex() if isinstance(got, bytes) else got
            server.record_failure(client, f"initial weights differ from the server's (digest {shown}, expected "
                                          f"{initial_digest.hex()})")
            return "rejected", applied
    if "reply" not in content:
        if not last_try:
            return "behind", applied
        server.record_failure(client, f"holds {applied} records and sent no scalars")
        return "rejected", applied
    return ("accepted" if server.submit(bytes(content["reply"]), sender=client) else "rejected"), applied


def wait_for_nodes(grid: Grid, count: int, timeout: float, poll: float = 0.5) -> list[int]:
    """Wait until at least ``count`` SuperNodes are connected (they register asynchronously); their sorted ids."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= count:
            return nodes
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{len(nodes)} of {count} SuperNodes connected after {timeout:.0f} s")
        time.sleep(poll)


def envelope_bytes(message: Message) -> int:
    """Bytes of a message as Flower serialises it: the message object (metadata) and every record object below it
    (Flower sends them as content-addressed objects; transport framing not included)."""

    def walk(obj) -> int:
        return len(obj.deflate()) + sum(walk(child) for child in (obj.children or {}).values())

    return walk(message)


class InProcessGrid(Grid):
    """A Flower ``Grid`` that runs a ClientApp for ``num_nodes`` SuperNodes in this process, one message at a time.

    For tests and debugging of Flower apps without Ray or a network. As in Flower's runtimes, each node keeps its
    ``Context`` across messages and a ClientApp exception becomes an error reply. ``node_ids`` default to fixed
    pseudo-random 63-bit ids (Flower's are random too); ``node_configs`` default to ``partition-id`` /
    ``num-partitions`` in the order of ``node_ids``. ``bytes_sent`` / ``bytes_received`` add up
    :func:`envelope_bytes` of every message.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, *, run_config: dict | None = None,
                 node_ids: list[int] | None = None, node_configs: list[dict] | None = None, run_id: int = 1):
        from flwr.common.constant import SUPERLINK_NODE_ID
        from flwr.supercore.task_identity import TaskIdentity

        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if node_ids is None:
            import random

            node_ids = random.Random(run_id).sample(range(1, 2**63), num_nodes)
        if node_configs is None:
            node_configs = [{"partition-id": i, "num-partitions": num_nodes} for i in range(num_nodes)]
        if len(node_ids) != num_nodes or len(node_configs) != num_nodes or len(set(node_ids)) != num_nodes:
            raise ValueError("need num_nodes distinct node ids and num_nodes node configs")
        # Messages take their run and sender from the process's task identity, which Flower's runtimes set.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, SUPERLINK_NODE_ID, 0
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self.contexts = {int(n): Context(run_id=run_id, node_id=int(n), node_config=dict(c), state=RecordDict(),
                                         run_config=self.run_config) for n, c in zip(node_ids, node_configs)}
        self.bytes_sent = self.bytes_received = 0
        self._run = None
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        ids = []
        for message in messages:
            self.bytes_sent += envelope_bytes(message)
            context = self.contexts.get(int(message.metadata.dst_node_id))
            if context is None:
                reply = Message(Error(ErrorCode.NODE_UNAVAILABLE, "no such node"), reply_to=message)
            else:
                try:
                    reply = self.client_app(message, context)
                except Exception as exc:  # noqa: BLE001 - the runtime reports any ClientApp failure to the server
                    reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}"),
                                    reply_to=message)
            self.bytes_received += envelope_bytes(reply)
            ids.append(message.object_id)
            self._replies[message.object_id] = reply
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def run_server_app(self, server_app: ServerApp) -> None:
        """Run a ServerApp against this grid (the SuperLink's context: node 0, the grid's run config)."""
        from flwr.common.constant import SUPERLINK_NODE_ID

        run_id = next(iter(self.contexts.values())).run_id
        server_app(self, Context(run_id=run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
                                 run_config=self.run_config))


# ---------------------------------------------------------------------------------------------------- built-in tasks
_RUN_CONFIG_ALIASES = {"num-server-rounds": "rounds"}
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
    stream = BatchStream(setup.task, setup.client_data[pid], config.batch_size, config.seed * 1000 + pid,
                         config.device)
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
    metrics: list[dict] = []
    totals = {"up": 0, "down": 0, "resent": 0}
    start = time.perf_counter()

    def evaluate(rnd: int) -> None:
        res = setup.task.evaluate(setup.model, setup.eval_batches)
        row = {"round": rnd, "method": config.method, "accuracy": res.accuracy, "eval_loss": res.loss,
               "bytes_up": totals["up"], "bytes_down": totals["down"], "rejections": len(server.rejections),
               "resent": totals["resent"], "seconds": time.perf_counter() - start}
        metrics.append(row)
        log.info("hiso round %d: %s accuracy %.4f, eval loss %.4f, %d B up / %d B down so far, %d rejected",
                 rnd, config.method, res.accuracy, res.loss, totals["up"], totals["down"], len(server.rejections))
        if out:
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")

    def on_round(srv: Server, traffic: RoundTraffic) -> None:
        totals["up"] += traffic.bytes_up
        totals["down"] += traffic.bytes_down
        totals["resent"] += traffic.resent
        if traffic.iteration % config.eval_every == 0 or traffic.iteration == config.rounds:
            evaluate(traffic.iteration)

    evaluate(0)
    timeout = run_config.get("timeout") or None
    run_server(grid, server, config.rounds, nodes=nodes, initial_digest=digest, timeout=timeout, on_round=on_round)
    if out:
        with open(os.path.join(out, "server.ckpt"), "wb") as f:
            f.write(server.checkpoint())
    return metrics


def make_task_apps(defaults: SimulationConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """ServerApp and ClientApp for the built-in tasks (``hiso train``'s tasks and models), configured by the run
    config on top of ``defaults``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        task_server_main(grid, context, defaults)

    return server_app, make_client_app(lambda context: task_client(context, defaults))


#: The Flower App of the built-in tasks (``[tool.flwr.app.components]`` of ``examples/flower/pyproject.toml``).
server_app, client_app = make_task_apps()

__all__ = [
    "RECORD",
    "InProcessGrid",
    "RoundTraffic",
    "client_app",
    "config_from_run_config",
    "drop_resident",
    "envelope_bytes",
    "handle_assignment",
    "make_client_app",
    "make_task_apps",
    "params_digest",
    "run_server",
    "server_app",
    "task_client",
    "task_server_main",
    "wait_for_nodes",
]
