"""The scalar-only protocol (:mod:`hiso.fl`) over Flower's Message API: the two halves of any hiso Flower App.

Each round the ServerApp (:func:`run_server`) sends every sampled SuperNode one ``train`` message whose
``ConfigRecord "hiso"`` holds the encoded :class:`~hiso.fl.RoundAssignment` (this round's seeds and the log records
the node missed); the ClientApp (:func:`make_client_app`, :func:`handle_assignment`) catches up in one fused pass,
runs K local ZO steps and answers with the encoded :class:`~hiso.fl.ClientReply` (K x P float32 scalars) and the
number of records it holds.

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

Bytes: the protocol payload is counted as in :mod:`hiso.fl.simulation`; Flower's own envelope (message ids,
timestamps, metadata) comes on top and is measured by :func:`envelope_bytes`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from ...fl import Client, RoundAssignment, Server

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
