"""The scalar-only protocol (:mod:`hiso.fl`) over Flower's Message API: the two halves of any hiso Flower App.

Each round the ServerApp (:func:`run_server`) sends every sampled SuperNode one ``train`` message whose
``ConfigRecord "hiso"`` holds the encoded :class:`~hiso.fl.RoundAssignment` (this round's seeds and the log records
the node missed); the ClientApp (:func:`make_client_app`) catches up in one fused pass, runs K local ZO steps and
answers with the encoded :class:`~hiso.fl.ClientReply` (K x P float32 scalars) and the number of records it holds.

What this layer adds to the protocol, because a real deployment needs it:

* Slots and admission. Clients are slots 0..n-1 (a node's slot is its client's id, e.g. its data partition), not
  Flower node ids, which change when a SuperNode restarts. A node Flower has not seen before is sent a ``query``
  (join) with a nonce; it answers with its slot, the digest of its initial weights and, the first time, a key it
  generated (trust on first use), later an HMAC proof with that key. The server admits it to the slot only if the
  digest equals its own and the key or proof matches the slot's; slot keys are journaled beside the round log.
* Durable node state (:mod:`.node`): Flower starts a ClientApp process per message, so a node's model, H, records
  applied, data position and last reply are saved after each message and loaded by the next process.
* Catch-up: a node that holds fewer records than it was sent answers ``applied = n`` without scalars and is sent the
  round again, in the same round, with the records from n on, in chunks of at most 65,535 records per message.
* Hostile replies: every field is type- and range-checked; any exception while handling one reply rejects that reply
  and never ends the run. A reply counts only for the slot of the node Flower says sent it.
* Time: a round waits at most ``timeout`` seconds in all; a node that does not answer fails that round only.

Bytes: the protocol payload is counted as in :mod:`hiso.fl.simulation`; the join messages and Flower's own envelope
(message ids, metadata: :func:`envelope_bytes`) come on top.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from ...fl import Client, RoundAssignment, Server, keys
from ...fl.messages import MAX_CATCH_UP
from .node import NodeState, default_state_dir

# a child of Flower's logger: what the ServerApp reports shows in Flower's log stream (`flwr run --stream`, `flwr log`)
log = logging.getLogger("flwr.hiso")

#: name of the ConfigRecord that carries hiso's bytes in both directions
RECORD = "hiso"
#: the largest valid reply: 15 bytes of framing + K x P float32, twice (second differences), K = P = 255
MAX_REPLY_BYTES = 15 + 2 * 4 * 255 * 255


def params_digest(params) -> bytes:
    """16-byte SHA-256 digest of parameters' shapes, dtypes and bytes (to check that replicas start equal)."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach().contiguous().cpu()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:16]


def run_uid(server: Server) -> bytes:
    """The run's public id (nodes key their state by it): a PRF of the secret run key (which it does not reveal) and
    of the journal's header, so runs with other settings never share node state."""
    header = hashlib.sha256(json.dumps(server.journal.header, sort_keys=True).encode()).digest()
    return keys.prf(server.run_key, b"run-uid" + header)[:16]


# ---------------------------------------------------------------------------------------------------- client side
_RESIDENT: dict[tuple[int, int, bytes], NodeState] = {}


def drop_resident(run_id: int | None = None) -> None:
    """Forget the resident models (of one run, or all): the next message loads the node's state from disk (or, with
    no state folder, rebuilds it), as a new ClientApp process would."""
    for key in [k for k in _RESIDENT if run_id is None or k[0] == run_id]:
        del _RESIDENT[key]


def _node(context: Context, make_client: Callable[[Context], Client], uid: bytes) -> NodeState:
    key = (context.run_id, context.node_id, uid)
    state = _RESIDENT.get(key)
    if state is None:
        client = make_client(context)
        if client.replica.applied != 0:
            raise ValueError("make_client must return a client at the initial weights (no record applied)")
        state_dir = context.node_config.get("state-dir", default_state_dir())
        state = _RESIDENT[key] = NodeState.open(client, params_digest(client.replica.params), uid, str(state_dir))
    return state


def handle_join(message: Message, context: Context, make_client: Callable[[Context], Client]) -> Message:
    """The ClientApp's ``query`` handler: the node's slot, initial-weights digest, and its key or a proof of it."""
    content = message.content[RECORD]
    uid, nonce = bytes(content["run"]), bytes(content["nonce"])
    state = _node(context, make_client, uid)
    answer = {"slot": state.client.id, "initial": state.initial_digest, "applied": state.client.replica.applied}
    if state.enrolled:
        answer["proof"] = keys.slot_proof(state.key, nonce, context.node_id)
    else:
        answer["enroll"] = state.key
        state.mark_enrolled()
    return Message(RecordDict({RECORD: ConfigRecord(answer)}), reply_to=message)


def handle_assignment(message: Message, context: Context, make_client: Callable[[Context], Client]) -> Message:
    """The ClientApp's ``train`` handler: catch up, K local steps, reply with the scalars (see the module doc)."""
    content = message.content[RECORD]
    state = _node(context, make_client, bytes(content["run"]))
    assignment = RoundAssignment.decode(bytes(content["assignment"]))
    client = state.client
    if assignment.client != client.id:
        raise ValueError(f"assignment for slot {assignment.client} sent to the node of slot {client.id}")
    applied = client.replica.applied
    needed = [r for r in assignment.catch_up if r.round >= applied]
    answer: dict = {}
    if (needed[0].round if needed else assignment.round) == applied:  # no gap: apply what we lack
        client.replica.apply(needed)
        last = state.last_reply
        if client.replica.applied == assignment.round:
            if last and last["round"] == assignment.round and tuple(last["seeds"]) == assignment.seeds:
                answer["reply"] = bytes.fromhex(last["reply"])  # asked again (the server resumed): same answer
            else:
                position = state.data_position()
                reply = client.handle(dataclasses.replace(assignment, catch_up=()))
                answer["reply"] = reply.encode()
                state.last_reply = {"round": assignment.round, "seeds": list(assignment.seeds),
                                    "reply": answer["reply"].hex(), "data": position}
        state.save(needed)
    # else a gap (lost state, a lost assignment), or only a chunk of a long catch-up: no scalars, only how many
    # records we hold; the server sends the round again with the records from there
    answer["applied"] = client.replica.applied
    return Message(RecordDict({RECORD: ConfigRecord(answer)}), reply_to=message)


def make_client_app(make_client: Callable[[Context], Client]) -> ClientApp:
    """A Flower ClientApp for any model: ``make_client(context)`` returns a :class:`hiso.fl.Client` at the initial
    weights whose ``id`` is the node's slot (called once per node and process). Node config ``state-dir`` sets where
    the node keeps its state (default ``~/.cache/hiso/flower-nodes``; empty: in memory only)."""
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_assignment(message, context, make_client)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_join(message, context, make_client)

    return app


# ---------------------------------------------------------------------------------------------------- server side
@dataclasses.dataclass
class RoundTraffic:
    """One round over Flower: protocol bytes (hiso's payload and framing; Flower's envelope not included)."""

    iteration: int  # 1, 2, ... (rounds driven by this call)
    round: int  # the log index of this round's record
    bytes_down: int
    bytes_up: int
    accepted: int
    failed: int
    resent: int  # assignments sent again with older records to nodes that had fallen behind
    join_bytes: int = 0  # admission messages (new or restarted nodes), both ways


from .admission import Admission, take_join  # noqa: E402  (uses the helpers above)


def run_server(
    grid: Grid,
    server: Server,
    num_rounds: int,
    *,
    initial_digest: bytes | None = None,
    timeout: float | None = None,
    on_round: Callable[[Server, RoundTraffic], None] | None = None,
    admission: Admission | None = None,
    nodes: list[int] | None = None,
) -> list[RoundTraffic]:
    """Drive ``num_rounds`` rounds of ``server`` over a Flower grid; returns the traffic of each round.

    Nodes are admitted to slots as they appear (``admission``: the slot keys, default kept in memory with the
    server across calls; ``nodes``:
    admit only these). With ``initial_digest`` (see :func:`params_digest`) a node is admitted only if its initial
    weights match. Each round waits at most ``timeout`` seconds (None: for every answer). Failures (Flower errors,
    timeouts, refused nodes, invalid replies) are logged in ``server.rejections``; the round completes with the
    other clients (or is skipped, below ``server.min_replies``)."""
    if num_rounds < 0:
        raise ValueError("num_rounds must be >= 0")
    # the slots and their keys outlive one call: kept with the server unless the caller keeps them (a file)
    admission = admission or getattr(server, "_flower_admission", None) or Admission(server.n_clients)
    server._flower_admission = admission  # type: ignore[attr-defined]
    if admission.n_slots != server.n_clients:
        raise ValueError(f"the server expects {server.n_clients} clients, the admission has {admission.n_slots} slots")
    uid = run_uid(server)
    traffic: list[RoundTraffic] = []
    for it in range(1, num_rounds + 1):
        deadline = None if timeout is None else time.monotonic() + timeout
        # joins get at most half the round's time, so a dead unknown node cannot starve the round itself
        join_deadline = None if timeout is None else time.monotonic() + timeout / 2
        join_bytes = _admit(grid, admission, uid, initial_digest, join_deadline, nodes)
        admission.rounds += 1
        rnd = server.round
        pending = {a.client: a for a in server.begin_round()}
        stats = RoundTraffic(it, rnd, 0, 0, 0, len(pending), 0, join_bytes)
        for client in list(pending):
            if admission.node_of(client) is None:
                server.record_failure(client, f"no admitted node holds slot {client}"
                                              + admission.why_not(client))
                del pending[client]
        attempts = 0  # a node far behind needs one message per 65,535 records; a liar must not loop forever
        max_attempts = 2 + server.round // MAX_CATCH_UP
        while pending:
            attempts += 1
            messages = []
            for a in pending.values():
                payload = a.encode()
                stats.bytes_down += len(payload)
                messages.append(Message(RecordDict({RECORD: ConfigRecord({"assignment": payload, "run": uid})}),
                                        dst_node_id=admission.node_of(a.client), message_type=MessageType.TRAIN,
                                        group_id=str(rnd)))
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            behind: dict[int, RoundAssignment] = {}
            answered = set()
            for reply in grid.send_and_receive(messages, timeout=remaining):
                client = admission.slot_of(int(reply.metadata.src_node_id))
                if client is None or client in answered or client not in pending:
                    log.warning("round %d: ignored a reply from node %s", rnd, reply.metadata.src_node_id)
                    continue
                answered.add(client)
                last_try = attempts >= max_attempts or (deadline is not None and time.monotonic() >= deadline)
                outcome, held = _take_reply(server, reply, client, last_try=last_try)
                if outcome == "behind":
                    lack = server.records[held:held + MAX_CATCH_UP]
                    behind[client] = dataclasses.replace(pending[client], catch_up=tuple(lack))
                elif outcome == "accepted":
                    stats.accepted += 1
                    stats.bytes_up += len(reply.content[RECORD]["reply"])
            for client in pending:
                if client not in answered:
                    server.record_failure(client, f"no reply within the timeout ({timeout} s)")
            pending = behind
            stats.resent += len(behind)
        server.end_round({"bytes_up": stats.bytes_up, "bytes_down": stats.bytes_down, "resent": stats.resent})
        stats.failed -= stats.accepted
        traffic.append(stats)
        if on_round is not None:
            on_round(server, stats)
    return traffic


def _admit(grid: Grid, admission: Admission, uid: bytes, digest: bytes | None, deadline, only) -> int:
    """Send a join query to every node Flower lists that holds no slot yet; admit the valid answers."""
    fresh = [n for n in (grid.get_node_ids() if only is None else only) if admission.unknown(int(n))]
    if not fresh:
        return 0
    nonces = {int(n): secrets.token_bytes(16) for n in fresh}
    messages = [Message(RecordDict({RECORD: ConfigRecord({"run": uid, "nonce": nonces[n]})}), dst_node_id=n,
                        message_type=MessageType.QUERY, group_id="join") for n in nonces]
    size = sum(len(nonces[n]) + len(uid) for n in nonces)
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    answered = set()
    for reply in grid.send_and_receive(messages, timeout=remaining):
        node = int(reply.metadata.src_node_id)
        if node not in nonces or node in answered:
            continue
        answered.add(node)
        size += take_join(admission, reply, node, nonces[node], digest)
    for node in nonces:
        if node not in answered:
            admission.refuse(node, "no answer to the join query", final=False)
    return size


def _take_reply(server: Server, reply: Message, client: int, last_try: bool) -> tuple[str, int]:
    """Check one Flower reply and submit its scalars. Returns ("accepted" | "rejected" | "behind", records the node
    holds); reasons go to ``server.rejections``; a node "behind" should be sent the round again. Never raises: any
    exception while looking at a reply rejects it."""
    try:
        return _check_reply(server, reply, client, last_try)
    except Exception as exc:  # a hostile or broken reply must never end the run
        server.record_failure(client, f"invalid reply: {type(exc).__name__}: {str(exc)[:200]}")
        return "rejected", -1


def _check_reply(server: Server, reply: Message, client: int, last_try: bool) -> tuple[str, int]:
    if reply.has_error():
        server.record_failure(client, f"Flower error {reply.error.code}: {str(reply.error.reason)[:300]}")
        return "rejected", -1
    if RECORD not in reply.content.config_records:
        server.record_failure(client, f"reply without the {RECORD!r} ConfigRecord")
        return "rejected", -1
    content = reply.content.config_records[RECORD]
    applied = content.get("applied")
    if type(applied) is not int or not 0 <= applied <= server.round:
        server.record_failure(client, f"reply with an invalid record count {str(applied)[:40]!r}")
        return "rejected", -1
    server.resync(client, applied)
    if "reply" not in content:
        if not last_try and applied < server.round:
            return "behind", applied
        server.record_failure(client, f"holds {applied} records and sent no scalars")
        return "rejected", applied
    blob = content["reply"]
    if type(blob) is not bytes or len(blob) > MAX_REPLY_BYTES:
        server.record_failure(client, f"reply field of type {type(blob).__name__} (bytes up to {MAX_REPLY_BYTES})")
        return "rejected", applied
    return ("accepted" if server.submit(blob, sender=client) else "rejected"), applied


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


__all__ = ["MAX_CATCH_UP", "RECORD", "Admission", "RoundTraffic", "drop_resident", "envelope_bytes",
           "handle_assignment", "handle_join", "make_client_app", "params_digest", "run_server", "run_uid",
           "wait_for_nodes"]
