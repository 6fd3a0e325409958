"""A SuperNode's durable state: Flower 1.42 starts a new ClientApp process per message in deployment, so what a
node knows (model, H, records applied, data position, its slot key, its last reply) lives on disk between messages.

    <state-dir>/<run uid>/slot-<slot>/journal.hsj    the records applied, in the journal format (hiso.fl.journal),
                                                      and after every message a state entry: records applied, data
                                                      position, the snapshot's digest, the last reply
    <state-dir>/<run uid>/slot-<slot>/snapshot.pt    params + H at that many records (atomic rename)
    <state-dir>/<run uid>/slot-<slot>/node.key       the key this node enrolled its slot with (0600)

A message costs the process one snapshot load instead of a replay of the whole log; if the snapshot is missing or
does not match the last state entry (a crash between the two), the node replays its own journal's records. The last
reply is kept so that a round asked again (the server resumed mid-round) gets the same answer without drawing data
again. In one process (Flower's simulation runtime, :class:`~.testing.InProcessGrid`) the node also stays resident.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import struct

import torch

from ...fl import keys
from ...fl.journal import Journal, atomic_write
from ...fl.messages import RoundRecord
from ...fl.protocol import Client

_KIND = struct.Struct("<c")
NODE_FORMAT = "hiso-node-journal"


def default_state_dir() -> str:
    return os.environ.get("HISO_NODE_STATE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hiso", "flower-nodes")


@dataclasses.dataclass
class NodeState:
    """A client and what the node persists about it (``folder`` None: resident in this process only)."""

    client: Client
    initial_digest: bytes
    key: bytes
    folder: str | None
    journal: Journal | None = None
    enrolled: bool = False
    last_reply: dict | None = None  # {"round", "seeds", "reply" (hex), "data" (position before the round)}

    # ------------------------------------------------------------------ loading
    @classmethod
    def open(cls, client: Client, initial_digest: bytes, run_uid: bytes, state_dir: str | None) -> NodeState:
        """The node's state for this run: a fresh client (at the initial weights) brought to its saved state."""
        if not state_dir:
            return cls(client, initial_digest, keys.new_key(), None)
        folder = os.path.join(state_dir, run_uid.hex(), f"slot-{client.id}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        key_path = os.path.join(folder, "node.key")
        if not os.path.exists(key_path):
            atomic_write(key_path, keys.new_key())
        with open(key_path, "rb") as fh:
            key = keys.check_key(fh.read(), "node key")
        path = os.path.join(folder, "journal.hsj")
        if not os.path.exists(path):
            journal = Journal.create(path, {"format": NODE_FORMAT, "version": 1, "run": run_uid.hex(),
                                            "slot": client.id, "initial_digest": initial_digest.hex()})
            return cls(client, initial_digest, key, folder, journal)
        journal = Journal.open(path)
        if journal.header.get("initial_digest") != initial_digest.hex():
            raise ValueError(f"node state {folder} belongs to other initial weights; remove it to start afresh")
        state = cls(client, initial_digest, key, folder, journal)
        state._load(journal)
        return state

    def _load(self, journal: Journal) -> None:
        records: list[RoundRecord] = []
        last: dict | None = None
        for body in journal.entries:
            kind = body[:1]
            if kind == b"R":
                records.append(RoundRecord.decode_from(body, 1)[0])
            elif kind == b"D":
                last = json.loads(body[1:])
            elif kind == b"E":
                self.enrolled = True
        if last is None:  # nothing handled yet
            return
        applied = last["applied"]
        replica = self.client.replica
        snap = os.path.join(self.folder or "", "snapshot.pt")
        blob = b""
        if os.path.exists(snap):
            with open(snap, "rb") as fh:
                blob = fh.read()
        if blob and hashlib.sha256(blob).hexdigest() == last.get("snapshot"):
            saved = torch.load(io.BytesIO(blob))
            with torch.no_grad():
                for p, s in zip(replica.params, saved["params"], strict=True):
                    p.copy_(s)
                if replica.hessian is not None:
                    for h, s in zip(replica.hessian, saved["hessian"], strict=True):
                        h.copy_(s)
            if replica.curvature is not None:  # the rule's Python state (h, round count) of the snapshot
                replica.load_curvature(saved.get("curvature"), records[:applied])
            replica.applied = applied
        else:  # no usable snapshot: replay this node's own records from the initial weights
            replica.apply(records[:applied])
        if self.client.data_state is not None and last.get("data") is not None:
            self.client.data_state.load_state_dict(last["data"])
        self.last_reply = last.get("last_reply")

    # ------------------------------------------------------------------ saving
    def mark_enrolled(self) -> None:
        if self.journal is not None and not self.enrolled:
            self.journal.append(b"E")
        self.enrolled = True

    def save(self, new_records: list[RoundRecord]) -> None:
        """Persist after a message: the records applied in it, a snapshot, then the state entry (the commit)."""
        if self.journal is None:
            return
        for r in new_records:
            self.journal.append(b"R" + r.encode())
        replica = self.client.replica
        buf = io.BytesIO()
        torch.save({"params": [p.detach().cpu() for p in replica.params],
                    "hessian": [h.cpu() for h in replica.hessian] if replica.hessian is not None else None,
                    "curvature": replica.curvature.to_dict() if replica.curvature is not None else None}, buf)
        blob = buf.getvalue()
        atomic_write(os.path.join(self.folder or "", "snapshot.pt"), blob)
        data = self.client.data_state.state_dict() if self.client.data_state is not None else None
        self.journal.append(b"D" + json.dumps({"applied": replica.applied, "data": data, "last_reply": self.last_reply,
                                               "snapshot": hashlib.sha256(blob).hexdigest()}).encode())

    def data_position(self):
        return self.client.data_state.state_dict() if self.client.data_state is not None else None
