"""The server of the scalar-only protocol: samples clients, draws seeds, validates and aggregates replies, and keeps
the log as a durable journal (:mod:`hiso.fl.journal`) from which it resumes exactly.

Round i (``iteration``: every round opened, applied or skipped): the clients and seeds are a keyed PRF of (run key,
i) (:mod:`hiso.fl.keys`); each reply is decoded, type- and range-checked and bounded (:mod:`hiso.fl.robust`); at
the end the accepted replies are aggregated into a record that is journaled (fsync'd) *before* it is applied or sent
to anyone. Fewer than ``min_replies`` valid replies: the round is journaled as skipped and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import struct

from . import keys, robust
from .journal import Journal
from .messages import MAX_CATCH_UP, ClientReply, RoundAssignment, RoundRecord, is_finite_block
from .protocol import FLConfig, Replica

log = logging.getLogger("hiso.fl")

AGGREGATIONS = robust.AGGREGATIONS
JOURNAL_FORMAT = "hiso-journal"
JOURNAL_VERSION = 1
_ENTRY = struct.Struct("<cII")  # kind (b"R" applied, b"S" skipped), iteration, record length
_F32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class RoundEntry:
    """One journal entry: a round applied (``record``) or skipped (``record`` None), with server-side facts
    (``meta``: sampled and accepted clients, norms, and what the driver adds, e.g. bytes and losses)."""

    iteration: int
    record: RoundRecord | None
    meta: dict

    def encode(self) -> bytes:
        rec = self.record.encode() if self.record is not None else b""
        kind = b"R" if self.record is not None else b"S"
        return _ENTRY.pack(kind, self.iteration, len(rec)) + rec + json.dumps(self.meta, sort_keys=True).encode()

    @classmethod
    def decode(cls, body: bytes) -> RoundEntry:
        kind, iteration, n = _ENTRY.unpack_from(body, 0)
        pos = _ENTRY.size
        record = None
        if kind == b"R":
            record, end = RoundRecord.decode_from(body, pos)
            if end != pos + n:
                raise ValueError("record length does not match")
        elif kind != b"S" or n:
            raise ValueError(f"unknown entry kind {kind!r}")
        meta = json.loads(body[pos + n:])
        if not isinstance(meta, dict):
            raise ValueError("entry metadata is not an object")
        return cls(iteration, record, meta)


class Server:
    """Samples clients, draws seeds, validates and aggregates replies, keeps the journaled log.

    ``replica`` (optional) is a server-side model kept at the head of the log, for evaluation. Seeds and samples come
    from a secret ``run_key`` (default: fresh from the OS); ``experiment_seed`` / ``sampling_seed`` derive the keys
    from integers instead, for reproducible experiments only. ``journal``: a :class:`Journal` to append to (default:
    one in memory; :meth:`create_journal` starts a file).
    """

    def __init__(self, config: FLConfig, n_clients: int, clients_per_round: int, *,
                 aggregation: str = robust.DEFAULT_AGGREGATION, trim: float = 0.1,
                 scalar_bound: float | None = None, norm_factor: float = robust.DEFAULT_NORM_FACTOR,
                 norm_window: int = robust.DEFAULT_NORM_WINDOW, min_replies: int = 1,
                 replica: Replica | None = None, run_key: bytes | None = None, sampling_key: bytes | None = None,
                 sampling_seed: int | None = None, experiment_seed: int | None = None):
        if not (isinstance(n_clients, int) and isinstance(clients_per_round, int)
                and 1 <= clients_per_round <= n_clients):
            raise ValueError(f"need 1 <= clients_per_round <= n_clients, got {clients_per_round}, {n_clients}")
        robust.check_settings(aggregation, trim, scalar_bound, norm_factor, norm_window)
        if not isinstance(min_replies, int) or not 1 <= min_replies <= clients_per_round:
            raise ValueError(f"min_replies must be in [1, clients_per_round={clients_per_round}], got {min_replies!r}")
        self.config = config
        self.n_clients, self.clients_per_round = n_clients, clients_per_round
        self.aggregation, self.trim, self.scalar_bound = aggregation, float(trim), scalar_bound
        self.norm_factor, self.norm_window, self.min_replies = float(norm_factor), norm_window, min_replies
        self.replica = replica
        if run_key is None:
            run_key = keys.key_from_seed(experiment_seed) if experiment_seed is not None else keys.new_key()
        if sampling_key is None:
            sampling_key = keys.key_from_seed(sampling_seed, "sample") if sampling_seed is not None else run_key
        self.run_key, self.sampling_key = keys.check_key(run_key), keys.check_key(sampling_key, "sampling_key")
        self.records: list[RoundRecord] = []
        self.rejections: list[tuple[int, int, str]] = []  # (round, client, reason)
        self.client_round = [0] * n_clients  # records each client holds (as of its last assignment)
        self.iteration = 0  # rounds opened so far (applied or skipped): the PRF's round counter
        self.norms: dict[str, list[float]] = {"scalars": [], "second": []}  # median accepted norm per applied round
        self.clipped = 0
        self.journal = Journal(self.journal_header())
        self._open: tuple[int, list[int], tuple[int, ...]] | None = None
        self._replies: dict[int, ClientReply] = {}
        self._clipped_now: list[int] = []
        self._behind: dict[int, int] = {}  # clients of the open round that reported holding fewer records

    @property
    def round(self) -> int:
        """The log index of the next record (= records applied so far)."""
        return len(self.records)

    # ------------------------------------------------------------------ journal
    def journal_header(self, **extra) -> dict:
        settings = dict(n_clients=self.n_clients, clients_per_round=self.clients_per_round,
                        aggregation=self.aggregation, trim=self.trim, scalar_bound=self.scalar_bound,
                        norm_factor=self.norm_factor, norm_window=self.norm_window, min_replies=self.min_replies)
        return {"format": JOURNAL_FORMAT, "version": JOURNAL_VERSION, "config": json.loads(self.config.to_json()),
                "server": settings, "keys": {"run": self.run_key.hex(), "sampling": self.sampling_key.hex()},
                **extra}

    def create_journal(self, path: str, **extra) -> Journal:
        """Start a journal file at ``path`` for this (fresh) server; ``extra`` header fields (e.g. the initial
        weights' digest, the experiment's settings) go in with it."""
        if self.iteration:
            raise RuntimeError("create_journal needs a fresh server (this one has run rounds)")
        self.journal = Journal.create(path, self.journal_header(**extra))
        return self.journal

    @classmethod
    def resume(cls, journal: Journal | str, replica: Replica | None = None) -> Server:
        """The server of a journal (a :class:`Journal` or a path), at the journal's last round; ``replica`` (at the
        initial weights) is brought to the head of the log in one pass. Appending continues in the same journal."""
        if isinstance(journal, str):
            journal = Journal.open(journal)
        head = journal.header
        if head.get("format") != JOURNAL_FORMAT or head.get("version") != JOURNAL_VERSION:
            raise ValueError(f"not a hiso server journal of version {JOURNAL_VERSION}: "
                             f"{head.get('format')!r} {head.get('version')!r}")
        config = FLConfig(**head["config"])
        if replica is not None and replica.config != config:
            raise ValueError("the replica's configuration differs from the journal's")
        server = cls(config, replica=replica, run_key=bytes.fromhex(head["keys"]["run"]),
                     sampling_key=bytes.fromhex(head["keys"]["sampling"]), **head["server"])
        for i, body in enumerate(journal.entries):
            try:
                entry = RoundEntry.decode(body)
            except (ValueError, KeyError, struct.error) as exc:
                raise ValueError(f"journal entry {i} cannot be decoded: {exc}") from None
            if entry.iteration != i or (entry.record is not None and entry.record.round != server.round):
                raise ValueError(f"journal entry {i} is out of order (iteration {entry.iteration})")
            server._account(entry)
        server.journal = journal
        if replica is not None:
            replica.apply(server.records[replica.applied:])
        return server

    def _account(self, entry: RoundEntry) -> None:
        """Advance the in-memory state by one journal entry (used live and on resume, so both agree)."""
        for c in entry.meta.get("sampled", []):
            self.client_round[c] = entry.meta.get("log_index", self.round)
        for c, held in entry.meta.get("behind", {}).items():
            self.client_round[int(c)] = held
        if entry.record is not None:
            self.records.append(entry.record)
            for name, value in entry.meta.get("norms", {}).items():
                self.norms[name].append(float(value))
        self.iteration += 1

    # ------------------------------------------------------------------ rounds
    def begin_round(self) -> list[RoundAssignment]:
        if self._open is not None:
            raise RuntimeError("the previous round is still open")
        clients = keys.round_sample(self.sampling_key, self.iteration, self.n_clients, self.clients_per_round)
        seeds = keys.round_seeds(self.run_key, self.iteration, self.config.local_steps)
        self._open = (self.round, clients, seeds)
        self._replies, self._clipped_now, self._behind = {}, [], {}
        # a client further behind than one message carries gets the first chunk; it reports what it holds and is
        # sent the rest (hiso.integrations.flower.transport)
        return [RoundAssignment(self.round, c, seeds,
                                tuple(self.records[self.client_round[c]:self.client_round[c] + MAX_CATCH_UP]))
                for c in clients]

    @property
    def open_clients(self) -> list[int]:
        """The clients sampled in the open round ([] when none is open)."""
        return list(self._open[1]) if self._open else []

    def submit(self, reply: ClientReply | bytes, sender: int) -> bool:
        """Validate a reply from ``sender`` (the client identity the transport authenticated); on rejection log the
        reason and return False (the round goes on without it, and nothing but ``rejections`` changes).

        Any reply is safe to pass: wrong types, wrong sizes, non-finite or huge values, another client's id, a
        stale round; every exception while checking it rejects it."""
        if self._open is None:
            raise RuntimeError("no round is open")
        if not isinstance(sender, int) or isinstance(sender, bool):
            raise TypeError(f"sender must be the authenticated client index (an int), got {type(sender).__name__}")
        rnd = self._open[0]
        try:
            decoded, reason = self._decode_and_check(reply, sender)
        except Exception as exc:  # a hostile reply must never end the run
            decoded, reason = None, f"invalid reply: {type(exc).__name__}: {exc}"
        if reason is not None or decoded is None:
            self.rejections.append((rnd, sender, str(reason)[:500]))
            log.warning("round %d: rejected reply from client %d: %s", rnd, sender, str(reason)[:500])
            return False
        self._replies[sender] = decoded
        return True

    def _decode_and_check(self, reply, sender: int) -> tuple[ClientReply | None, str | None]:
        if isinstance(reply, ClientReply):
            reply = reply.encode()  # canonical: checks every field's type and rounds to the wire's float32
        if not isinstance(reply, (bytes, bytearray, memoryview)):
            return None, f"not a reply ({type(reply).__name__})"
        decoded = ClientReply.decode(bytes(reply))
        if decoded.client != sender:
            return None, f"client id {decoded.client} does not match the sender {sender}"
        assert self._open is not None
        reason = self._check(decoded, self._open[0], self._open[1])
        if reason is not None:
            return None, reason
        return self._clip(decoded, sender), None

    def _check(self, reply: ClientReply, rnd: int, clients: list[int]) -> str | None:
        c = self.config
        if reply.round != rnd:
            return f"stale or future round {reply.round} (open round is {rnd})"
        if reply.client not in clients:
            return f"client {reply.client} was not sampled this round"
        if reply.client in self._replies:
            return "duplicate reply"
        if len(reply.scalars) != c.local_steps or any(len(r) != c.num_directions for r in reply.scalars):
            return (f"wrong number of scalars: expected {c.local_steps} x {c.num_directions}, "
                    f"got {len(reply.scalars)} x {[len(r) for r in reply.scalars]}")
        second = reply.second_differences
        if c.sends_second_differences != (second is not None) or (second is not None and (
                len(second) != c.local_steps or any(len(r) != c.num_directions for r in second))):
            return "missing, unexpected or malformed second differences"
        if not is_finite_block(reply.scalars) or (second is not None and not is_finite_block(second)):
            return "non-finite scalar"
        bound = self.scalar_bound
        if robust.beyond_bound(reply.scalars, bound) or robust.beyond_bound(second or (), bound):
            return f"scalar beyond the bound {self.scalar_bound}"
        return None

    def _clip(self, reply: ClientReply, sender: int) -> ClientReply:
        if not self.norm_factor:
            return reply
        def clipped(name: str, block):
            ref = robust.norm_reference(self.norms[name], self.norm_window) if block is not None else None
            if ref is None:
                return block
            block, was = robust.clip(block, self.norm_factor * ref)
            if was:
                self._clipped_now.append(sender)
                log.info("round %d: clipped client %d's %s to norm %.3g", reply.round, sender, name,
                         self.norm_factor * ref)
            return block

        return dataclasses.replace(reply, scalars=clipped("scalars", reply.scalars),
                                   second_differences=clipped("second", reply.second_differences))

    def record_failure(self, client: int, reason: str) -> None:
        """Log that a sampled client of the open round gave no usable answer (a transport error, a timeout)."""
        if self._open is None:
            raise RuntimeError("no round is open")
        self.rejections.append((self._open[0], int(client), reason))
        log.warning("round %d: no answer from client %d: %s", self._open[0], client, reason)

    def resync(self, client: int, applied: int) -> None:
        """Record how many log records a client reports it holds (a restarted client holds none).

        Only which catch-up records the client is sent next depends on it; the log and the model do not."""
        if not 0 <= client < self.n_clients:
            raise ValueError(f"client {client} is not in [0, {self.n_clients})")
        if not 0 <= applied <= self.round:
            raise ValueError(f"client {client} reports {applied} records; the log has {self.round}")
        self.client_round[client] = int(applied)
        if self._open is not None and client in self._open[1]:
            self._behind[client] = int(applied)

    def end_round(self, note: dict | None = None) -> RoundRecord | None:
        """Aggregate the accepted replies, journal the round (applied or skipped) and apply it to the replica.

        ``note``: JSON-able facts of the driver (bytes, losses, batches used) journaled with the round."""
        if self._open is None:
            raise RuntimeError("no round is open")
        rnd, clients, seeds = self._open
        self._open = None
        accepted = sorted(self._replies)
        meta = {"sampled": clients, "log_index": rnd, "accepted": accepted, "clipped": sorted(set(self._clipped_now)),
                **(note or {})}
        behind = {str(c): a for c, a in self._behind.items() if c not in self._replies and a < rnd}
        if behind:  # still behind at the end of the round: they hold fewer records than they were sent
            meta["behind"] = behind
        record, why = None, None
        if len(accepted) < self.min_replies:
            why = f"{len(accepted)} valid replies, fewer than min_replies={self.min_replies}"
        else:
            replies = [self._replies[c] for c in accepted]
            scalars = robust.aggregate([r.scalars for r in replies], self.aggregation, self.trim)
            second = (robust.aggregate([r.second_differences for r in replies], self.aggregation, self.trim)  # type: ignore[misc]
                      if self.config.sends_second_differences else None)
            if any(abs(v) > _F32_MAX for row in scalars + (second or ()) for v in row):
                why = "the aggregate is not representable in float32"
            else:
                # the record is what goes on the wire: round its floats to fp32 now, so everyone applies the same
                record = RoundRecord.decode_from(RoundRecord(rnd, seeds, scalars, second).encode())[0]
                meta["norms"] = {"scalars": _median_norm(r.scalars for r in replies)}
                if second is not None:
                    meta["norms"]["second"] = _median_norm(r.second_differences for r in replies)  # type: ignore[misc]
        if why is not None:
            meta["skipped"] = why
            log.warning("round %d: skipped (%s); the model is unchanged", rnd, why)
        entry = RoundEntry(self.iteration, record, meta)
        self.journal.append(entry.encode())  # durable before anyone sees or applies it
        self.clipped += len(set(self._clipped_now))
        self._account(entry)
        if record is not None and self.replica is not None:
            self.replica.apply(self.records[self.replica.applied:])
        return record

    def entries(self) -> list[RoundEntry]:
        return [RoundEntry.decode(b) for b in self.journal.entries]

    # ------------------------------------------------------------------ checkpoint: the journal as bytes
    def checkpoint(self) -> bytes:
        """The journal as bytes (header with the configuration and keys, every round; checksummed)."""
        return self.journal.to_bytes()

    @classmethod
    def restore(cls, blob: bytes, replica: Replica | None = None) -> Server:
        """Rebuild a server from :meth:`checkpoint` (verified; :class:`~hiso.fl.journal.JournalError` if damaged)."""
        return cls.resume(Journal.from_bytes(blob, name="<checkpoint>"), replica)


def _median_norm(blocks) -> float:
    norms = sorted(robust.block_norm(b) for b in blocks)
    return norms[len(norms) // 2] if len(norms) % 2 else math.fsum(norms[len(norms) // 2 - 1:len(norms) // 2 + 1]) / 2
