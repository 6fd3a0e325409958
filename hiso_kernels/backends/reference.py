"""The ``reference`` backend: the specification written in plain PyTorch. It materialises every direction, so it is slow
and memory-hungry by design; tests use it as the oracle that the fused backends must match bit for bit.

It runs on any device torch supports. Every step is one elementwise fp32 operation (no fused multiply-add, no
division by a Python scalar, which ATen may turn into a multiplication by the reciprocal).
"""

from __future__ import annotations

import torch

from .. import spec
from .._program import Program
from ..spec import CurvatureRule, Distribution
from .base import Backend, KernelLog, _bits

_M32 = spec.MASK32


def _u32_to_f32(bits: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values holding uint32 bit patterns as fp32."""
    signed = ((bits + (1 << 31)) & _M32) - (1 << 31)
    return signed.to(torch.int32).view(torch.float32)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 square root. torch.sqrt on the CPU is not (measured with torch 2.13: about 15% of
    random inputs differ in the last bit); an fp64 square root rounded to fp32 is, since 53 >= 2 * 24 + 2."""
    return torch.sqrt(x.to(torch.float64)).to(torch.float32)


def _f32_to_u32(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).to(torch.int64) & _M32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 values (products wrap modulo 2^64, which keeps hi and lo exact)."""
    for _ in range(spec.PHILOX_ROUNDS):
        p0 = c0 * spec.PHILOX_M0
        p1 = c2 * spec.PHILOX_M1
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + spec.PHILOX_W0) & _M32
        k1 = (k1 + spec.PHILOX_W1) & _M32
    return c0, c1, c2, c3


def group_words(seed: int, c2: int, c3: int, g: torch.Tensor):
    zero = torch.zeros_like(g)
    return philox4x32_10(g & _M32, (g >> 32) & _M32, zero + c2, zero + c3, seed & _M32, (seed >> 32) & _M32)


def _portable_log_unit(u: torch.Tensor) -> torch.Tensor:
    bits = _f32_to_u32(u)
    e = (bits >> 23) - 127
    m = _u32_to_f32((bits & 0x007FFFFF) | 0x3F800000)
    big = m > spec.SQRT2
    m = torch.where(big, m * 0.5, m)
    e = torch.where(big, e + 1, e)
    t = (m - 1.0) / (m + 1.0)
    w = t * t
    poly = 2.0 + w * (spec.LOG_C1 + w * (spec.LOG_C2 + w * (spec.LOG_C3 + w * spec.LOG_C4)))
    return e.to(torch.float32) * spec.LN2 + t * poly


def gaussian_pair(ra: torch.Tensor, rb: torch.Tensor):
    u = (((ra >> 9) << 1) | 1).to(torch.float32) * spec.TWO_POW_M24
    radius = _sqrt_rn(_portable_log_unit(u) * -2.0)
    q = rb >> 30
    f = ((((rb & 0x3FFFFFFF) >> 7) << 1) | 1).to(torch.float32) * spec.TWO_POW_M24
    a = (f - 0.5) * spec.HALF_PI
    a2 = a * a
    sa = a * (1.0 + a2 * (spec.SIN_C1 + a2 * (spec.SIN_C2 + a2 * (spec.SIN_C3 + a2 * spec.SIN_C4))))
    ca = 1.0 + a2 * (spec.COS_C1 + a2 * (spec.COS_C2 + a2 * (spec.COS_C3 + a2 * spec.COS_C4)))
    c = torch.where(q == 0, ca, torch.where(q == 1, -sa, torch.where(q == 2, -ca, sa)))
    s = torch.where(q == 0, sa, torch.where(q == 1, ca, torch.where(q == 2, -sa, -ca)))
    return radius * c, radius * s


def _rademacher(r: torch.Tensor) -> torch.Tensor:
    return torch.where((r >> 31) == 1, -1.0, 1.0).to(torch.float32)


def _per_element(words, start: int, n: int) -> torch.Tensor:
    """Interleave per-group lane values (4 tensors over groups) into elements and cut [start, start + n)."""
    lead = start - 4 * (start >> 2)
    return torch.stack(words, dim=1).reshape(-1)[lead : lead + n]


def directions_tensor(seed: int, p: int, start: int, n: int, distribution: Distribution, device) -> torch.Tensor:
    g = torch.arange(start >> 2, (start + n + 3) >> 2, dtype=torch.int64, device=device)
    w0, w1, w2, w3 = group_words(seed, p, spec.TAG_DIRECTION, g)
    if distribution == Distribution.GAUSSIAN:
        z0, z1 = gaussian_pair(w0, w1)
        z2, z3 = gaussian_pair(w2, w3)
        lanes = [z0, z1, z2, z3]
    else:
        lanes = [_rademacher(w) for w in (w0, w1, w2, w3)]
    return _per_element(lanes, start, n)


def rounding_bits(rseed: int, start: int, n: int, device) -> torch.Tensor:
    g = torch.arange(start >> 2, (start + n + 3) >> 2, dtype=torch.int64, device=device)
    return _per_element(list(group_words(rseed, 0, spec.TAG_ROUNDING, g)), start, n)


# ------------------------------------------------------------------ rounding to the storage dtype
def _bf16_nearest_bits(y: torch.Tensor) -> torch.Tensor:
    b = _f32_to_u32(y)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return torch.where(torch.isnan(y), torch.full_like(r, 0x7FC0), r)


def _bf16_from_bits(bits16: torch.Tensor) -> torch.Tensor:
    return _u32_to_f32(bits16 << 16)


def round_to_storage(y: torch.Tensor, dtype: torch.dtype, rbits: torch.Tensor | None) -> torch.Tensor:
    """Round fp32 y to ``dtype`` (nearest even, or stochastic with the given uint32 bits); returns fp32 values that
    are exactly representable in ``dtype``."""
    if dtype == torch.float32:
        return y
    if dtype == torch.bfloat16:
        if rbits is None:
            return _bf16_from_bits(_bf16_nearest_bits(y))
        b = _f32_to_u32(y)
        finite = torch.isfinite(y)
        sr = (b + (rbits & 0xFFFF)) >> 16
        return _bf16_from_bits(torch.where(finite, sr, _bf16_nearest_bits(y)))
    if dtype == torch.float16:
        if rbits is not None:
            y = _fp16_stochastic_value(y, rbits)
        return y.to(torch.float16).to(torch.float32)
    raise TypeError(f"unsupported dtype {dtype}")


def _fp16_stochastic_value(y: torch.Tensor, rbits: torch.Tensor) -> torch.Tensor:
    b = _f32_to_u32(y)
    mag = b & 0x7FFFFFFF
    normal = _u32_to_f32((b + (rbits & 0x1FFF)) & ~0x1FFF & _M32)
    small = mag < 0x38800000
    q = _u32_to_f32(torch.where(small, mag, 0)) * 16777216.0
    qi = q.to(torch.int32).to(torch.float32)
    frac = q - qi
    uni = (rbits >> 8).to(torch.float32) * spec.TWO_POW_M24
    up = torch.where(uni < frac, qi + 1.0, qi)
    sub = _u32_to_f32(_f32_to_u32(up * spec.TWO_POW_M24) | (b & 0x80000000))
    out = torch.where(small, sub, normal)
    return torch.where(torch.isfinite(y), out, y)


# ------------------------------------------------------------------ the backend
def directions_at(seed: int, p: int, j: torch.Tensor, distribution: Distribution) -> torch.Tensor:
    """u(seed, p, j) at arbitrary global indices j (int64): the lane j % 4 of group j // 4."""
    w = group_words(seed, p, spec.TAG_DIRECTION, j >> 2)
    if distribution == Distribution.GAUSSIAN:
        z0, z1 = gaussian_pair(w[0], w[1])
        z2, z3 = gaussian_pair(w[2], w[3])
        lanes: tuple = (z0, z1, z2, z3)
    else:
        lanes = tuple(_rademacher(v) for v in w)
    return torch.stack(lanes, dim=1).gather(1, (j & 3).view(-1, 1)).view(-1)


def rounding_bits_at(rseed: int, j: torch.Tensor) -> torch.Tensor:
    w = group_words(rseed, 0, spec.TAG_ROUNDING, j >> 2)
    return torch.stack(w, dim=1).gather(1, (j & 3).view(-1, 1)).view(-1)


def run_rounds(xv, hv, dtype, prog: Program, rounds, direction, rbits):
    """Apply ``rounds`` (a range of round indices) of ``prog`` to fp32 values ``xv`` (and H ``hv`` or None) that hold
    elements of storage dtype ``dtype``; ``direction(seed, p)`` and ``rbits(rseed)`` give the values at these
    elements. Returns the new (xv, hv)."""
    n, device = xv.numel(), xv.device
    seeds = prog.seeds.tolist()
    dirs = prog.dirs.tolist()
    ax_all = prog.coef_x.tolist()
    bh_all = prog.coef_h.tolist()
    all_rounds = list(prog.rounds())
    for r in rounds:
        _, terms, wd, rseed, flagged = all_rounds[r]
        updates_h = flagged and prog.rule != CurvatureRule.NONE
        acc_x = torch.zeros(n, dtype=torch.float32, device=device)
        acc_h = torch.zeros(n, dtype=torch.float32, device=device)
        for i in range(terms.start, terms.stop):
            u = direction(seeds[i], dirs[i])
            acc_x = acc_x + ax_all[i] * u
            if prog.rule == CurvatureRule.GSQ:
                acc_h = acc_h + bh_all[i] * u
            elif prog.rule == CurvatureRule.STEIN:
                acc_h = acc_h + bh_all[i] * (u * u - 1.0)
        if hv is not None:
            s = _sqrt_rn(hv)
            t = acc_x / s
        else:
            t = acc_x
        y = xv - (t + wd * xv)
        if hv is not None and updates_h:
            if prog.rule == CurvatureRule.GSQ:
                g = acc_h / s
                v = g * g
            else:
                v = hv * acc_h
            hn = prog.beta * hv + prog.one_minus_beta * v
            hv = torch.where(hn >= prog.h_min, hn, torch.full_like(hn, prog.h_min))
        xv = round_to_storage(y, dtype, rbits(rseed) if rseed >= 0 and dtype != torch.float32 else None)
    return xv, hv


def _dense(offset: int, n: int, prog: Program, device):
    return (lambda seed, p: directions_tensor(seed, p, offset, n, prog.distribution, device),
            lambda rseed: rounding_bits(rseed, offset, n, device))


def apply_tensor(x: torch.Tensor, h: torch.Tensor | None, offset: int, prog: Program) -> None:
    xv = x.reshape(-1).to(torch.float32)
    hv = h.reshape(-1).clone() if h is not None else None
    xv, hv = run_rounds(xv, hv, x.dtype, prog, range(prog.n_rounds), *_dense(offset, x.numel(), prog, x.device))
    x.copy_(xv.view_as(x))
    if h is not None and hv is not None and prog.updates_hessian():
        h.copy_(hv.view_as(h))


class IndexLog(KernelLog):
    """An undo log as index lists: per tensor, the positions of the logged elements and their saved values (in the
    tensor's dtype). The reference backend's log, and every backend's fallback (``base.chunked_logged_run``); its
    :meth:`advance` runs the reference arithmetic on the logged elements only (any device)."""

    def __init__(self, entries):
        self._entries = entries  # (flat x, flat h or None, offset of x[0], positions int64, saved values)

    @property
    def numel(self) -> int:
        return sum(int(e[3].numel()) for e in self._entries)

    @property
    def nbytes(self) -> int:
        return sum(int(e[3].numel()) * (8 + e[4].element_size()) for e in self._entries)

    def tensors(self) -> list[torch.Tensor]:
        return [e[0] for e in self._entries]

    def restore(self) -> None:
        for x, _, _, idx, values in self._entries:
            x.view(-1).index_copy_(0, idx, values)

    def advance(self, program: Program) -> None:
        out = []
        for x, h, offset, idx, values in self._entries:
            j = idx + offset
            hv = None if h is None else h.view(-1)[idx]
            xv, _ = run_rounds(values.to(torch.float32), hv, x.dtype, program, range(program.n_rounds),
                               lambda seed, p, j=j: directions_at(seed, p, j, program.distribution),
                               lambda rseed, j=j: rounding_bits_at(rseed, j))
            out.append((x, h, offset, idx, xv.to(x.dtype)))
        self._entries = out


class ReferenceBackend(Backend):
    name = "reference"
    description = "PyTorch reference (materialises directions; the test oracle)"

    def availability(self):
        return True, "always available"

    def supports(self, device: torch.device) -> bool:
        return True

    def apply(self, params, hessian, offsets, program: Program) -> None:
        with torch.no_grad():
            for i, x in enumerate(params):
                apply_tensor(x, None if hessian is None else hessian[i], offsets[i], program)

    def log_support(self):
        return True, "the reference arithmetic on whole tensors (a copy of each; the test oracle)"

    def apply_logged(self, params, hessian, offsets, program: Program, n_apply: int, chunk=None) -> KernelLog:
        entries = []
        with torch.no_grad():
            for i, x in enumerate(params):
                h = None if hessian is None else hessian[i]
                flat = x.detach().view(-1)
                x0 = flat.clone()
                hv = None if h is None else h.reshape(-1)
                source = _dense(offsets[i], x.numel(), program, x.device)
                xv, _ = run_rounds(x0.to(torch.float32), hv, x.dtype, program, range(n_apply), *source)
                sim, _ = run_rounds(xv, hv, x.dtype, program, range(n_apply, program.n_rounds), *source)
                bad = (_bits(sim.to(x.dtype)) != _bits(x0)).nonzero().view(-1)
                flat.copy_(xv.to(x.dtype))
                if bad.numel():
                    entries.append((flat, hv, offsets[i], bad, x0.index_select(0, bad)))
        return IndexLog(entries)

    def directions(self, seed, direction, offset, numel, distribution, device) -> torch.Tensor:
        return directions_tensor(seed, direction, offset, numel, distribution, device)

    def directions_sum(self, seed, n_dirs, offset, numel, distribution, device) -> torch.Tensor:
        """The generator-only benchmark quantity, materialising each direction."""
        return torch.stack([directions_tensor(seed, p, offset, numel, distribution, device).double().sum()
                            for p in range(n_dirs)]).sum().reshape(1)


#: the class's former name (deprecated, like the registered name "torch", now an alias of "reference")
TorchBackend = ReferenceBackend
