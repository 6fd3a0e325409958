"""The run key: per-round seeds and client samples from a keyed pseudo-random function of (key, round).

Seeds decide the directions every client evaluates, so a client that could predict or choose them could steer the
model. The server draws a 256-bit key once (from the operating system's cryptographic source), keeps it in its
journal and never sends it; round i's seeds and sample are HMAC-SHA256(key, label | i | k) (RFC 2104; HMAC with
SHA-256 is a PRF under standard assumptions, Bellare, "New proofs for NMAC and HMAC", CRYPTO 2006). A resumed server
therefore draws exactly the seeds and clients the uninterrupted one would have, with no generator state to save.

For reproducible experiments (``hiso train --seed``, ``deterministic-seeds`` on Flower) the key derives from the
integer seed instead: anyone who knows that seed can predict the seeds, so such runs are for experiments only.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import struct

from hiso_kernels.spec import SEED_MAX

KEY_BYTES = 32


def new_key() -> bytes:
    """A fresh secret key from the operating system's cryptographic source."""
    return secrets.token_bytes(KEY_BYTES)


def key_from_seed(seed: int, purpose: str = "seeds") -> bytes:
    """The key of a reproducible experiment with this integer seed (public: for experiments only)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return hashlib.sha256(b"hiso-run-key\0" + purpose.encode() + b"\0" + str(seed).encode()).digest()


def check_key(key: bytes, name: str = "key") -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ValueError(f"{name} must be {KEY_BYTES} bytes")
    return bytes(key)


def prf(key: bytes, label: bytes, *words: int) -> bytes:
    """HMAC-SHA256(key, label | 0 | words as u64): 32 pseudo-random bytes."""
    msg = label + b"\0" + b"".join(struct.pack("<Q", w) for w in words)
    return hmac.new(key, msg, hashlib.sha256).digest()


def round_seeds(key: bytes, iteration: int, local_steps: int) -> tuple[int, ...]:
    """The K 63-bit seeds of round ``iteration`` (every round the server opens, applied or skipped, counts)."""
    return tuple(int.from_bytes(prf(key, b"seed", iteration, k)[:8], "little") & SEED_MAX
                 for k in range(local_steps))


def round_sample(key: bytes, iteration: int, n_clients: int, per_round: int) -> list[int]:
    """The sorted clients sampled in round ``iteration``: ``per_round`` of ``n_clients`` without replacement.

    ``random.Random`` seeded with a 256-bit PRF output draws the sample; its seeding and ``sample`` are stable across
    CPython versions, and the draw is not security relevant (who is sampled, not what they compute)."""
    rng = random.Random(int.from_bytes(prf(key, b"sample", iteration), "little"))
    return sorted(rng.sample(range(n_clients), per_round))


def slot_proof(node_key: bytes, nonce: bytes, node_id: int) -> bytes:
    """A Flower node's proof that it holds the key it enrolled its slot with (bound to the server's nonce and the
    node's current Flower id, so a recorded proof is useless elsewhere)."""
    return hmac.new(node_key, b"hiso-slot\0" + nonce + struct.pack("<Q", node_id & (2**64 - 1)),
                    hashlib.sha256).digest()
