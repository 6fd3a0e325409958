"""Which Flower node holds which slot (client index), and the keys that let a restarted node take its slot back.

A slot is enrolled by the first node that claims it with the right initial weights (trust on first use): that node
sends a 32-byte key it generated. A node that comes back with a new Flower node id (a restarted SuperNode) proves it
holds that key with HMAC-SHA256(key, server nonce | node id) and is re-admitted; anyone else claiming the slot is
refused. With ``path`` the enrolled keys are kept in a journal (:mod:`hiso.fl.journal`) beside the round log, so a
resumed ServerApp re-admits the same nodes. Over ``--insecure`` the enrolment key crosses the network in the clear:
deploy with TLS (and Flower's SuperNode authentication) where nodes are not trusted.
"""

from __future__ import annotations

import hmac
import json
import logging
import os

from flwr.app import Message

from ...fl import keys
from ...fl.journal import Journal

log = logging.getLogger("flwr.hiso")
RETRY_ROUNDS = 5


class Admission:
    """Slots 0..n_slots-1, the node id holding each, and each slot's enrolment key."""

    def __init__(self, n_slots: int, path: str | None = None):
        self.n_slots = n_slots
        self.keys: dict[int, bytes] = {}
        self.holder: dict[int, int] = {}  # slot -> Flower node id
        self.refused: dict[int, tuple[str, bool]] = {}  # node id -> (reason, final)
        self._asked: dict[int, int] = {}  # node id -> round of its last unanswered join query
        self.rounds = 0  # rounds driven so far (an unanswered node is asked again after RETRY_ROUNDS)
        self.journal: Journal | None = None
        if path is not None:
            if os.path.exists(path):
                self.journal = Journal.open(path)
                if self.journal.header.get("slots") != n_slots:
                    raise ValueError(f"{path} has {self.journal.header.get('slots')} slots, not {n_slots}")
                for body in self.journal.entries:
                    entry = json.loads(body)
                    self.keys[int(entry["slot"])] = bytes.fromhex(entry["key"])
            else:
                self.journal = Journal.create(path, {"format": "hiso-slots", "version": 1, "slots": n_slots})

    def node_of(self, slot: int) -> int | None:
        return self.holder.get(slot)

    def slot_of(self, node: int) -> int | None:
        return next((s for s, n in self.holder.items() if n == node), None)

    def unknown(self, node: int) -> bool:
        """A node to send a join query to: it holds no slot, was not refused for good, and did not leave a query
        unanswered in the last RETRY_ROUNDS rounds (a dead node must not cost every round a wait)."""
        if self.slot_of(node) is not None or self.refused.get(node, ("", False))[1]:
            return False
        return self.rounds - self._asked.get(node, -RETRY_ROUNDS) >= RETRY_ROUNDS

    def refuse(self, node: int, reason: str, final: bool = True) -> None:
        self.refused[node] = (reason, final)
        if not final:
            self._asked[node] = self.rounds
        log.warning("node %s not admitted: %s", node, reason)

    def why_not(self, slot: int) -> str:
        reasons = [r for r, _ in self.refused.values()]
        return f" (last refusal: {reasons[-1]})" if reasons else ""

    def admit(self, node: int, slot: int, key: bytes | None, proof: bytes | None, nonce: bytes) -> str | None:
        """Admit ``node`` to ``slot`` (enrolling ``key``, or checking ``proof``); the reason if refused."""
        known = self.keys.get(slot)
        if known is None:
            if key is None:
                return f"slot {slot} is not enrolled and the node sent no key"
            self.keys[slot] = key
            if self.journal is not None:
                self.journal.append(json.dumps({"slot": slot, "key": key.hex()}).encode())
        elif proof is None or not hmac.compare_digest(proof, keys.slot_proof(known, nonce, node)):
            return f"slot {slot} is enrolled with another key (no valid proof)"
        old = self.holder.get(slot)
        if old is not None and old != node:
            log.info("slot %d: node %s replaces node %s (a restarted SuperNode)", slot, node, old)
        self.holder[slot] = node
        self.refused.pop(node, None)
        return None


def take_join(admission: Admission, reply: Message, node: int, nonce: bytes, digest: bytes | None) -> int:
    """Check a join answer (every field's type) and admit or refuse the node; returns the answer's protocol bytes.
    Never raises: a malformed answer refuses the node."""
    try:
        if reply.has_error():
            admission.refuse(node, f"Flower error {reply.error.code}: {str(reply.error.reason)[:200]}", final=False)
            return 0
        content = reply.content.config_records["hiso"]
        slot, initial = content.get("slot"), content.get("initial")
        key, proof = content.get("enroll"), content.get("proof")
        if type(slot) is not int or not 0 <= slot < admission.n_slots:
            admission.refuse(node, f"claims an invalid slot {str(slot)[:40]!r}")
            return 0
        if type(initial) is not bytes or len(initial) != 16:
            admission.refuse(node, "sent no 16-byte initial-weights digest")
            return 0
        if digest is not None and initial != digest:
            admission.refuse(node, f"initial weights differ from the server's (digest {initial.hex()}, expected "
                                   f"{digest.hex()})")
            return 0
        for name, value in (("enroll", key), ("proof", proof)):
            if value is not None and (type(value) is not bytes or len(value) != keys.KEY_BYTES):
                admission.refuse(node, f"{name} is not {keys.KEY_BYTES} bytes")
                return 0
        reason = admission.admit(node, slot, key, proof, nonce)
        if reason is not None:
            admission.refuse(node, reason)
            return 0
        return 8 + 16 + keys.KEY_BYTES
    except Exception as exc:  # never let one node's answer end the run
        admission.refuse(node, f"invalid join answer: {type(exc).__name__}: {str(exc)[:200]}")
        return 0
