"""Wire format of the scalar-only federated protocol (version 1), with exact byte counts.

All integers and floats are little-endian. Every message starts with a 12-byte header:

    magic "HS" (2) | version u8 | type u8 | round u32 | client u32

``ClientReply`` (client -> server, type 2) adds K u8 | P u8 | flags u8 and then K x P float32 directional scalars
c[k, p] (row-major by local step), and K x P float32 second differences when flag bit 0 is set (the "stein" rule):
15 bytes of framing plus 4 K P bytes of payload, so 20 bytes of payload for K = 1, P = 5.

``RoundRecord`` (the server's log entry, 9 bytes of framing): round u32 | K u8 | P u8 | flags u8 | reserved u16,
then K u64 seeds, K x P float32 aggregated scalars and, if flagged, K x P float32 aggregated second differences. The
records determine every later model: a checkpoint of the server is its configuration plus its records.

``RoundAssignment`` (server -> client, type 1): header | K u8 | count u16 of catch-up records, then K u64 seeds of
this round, then the catch-up records the client missed (each encoded as above).
"""

from __future__ import annotations

import dataclasses
import math
import struct

MAGIC = b"HS"
VERSION = 1
TYPE_ASSIGNMENT = 1
TYPE_REPLY = 2
HEADER = struct.Struct("<2sBBII")  # 12 bytes
REPLY_FRAMING = struct.Struct("<BBB")  # K, P, flags
RECORD_FRAMING = struct.Struct("<IBBBH")  # round, K, P, flags, reserved
ASSIGNMENT_FRAMING = struct.Struct("<BH")  # K, number of catch-up records
FLAG_SECOND_DIFFERENCES = 1
FLAG_CURVATURE = FLAG_SECOND_DIFFERENCES  # deprecated name

#: most catch-up records one assignment carries (its count field is 16 bits); a node further behind gets chunks
MAX_CATCH_UP = 0xFFFF
#: framing bytes of a client reply (header + K, P, flags)
REPLY_OVERHEAD = HEADER.size + REPLY_FRAMING.size


class MessageError(ValueError):
    """A message that cannot be decoded (wrong magic, version, type or length)."""


def _check_counts(k: int, p: int) -> None:
    if not (1 <= k <= 255 and 1 <= p <= 255):
        raise ValueError(f"K and P must be in [1, 255], got K={k}, P={p}")


def _f32_block(values, n: int, name: str) -> bytes:
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values, expected {n}")
    return struct.pack(f"<{n}f", *values)


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One applied round: its seeds (one per local step) and the aggregated scalars [k][p]."""

    round: int
    seeds: tuple[int, ...]
    scalars: tuple[tuple[float, ...], ...]
    second_differences: tuple[tuple[float, ...], ...] | None = None

    @property
    def curvature(self) -> tuple[tuple[float, ...], ...] | None:
        """Deprecated name of :attr:`second_differences`."""
        return _deprecated_second_differences(self)

    @property
    def local_steps(self) -> int:
        return len(self.seeds)

    @property
    def num_directions(self) -> int:
        return len(self.scalars[0])

    def encode(self) -> bytes:
        k, p = self.local_steps, self.num_directions
        _check_counts(k, p)
        flags = FLAG_SECOND_DIFFERENCES if self.second_differences is not None else 0
        out = [RECORD_FRAMING.pack(self.round, k, p, flags, 0), struct.pack(f"<{k}Q", *self.seeds)]
        out.append(_f32_block([c for row in self.scalars for c in row], k * p, "scalars"))
        if self.second_differences is not None:
            out.append(_f32_block([c for row in self.second_differences for c in row], k * p, "second_differences"))
        return b"".join(out)

    @classmethod
    def decode_from(cls, buf: bytes, pos: int = 0) -> tuple[RoundRecord, int]:
        try:
            rnd, k, p, flags, _ = RECORD_FRAMING.unpack_from(buf, pos)
            pos += RECORD_FRAMING.size
            seeds = struct.unpack_from(f"<{k}Q", buf, pos)
            pos += 8 * k
            flat = struct.unpack_from(f"<{k * p}f", buf, pos)
            pos += 4 * k * p
            curv = None
            if flags & FLAG_SECOND_DIFFERENCES:
                cflat = struct.unpack_from(f"<{k * p}f", buf, pos)
                pos += 4 * k * p
                curv = tuple(tuple(cflat[i * p:(i + 1) * p]) for i in range(k))
        except struct.error as exc:
            raise MessageError(f"truncated round record: {exc}") from None
        if k == 0 or p == 0:
            raise MessageError("round record with K = 0 or P = 0")
        return cls(rnd, tuple(seeds), tuple(tuple(flat[i * p:(i + 1) * p]) for i in range(k)), curv), pos


@dataclasses.dataclass(frozen=True)
class ClientReply:
    """A client's answer for one round: K x P directional scalars (and second differences for the stein rule)."""

    round: int
    client: int
    scalars: tuple[tuple[float, ...], ...]
    second_differences: tuple[tuple[float, ...], ...] | None = None

    @property
    def curvature(self) -> tuple[tuple[float, ...], ...] | None:
        """Deprecated name of :attr:`second_differences`."""
        return _deprecated_second_differences(self)

    def encode(self) -> bytes:
        k, p = len(self.scalars), len(self.scalars[0]) if self.scalars else 0
        _check_counts(k, p)
        flags = FLAG_SECOND_DIFFERENCES if self.second_differences is not None else 0
        out = [HEADER.pack(MAGIC, VERSION, TYPE_REPLY, self.round, self.client), REPLY_FRAMING.pack(k, p, flags)]
        out.append(_f32_block([c for row in self.scalars for c in row], k * p, "scalars"))
        if self.second_differences is not None:
            out.append(_f32_block([c for row in self.second_differences for c in row], k * p, "second_differences"))
        return b"".join(out)

    @classmethod
    def decode(cls, buf: bytes) -> ClientReply:
        rnd, client = _decode_header(buf, TYPE_REPLY)
        pos = HEADER.size
        try:
            k, p, flags = REPLY_FRAMING.unpack_from(buf, pos)
        except struct.error:
            raise MessageError("truncated client reply") from None
        pos += REPLY_FRAMING.size
        n = k * p * (2 if flags & FLAG_SECOND_DIFFERENCES else 1)
        if len(buf) != pos + 4 * n:
            raise MessageError(f"client reply has {len(buf)} bytes, expected {pos + 4 * n} for K={k}, P={p}")
        flat = struct.unpack_from(f"<{k * p}f", buf, pos)
        curv = None
        if flags & FLAG_SECOND_DIFFERENCES:
            cflat = struct.unpack_from(f"<{k * p}f", buf, pos + 4 * k * p)
            curv = tuple(tuple(cflat[i * p:(i + 1) * p]) for i in range(k))
        return cls(rnd, client, tuple(tuple(flat[i * p:(i + 1) * p]) for i in range(k)), curv)


@dataclasses.dataclass(frozen=True)
class RoundAssignment:
    """The server's message to a sampled client: this round's seeds and the records it has missed."""

    round: int
    client: int
    seeds: tuple[int, ...]
    catch_up: tuple[RoundRecord, ...] = ()

    def encode(self) -> bytes:
        k = len(self.seeds)
        _check_counts(k, 1)
        if len(self.catch_up) > MAX_CATCH_UP:
            raise ValueError(f"more than {MAX_CATCH_UP} catch-up records for one message; send them in chunks")
        out = [HEADER.pack(MAGIC, VERSION, TYPE_ASSIGNMENT, self.round, self.client),
               ASSIGNMENT_FRAMING.pack(k, len(self.catch_up)), struct.pack(f"<{k}Q", *self.seeds)]
        out += [r.encode() for r in self.catch_up]
        return b"".join(out)

    @classmethod
    def decode(cls, buf: bytes) -> RoundAssignment:
        rnd, client = _decode_header(buf, TYPE_ASSIGNMENT)
        pos = HEADER.size
        try:
            k, count = ASSIGNMENT_FRAMING.unpack_from(buf, pos)
            pos += ASSIGNMENT_FRAMING.size
            seeds = struct.unpack_from(f"<{k}Q", buf, pos)
        except struct.error:
            raise MessageError("truncated round assignment") from None
        pos += 8 * k
        records = []
        for _ in range(count):
            rec, pos = RoundRecord.decode_from(buf, pos)
            records.append(rec)
        if pos != len(buf):
            raise MessageError(f"round assignment has {len(buf) - pos} trailing bytes")
        return cls(rnd, client, tuple(seeds), tuple(records))


def _decode_header(buf: bytes, expected_type: int) -> tuple[int, int]:
    if len(buf) < HEADER.size:
        raise MessageError(f"message of {len(buf)} bytes is shorter than the {HEADER.size}-byte header")
    magic, version, mtype, rnd, client = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise MessageError(f"bad magic {magic!r}")
    if version != VERSION:
        raise MessageError(f"unsupported protocol version {version} (this is version {VERSION})")
    if mtype != expected_type:
        raise MessageError(f"message type {mtype}, expected {expected_type}")
    return rnd, client


def _deprecated_second_differences(message):
    import warnings

    warnings.warn(f"{type(message).__name__}.curvature is deprecated; use second_differences", DeprecationWarning,
                  stacklevel=3)
    return message.second_differences


def is_finite_block(rows) -> bool:
    return all(math.isfinite(v) for row in rows for v in row)
