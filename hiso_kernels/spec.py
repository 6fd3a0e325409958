"""The frozen direction specification (see ``docs/directions.md``).

Every backend derives the same numbers from these constants; changing any of them changes every direction ever drawn,
so such a change must bump :data:`SPEC_VERSION` and the known-answer vectors in ``tests/test_spec_vectors.py``.

fp32 constants are given by their bit patterns and turned into Python floats that are exactly representable in fp32,
so that no backend rounds a decimal literal differently from another.
"""

from __future__ import annotations

import enum
import struct

#: Version of the direction / rounding specification. Directions with equal (seed, direction, index, distribution)
#: are identical on every backend and device for equal versions.
SPEC_VERSION = 1

# Philox4x32-10 (Salmon et al., SC'11; Random123), unchanged.
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF

#: Counter word 3 of a direction draw. Counter = (group lo, group hi, direction index, TAG).
TAG_DIRECTION = 0x00000000
#: Counter word 3 of a stochastic-rounding draw ("roun"); word 2 is 0, the key is the rounding seed.
TAG_ROUNDING = 0x726F756E

#: Seeds are 63-bit so that they fit a signed int64 everywhere (torch, Triton, C++).
SEED_MAX = (1 << 63) - 1
#: Direction indices p are 31-bit (counter word 2).
DIRECTION_MAX = (1 << 31) - 1
#: Global element indices j are below 2^62 (the group index j >> 2 fills counter words 0 and 1).
INDEX_LIMIT = 1 << 62


def f32(bits: int) -> float:
    """The fp32 value with the given bit pattern, as an (exact) Python float."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def to_f32(value: float) -> float:
    """Round a Python float to the nearest fp32 value (ties to even) and return it exactly as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


# Gaussian transform (Box-Muller with polynomial log / sin / cos built only from + - * / sqrt, no contraction).
LN2 = f32(0x3F317218)  # ln 2
SQRT2 = f32(0x3FB504F3)  # sqrt 2: mantissa above it is halved so that t = (m-1)/(m+1) stays in [-0.172, 0.172]
LOG_C1 = f32(0x3F2AAAAB)  # 2/3
LOG_C2 = f32(0x3ECCCCCD)  # 2/5
LOG_C3 = f32(0x3E924925)  # 2/7
LOG_C4 = f32(0x3E638E39)  # 2/9
SIN_C1 = f32(0xBE2AAAAB)  # -1/3!
SIN_C2 = f32(0x3C088889)  # 1/5!
SIN_C3 = f32(0xB9500D01)  # -1/7!
SIN_C4 = f32(0x3638EF1D)  # 1/9!
COS_C1 = f32(0xBF000000)  # -1/2!
COS_C2 = f32(0x3D2AAAAB)  # 1/4!
COS_C3 = f32(0xBAB60B61)  # -1/6!
COS_C4 = f32(0x37D00D01)  # 1/8!
HALF_PI = f32(0x3FC90FDB)  # pi / 2
TWO_POW_M24 = f32(0x33800000)  # 2^-24


class Distribution(enum.IntEnum):
    """Distribution of the direction entries u_j."""

    GAUSSIAN = 0  # N(0, 1), Box-Muller on two Philox words
    RADEMACHER = 1  # +-1 from the top bit of one Philox word

    @classmethod
    def parse(cls, value: str | int | Distribution) -> Distribution:
        return _parse_enum(cls, value, "distribution")


class CurvatureRule(enum.IntEnum):
    """How a round updates the diagonal curvature estimate H (see ``docs/kernels.md``).

    With the per-term curvature coefficients b_i and directions u_i of a round, s = sqrt(H):

    * ``NONE``: H is read (scaling) but not written.
    * ``GSQ`` (HiSo, arXiv 2506.02370; the authors' ``adam_forward.py``): v = (sum_i b_i u_i / s)^2.
    * ``STEIN`` (second-difference rule): v = H * sum_i b_i (u_i^2 - 1); with b_i = Delta_i / P and
      Delta_i = (f(x+mu z_i) + f(x-mu z_i) - 2 f(x)) / (2 mu^2) this is an unbiased estimate of diag(A) for a quadratic.

    then H <- max(beta H + (1 - beta) v, h_min).
    """

    NONE = 0
    GSQ = 1
    STEIN = 2

    @classmethod
    def parse(cls, value: str | int | CurvatureRule) -> CurvatureRule:
        return _parse_enum(cls, value, "curvature rule")


def _parse_enum(cls, value, what: str):
    """An enum member from itself, its lower-case name or its integer value; a clear ValueError otherwise."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls[value.strip().upper()]
        except KeyError:
            pass
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return cls(value)
        except ValueError:
            pass
    names = ", ".join(repr(m.name.lower()) for m in cls)
    raise ValueError(f"unknown {what} {value!r}; expected one of {names}")


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Scalar Philox4x32-10 in pure Python: the executable form of the spec, used to check every backend."""
    c0, c1, c2, c3 = (int(c) & MASK32 for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    for _ in range(PHILOX_ROUNDS):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def splitmix64(x: int) -> int:
    """SplitMix64 finaliser (Steele et al. 2014): used to derive rounding seeds from an operation's arguments."""
    x = (x + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return x ^ (x >> 31)


def derive_seed(*words: int) -> int:
    """A deterministic 63-bit seed from integers, by chained SplitMix64 (used for per-step seeds of an optimizer and
    for stochastic-rounding seeds)."""
    h = 0x6869736F  # "hiso"
    for w in words:
        h = splitmix64(h ^ (int(w) & ((1 << 64) - 1)))
    return h & SEED_MAX


def rounding_seed(*words: int) -> int:
    """Stochastic-rounding seed of a round, from its own content (seeds, direction indices, fp32 bit patterns).

    Deriving it from the round's arguments keeps stochastic rounding replayable: the same round replayed later draws
    the same rounding bits.
    """
    return derive_seed(*words)
