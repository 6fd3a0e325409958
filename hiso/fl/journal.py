"""A durable, checksummed, append-only journal: the round log of a federated run, crash-safe.

The journal is the log of :mod:`hiso.fl.protocol` written to disk: its header holds the configuration, the digest of
the initial weights and the run's secret keys; each entry is one round (its :class:`~hiso.fl.messages.RoundRecord`
bytes, or a skip) with the server-side facts needed to resume exactly (sampled clients, norms, bytes). Initial
weights + journal = the model (``hiso export`` rebuilds it from the journal alone).

File layout (all integers little-endian)::

    magic b"HSJ\\x01" | header length u32 | header (UTF-8 JSON) | check_0 (8 bytes)
    entry i:            body length u32   | body                | check_i (8 bytes)

    check_0 = BLAKE2b-64(magic | length | header),  check_i = BLAKE2b-64(check_{i-1} | length | body)

Each check chains the previous one, so a flipped bit, a cut, a lost or reordered entry, or trailing bytes are found
at the first entry they touch, and :class:`JournalError` names it (``entry`` is its index, ``-1`` for the header).
Durability (Pillai et al., "All file systems are not created equal", OSDI 2014, for why each step is needed): a
new journal is written to a temporary file, fsync'd, renamed into place and the folder fsync'd; each entry is one
``os.write`` of the whole frame followed by ``fsync`` before anyone acts on it (write-ahead). A crash therefore
leaves every acknowledged entry intact. We use a plain file rather than SQLite because SQLite's integrity check
covers page structure, not the content of a record: per-entry checksums would be needed either way, and this way an
entry's bytes are exactly the protocol's record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct

MAGIC = b"HSJ\x01"
_LEN = struct.Struct("<I")
CHECK_BYTES = 8
#: refuse to read an entry or header bigger than this (a corrupted length must not allocate gigabytes)
MAX_FRAME = 64 << 20


class JournalError(ValueError):
    """A journal that is corrupt, truncated or not a journal. ``entry``: index of the first bad entry (-1: header)."""

    def __init__(self, path: str, entry: int, offset: int, what: str):
        where = "the header" if entry < 0 else f"entry {entry}"
        super().__init__(f"journal {path}: {where} (at byte {offset}) {what}")
        self.path, self.entry, self.offset = path, entry, offset


def _check(previous: bytes, length: bytes, body: bytes) -> bytes:
    return hashlib.blake2b(previous + length + body, digest_size=CHECK_BYTES).digest()


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temporary file, fsync, rename, fsync of the folder)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


class Journal:
    """A journal in memory, optionally backed by a file (``path``); :meth:`append` makes an entry durable first."""

    def __init__(self, header: dict, entries: list[bytes] | None = None, *, path: str | None = None,
                 _check_tail: bytes | None = None):
        self.header = header
        self.entries: list[bytes] = list(entries or [])
        self.path = path
        self._fd: int | None = None
        head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        self._head = MAGIC + _LEN.pack(len(head)) + head
        self._tail = _check_tail if _check_tail is not None else self._chain()

    def _chain(self) -> bytes:
        tail = _check(b"", b"", self._head)
        for body in self.entries:
            tail = _check(tail, _LEN.pack(len(body)), body)
        return tail

    # ------------------------------------------------------------------ creating and opening
    @classmethod
    def create(cls, path: str, header: dict) -> Journal:
        """Create a journal file with this header and no entry (atomically; an existing file is an error)."""
        if os.path.exists(path):
            raise FileExistsError(f"journal {path} exists (resume it, or choose another folder)")
        journal = cls(header, path=path)
        atomic_write(path, journal.to_bytes())
        return journal

    @classmethod
    def open(cls, path: str) -> Journal:
        """Read and verify a journal file, ready to append; :class:`JournalError` on any damage."""
        with open(path, "rb") as fh:
            blob = fh.read()
        journal = cls.from_bytes(blob, name=path)
        journal.path = path
        return journal

    @classmethod
    def from_bytes(cls, blob: bytes, *, name: str = "<bytes>") -> Journal:
        """Parse and verify a whole journal (see the module doc); raises :class:`JournalError` naming the first bad
        entry."""
        blob = bytes(blob)
        if len(blob) < 8 and MAGIC.startswith(blob[:4]):
            raise JournalError(name, -1, 0, f"is truncated ({len(blob)} bytes)")
        if blob[:4] != MAGIC:
            raise JournalError(name, -1, 0, "is not a hiso journal (bad magic)")
        (n,) = _LEN.unpack_from(blob, 4)
        end = 8 + n
        if n > MAX_FRAME or end + CHECK_BYTES > len(blob):
            raise JournalError(name, -1, 4, f"is truncated or has a corrupt length ({n} bytes)")
        tail = _check(b"", b"", blob[:end])
        if blob[end:end + CHECK_BYTES] != tail:
            raise JournalError(name, -1, 0, "fails its checksum")
        try:
            header = json.loads(blob[8:end])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # a checksum collision, or a bug
            raise JournalError(name, -1, 8, f"is not valid JSON: {exc}") from None
        if not isinstance(header, dict):
            raise JournalError(name, -1, 8, "is not a JSON object")
        pos = end + CHECK_BYTES
        entries: list[bytes] = []
        while pos < len(blob):
            i = len(entries)
            if pos + 4 > len(blob):
                raise JournalError(name, i, pos, f"is truncated ({len(blob) - pos} of its 4 length bytes)")
            length = blob[pos:pos + 4]
            (n,) = _LEN.unpack(length)
            if n > MAX_FRAME or pos + 4 + n + CHECK_BYTES > len(blob):
                raise JournalError(name, i, pos, f"is truncated or has a corrupt length ({n} bytes; "
                                                 f"{len(blob) - pos - 4} remain)")
            body = blob[pos + 4:pos + 4 + n]
            tail = _check(tail, length, body)
            if blob[pos + 4 + n:pos + 4 + n + CHECK_BYTES] != tail:
                raise JournalError(name, i, pos, "fails its checksum (corrupt, or entries lost or reordered)")
            entries.append(body)
            pos += 4 + n + CHECK_BYTES
        journal = cls(header, entries, _check_tail=tail)
        return journal

    def to_bytes(self) -> bytes:
        out = [self._head, _check(b"", b"", self._head)]
        tail = out[1]
        for body in self.entries:
            length = _LEN.pack(len(body))
            tail = _check(tail, length, body)
            out += [length, body, tail]
        return b"".join(out)

    # ------------------------------------------------------------------ appending
    def append(self, body: bytes) -> None:
        """Append one entry; with a file, it is on disk (written in one call and fsync'd) when this returns."""
        if len(body) > MAX_FRAME:
            raise ValueError(f"journal entry of {len(body)} bytes exceeds {MAX_FRAME}")
        length = _LEN.pack(len(body))
        tail = _check(self._tail, length, body)
        if self.path is not None:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            frame = length + body + tail
            written = os.write(self._fd, frame)
            if written != len(frame):  # a full disk: do not leave half an entry behind
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"journal {self.path}: short write ({written} of {len(frame)} bytes)")
            os.fsync(self._fd)
        self.entries.append(body)
        self._tail = tail

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()
