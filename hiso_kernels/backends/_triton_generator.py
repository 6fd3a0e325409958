"""Triton form of the direction generator and of storage rounding (``docs/directions.md``, spec version 1).

Blocks are two-dimensional, ``[groups, 4]``: row i holds the four elements 4 g_i .. 4 g_i + 3 of one Philox group, so
the Philox words and the Gaussian pairs are computed on ``[groups]`` vectors and joined into rows in registers. (A
one-dimensional ``[4 groups]`` block needs ``tl.interleave`` back to element order, which Triton lowers through
shared memory with barriers.) Values carried across a loop stay ``[groups]`` lane vectors or derive from a load:
a ``[groups, 4]`` ``tl.zeros`` carried by a loop gets Triton's default layout (four threads per row), and every
iteration then pays layout conversions through shared memory.

Every floating-point operation is one IEEE fp32 operation: the kernels are compiled with ``enable_fp_fusion=False``
and use the correctly rounded ``div_rn`` / ``sqrt_rn``; bf16 is rounded with integer operations (the interpreter's
own fp32 -> bf16 cast truncates).

No ``from __future__ import annotations`` here or in ``_triton_kernels.py``: Triton reads the kernels' annotations
(``tl.int64``) as objects.
"""

import triton
import triton.language as tl

from .. import spec
from .._codes import DType
from ..spec import CurvatureRule, Distribution

# codes of the constexpr switches (the tables in hiso_kernels/_codes.py and spec.py)
F32 = tl.constexpr(int(DType.FLOAT32))
BF16 = tl.constexpr(int(DType.BFLOAT16))
F16 = tl.constexpr(int(DType.FLOAT16))
GAUSSIAN = tl.constexpr(int(Distribution.GAUSSIAN))
RADEMACHER = tl.constexpr(int(Distribution.RADEMACHER))
RULE_NONE = tl.constexpr(int(CurvatureRule.NONE))
RULE_GSQ = tl.constexpr(int(CurvatureRule.GSQ))
RULE_STEIN = tl.constexpr(int(CurvatureRule.STEIN))

_M0 = tl.constexpr(spec.PHILOX_M0)
_M1 = tl.constexpr(spec.PHILOX_M1)
_W0 = tl.constexpr(spec.PHILOX_W0)
_W1 = tl.constexpr(spec.PHILOX_W1)
_TAG_DIRECTION = tl.constexpr(spec.TAG_DIRECTION)
_TAG_ROUNDING = tl.constexpr(spec.TAG_ROUNDING)
_LN2 = tl.constexpr(spec.LN2)
_SQRT2 = tl.constexpr(spec.SQRT2)
_LOG_C1 = tl.constexpr(spec.LOG_C1)
_LOG_C2 = tl.constexpr(spec.LOG_C2)
_LOG_C3 = tl.constexpr(spec.LOG_C3)
_LOG_C4 = tl.constexpr(spec.LOG_C4)
_SIN_C1 = tl.constexpr(spec.SIN_C1)
_SIN_C2 = tl.constexpr(spec.SIN_C2)
_SIN_C3 = tl.constexpr(spec.SIN_C3)
_SIN_C4 = tl.constexpr(spec.SIN_C4)
_COS_C1 = tl.constexpr(spec.COS_C1)
_COS_C2 = tl.constexpr(spec.COS_C2)
_COS_C3 = tl.constexpr(spec.COS_C3)
_COS_C4 = tl.constexpr(spec.COS_C4)
_HALF_PI = tl.constexpr(spec.HALF_PI)
_TWO_POW_M24 = tl.constexpr(spec.TWO_POW_M24)


@triton.jit
def philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (keys are uint32 scalars); Salmon et al., SC'11 (Random123)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        hi1 = tl.umulhi(c2, _M1)
        lo0 = tl.mul(c0, _M0, sanitize_overflow=False)
        lo1 = tl.mul(c2, _M1, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def group_words(key, c2, c3, g):
    """Philox words of the groups g (int64 block) under a 64-bit key (int64 scalar) and counter words 2 and 3."""
    key = key.to(tl.int64)  # the interpreter passes a small Python int as int32
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = (key >> 32).to(tl.uint32)
    c0 = (g & 0xFFFFFFFF).to(tl.uint32)
    c1 = (g >> 32).to(tl.uint32)
    zero = tl.zeros_like(c0)
    return philox(c0, c1, zero + c2, zero + c3, k0, k1)


@triton.jit
def _log_unit(u):
    bits = u.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m > _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    t = tl.div_rn(m - 1.0, m + 1.0)
    w = t * t
    poly = 2.0 + w * (_LOG_C1 + w * (_LOG_C2 + w * (_LOG_C3 + w * _LOG_C4)))
    return e.to(tl.float32) * _LN2 + t * poly


@triton.jit
def gaussian_pair(ra, rb):
    """Box-Muller with polynomial ln, sin and cos in a fixed order (docs/directions.md, "Gaussian transform")."""
    u = (((ra >> 9) << 1) | 1).to(tl.float32) * _TWO_POW_M24
    radius = tl.sqrt_rn(_log_unit(u) * -2.0)
    q = rb >> 30
    f = ((((rb & 0x3FFFFFFF) >> 7) << 1) | 1).to(tl.float32) * _TWO_POW_M24
    a = (f - 0.5) * _HALF_PI
    a2 = a * a
    sa = a * (1.0 + a2 * (_SIN_C1 + a2 * (_SIN_C2 + a2 * (_SIN_C3 + a2 * _SIN_C4))))
    ca = 1.0 + a2 * (_COS_C1 + a2 * (_COS_C2 + a2 * (_COS_C3 + a2 * _COS_C4)))
    c = tl.where(q == 0, ca, tl.where(q == 1, -sa, tl.where(q == 2, -ca, sa)))
    s = tl.where(q == 0, sa, tl.where(q == 1, ca, tl.where(q == 2, -sa, -ca)))
    return radius * c, radius * s


@triton.jit
def rademacher(r):
    return tl.where((r >> 31) == 1, -1.0, 1.0)


@triton.jit
def spread_lanes(w0, w1, w2, w3):
    """Four ``[G]`` lane vectors -> the ``[G, 4]`` block in element order (row i = elements 4 g_i + lane).

    ``join`` adds a dimension held in each thread's registers, and merging two such dimensions is free, so the four
    values of a group stay in the thread that computed them (no shared memory, no barrier)."""
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [w0.shape[0], 4])


@triton.jit
def direction_lanes(seed, p, g, DIST: tl.constexpr):
    """u(seed, p) of the groups ``g`` (int64 ``[G]``) as four ``[G]`` lane vectors (elements 4 g + 0 .. 4 g + 3)."""
    w0, w1, w2, w3 = group_words(seed, p, _TAG_DIRECTION, g)
    if DIST == GAUSSIAN:
        z0, z1 = gaussian_pair(w0, w1)
        z2, z3 = gaussian_pair(w2, w3)
    else:
        z0 = rademacher(w0)
        z1 = rademacher(w1)
        z2 = rademacher(w2)
        z3 = rademacher(w3)
    return z0, z1, z2, z3


@triton.jit
def directions(seed, p, g, DIST: tl.constexpr):
    """u(seed, p) of the groups ``g`` (int64 ``[G]``) as a ``[G, 4]`` fp32 block."""
    z0, z1, z2, z3 = direction_lanes(seed, p, g, DIST)
    return spread_lanes(z0, z1, z2, z3)


@triton.jit
def rounding_bits(rseed, g):
    """Stochastic-rounding words of the groups ``g`` (int64 ``[G]``) as a ``[G, 4]`` uint32 block."""
    w0, w1, w2, w3 = group_words(rseed, 0, _TAG_ROUNDING, g)
    return spread_lanes(w0, w1, w2, w3)


@triton.jit
def bf16_nearest(b):
    """fp32 bits -> bf16 bits, round to nearest even; NaN -> 0x7FC0 (torch's conversion)."""
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)


@triton.jit
def fp16_stochastic_value(y, bits):
    """Stochastic rounding to fp16, returned as the exact fp32 value of the chosen half."""
    b = y.to(tl.uint32, bitcast=True)
    mag = b & 0x7FFFFFFF
    normal = ((b + (bits & 0x1FFF)) & 0xFFFFE000).to(tl.float32, bitcast=True)
    small = mag < 0x38800000
    q = tl.where(small, mag, 0).to(tl.float32, bitcast=True) * 16777216.0  # in range for the int conversion
    qi = q.to(tl.int32).to(tl.float32)
    frac = q - qi
    uni = (bits >> 8).to(tl.float32) * _TWO_POW_M24
    up = tl.where(uni < frac, qi + 1.0, qi)
    sub = ((up * _TWO_POW_M24).to(tl.uint32, bitcast=True) | (b & 0x80000000)).to(tl.float32, bitcast=True)
    out = tl.where(small, sub, normal)
    return tl.where((b & 0x7F800000) != 0x7F800000, out, y)
