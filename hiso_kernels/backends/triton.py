"""The ``triton`` backend: the fused round as a Triton kernel (GPUs; on the CPU under ``TRITON_INTERPRET=1``).

One program instance handles one chunk (``BLOCK_GROUPS`` groups of 4 elements) of one tensor. Philox runs once per
group and term; the four lanes are interleaved back into element order, so loads and stores stay contiguous.
IEEE semantics: launches pass ``enable_fp_fusion=False`` (no contraction), division and square root use the
correctly rounded ``div_rn`` / ``sqrt_rn``, and bf16 is rounded with integer operations (the interpreter's own
fp32 -> bf16 cast truncates).
"""

from __future__ import annotations

import os

import torch

from .. import spec
from .._program import Program
from ..spec import Distribution
from .base import DTYPE_CODES, Backend, PlanCache, group_by_dtype

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _IMPORT_ERROR = exc


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
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
    def _philox(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on uint32 blocks (keys are uint32 scalars)."""
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
    def _words(key, c2, c3, g):
        """Philox words of groups g (int64 block) for a 64-bit key (int64 scalar) and counter words 2, 3."""
        key = key.to(tl.int64)  # a small seed passed from Python arrives as int32
        k0 = (key & 0xFFFFFFFF).to(tl.uint32)
        k1 = (key >> 32).to(tl.uint32)
        c0 = (g & 0xFFFFFFFF).to(tl.uint32)
        c1 = (g >> 32).to(tl.uint32)
        zero = tl.zeros_like(c0)
        return _philox(c0, c1, zero + c2, zero + c3, k0, k1)

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
    def _gaussian_pair(ra, rb):
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
    def _rademacher(r):
        return tl.where((r >> 31) == 1, -1.0, 1.0)

    @triton.jit
    def _lanes_to_elements(w0, w1, w2, w3):
        """[G] lane blocks -> [4G] block in element order 4g + lane."""
        return tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))

    @triton.jit
    def _directions(seed, p, g, DIST: tl.constexpr):
        w0, w1, w2, w3 = _words(seed, p, _TAG_DIRECTION, g)
        if DIST == 0:
            z0, z1 = _gaussian_pair(w0, w1)
            z2, z3 = _gaussian_pair(w2, w3)
        else:
            z0 = _rademacher(w0)
            z1 = _rademacher(w1)
            z2 = _rademacher(w2)
            z3 = _rademacher(w3)
        return _lanes_to_elements(z0, z1, z2, z3)

    @triton.jit
    def _rounding_bits(rseed, g):
        w0, w1, w2, w3 = _words(rseed, 0, _TAG_ROUNDING, g)
        return _lanes_to_elements(w0, w1, w2, w3)

    @triton.jit
    def _bf16_nearest(b):
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)

    @triton.jit
    def _fp16_stochastic_value(y, bits):
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

    @triton.jit
    def _zo_program_kernel(
        slots_ptr,
        chunks_ptr,
        seeds_ptr,
        dirs_ptr,
        coef_x_ptr,
        coef_h_ptr,
        round_start_ptr,
        round_wd_ptr,
        round_rseed_ptr,
        n_rounds,
        beta,
        one_minus_beta,
        h_min,
        BLOCK_GROUPS: tl.constexpr,
        DTYPE: tl.constexpr,
        HAS_H: tl.constexpr,
        RULE: tl.constexpr,
        DIST: tl.constexpr,
    ):
        chunk = tl.program_id(0).to(tl.int64)
        slot = tl.load(chunks_ptr + 2 * chunk)
        g_begin = tl.load(chunks_ptr + 2 * chunk + 1)
        x_addr = tl.load(slots_ptr + 4 * slot)
        h_addr = tl.load(slots_ptr + 4 * slot + 1)
        numel = tl.load(slots_ptr + 4 * slot + 2)
        offset = tl.load(slots_ptr + 4 * slot + 3)

        g = g_begin + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
        local = 4 * g_begin - offset + tl.arange(0, 4 * BLOCK_GROUPS).to(tl.int64)
        mask = (local >= 0) & (local < numel)

        if DTYPE == 0:
            xp = x_addr.to(tl.pointer_type(tl.float32))
            x = tl.load(xp + local, mask=mask, other=0.0)
        elif DTYPE == 1:
            xp = x_addr.to(tl.pointer_type(tl.uint16))
            x = (tl.load(xp + local, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            xp = x_addr.to(tl.pointer_type(tl.float16))
            x = tl.load(xp + local, mask=mask, other=0.0).to(tl.float32)
        if HAS_H:
            hp = h_addr.to(tl.pointer_type(tl.float32))
            h = tl.load(hp + local, mask=mask, other=1.0)
        else:
            h = tl.full([4 * BLOCK_GROUPS], 1.0, tl.float32)
        raw = tl.zeros([4 * BLOCK_GROUPS], tl.uint32)

        for r in range(n_rounds):
            t_begin = tl.load(round_start_ptr + r)
            t_end = tl.load(round_start_ptr + r + 1)
            acc_x = tl.zeros([4 * BLOCK_GROUPS], tl.float32)
            acc_h = tl.zeros([4 * BLOCK_GROUPS], tl.float32)
            for t in range(t_begin, t_end):
                seed = tl.load(seeds_ptr + t)
                p = tl.load(dirs_ptr + t).to(tl.uint32)
                u = _directions(seed, p, g, DIST)
                acc_x = acc_x + tl.load(coef_x_ptr + t) * u
                if RULE == 1:
                    acc_h = acc_h + tl.load(coef_h_ptr + t) * u
                elif RULE == 2:
                    acc_h = acc_h + tl.load(coef_h_ptr + t) * (u * u - 1.0)
            if HAS_H:
                s = tl.sqrt_rn(h)
                step = tl.div_rn(acc_x, s)
            else:
                step = acc_x
            wd = tl.load(round_wd_ptr + r)
            y = x - (step + wd * x)
            if HAS_H:
                if RULE == 1:
                    gh = tl.div_rn(acc_h, s)
                    hn = beta * h + one_minus_beta * (gh * gh)
                    h = tl.where(hn >= h_min, hn, h_min)
                elif RULE == 2:
                    hn = beta * h + one_minus_beta * (h * acc_h)
                    h = tl.where(hn >= h_min, hn, h_min)
            if DTYPE == 0:
                x = y
            else:
                rseed = tl.load(round_rseed_ptr + r)
                b = y.to(tl.uint32, bitcast=True)
                if rseed >= 0:
                    bits = _rounding_bits(rseed, g)
                else:
                    bits = tl.zeros([4 * BLOCK_GROUPS], tl.uint32)
                if DTYPE == 1:
                    if rseed >= 0:
                        finite = (b & 0x7F800000) != 0x7F800000
                        raw = tl.where(finite, (b + (bits & 0xFFFF)) >> 16, _bf16_nearest(b))
                    else:
                        raw = _bf16_nearest(b)
                    x = (raw << 16).to(tl.float32, bitcast=True)
                else:
                    if rseed >= 0:
                        y = _fp16_stochastic_value(y, bits)
                    x = y.to(tl.float16).to(tl.float32)

        if DTYPE == 0:
            tl.store(xp + local, x, mask=mask)
        elif DTYPE == 1:
            tl.store(xp + local, raw.to(tl.uint16), mask=mask)
        else:
            tl.store(xp + local, x.to(tl.float16), mask=mask)
        if HAS_H:
            if RULE != 0:
                tl.store(hp + local, h, mask=mask)

    @triton.jit
    def _directions_kernel(out_ptr, seed, p, start, n, BLOCK_GROUPS: tl.constexpr, DIST: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        start = start.to(tl.int64)
        g0 = (start >> 2) + pid * BLOCK_GROUPS
        g = g0 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
        u = _directions(seed, p.to(tl.uint32), g, DIST)
        local = 4 * g0 - start + tl.arange(0, 4 * BLOCK_GROUPS).to(tl.int64)
        tl.store(out_ptr + local, u, mask=(local >= 0) & (local < n))


    @triton.jit
    def _directions_sum_kernel(partial_ptr, seed, n_dirs, start, n, BLOCK_GROUPS: tl.constexpr, DIST: tl.constexpr):
        """Generator-only benchmark kernel: per-program sum of n_dirs directions."""
        pid = tl.program_id(0).to(tl.int64)
        start = start.to(tl.int64)
        g0 = (start >> 2) + pid * BLOCK_GROUPS
        g = g0 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
        local = 4 * g0 - start + tl.arange(0, 4 * BLOCK_GROUPS).to(tl.int64)
        valid = (local >= 0) & (local < n)
        acc = tl.zeros([4 * BLOCK_GROUPS], tl.float32)
        for p in range(n_dirs):
            pu = tl.full([], 0, tl.uint32) + p  # a Python int under the interpreter, a tensor when compiled
            acc += tl.where(valid, _directions(seed, pu, g, DIST), 0.0)
        tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


class TritonBackend(Backend):
    name = "triton"
    description = "Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)"

    #: groups per program: 256 (1 Ki elements, 4 warps) on GPUs; larger under the interpreter, whose cost is per
    #: program instance rather than per element.
    GPU_BLOCK_GROUPS = 256
    INTERPRETER_BLOCK_GROUPS = 4096

    def __init__(self):
        self._plans = PlanCache()

    def availability(self):
        if triton is None:
            return False, f"triton is not installed ({_IMPORT_ERROR})"
        if interpreter_enabled():
            return True, f"triton {triton.__version__} (interpreter: TRITON_INTERPRET=1)"
        if not torch.cuda.is_available():
            return False, f"triton {triton.__version__} installed but no GPU (set TRITON_INTERPRET=1 to run on the CPU)"
        return True, f"triton {triton.__version__}"

    def supports(self, device: torch.device) -> bool:
        if interpreter_enabled():
            return device.type == "cpu"
        return device.type == "cuda"

    def _block_groups(self, max_elements: int) -> int:
        if not interpreter_enabled():
            return self.GPU_BLOCK_GROUPS
        # the interpreter pays per element of the block, masked or not: fit the block to the largest tensor
        groups = (max_elements + 3) // 4 + 1
        return min(self.INTERPRETER_BLOCK_GROUPS, max(16, 1 << (groups - 1).bit_length()))

    def apply(self, params, hessian, offsets, program: Program) -> None:
        device = params[0].device
        prog = program.to(device)
        block = self._block_groups(max(p.numel() for p in params))
        for p, h, o in group_by_dtype(params, hessian, offsets).values():
            plan = self._plans.get(p, h, o, block, device)
            _zo_program_kernel[(plan.n_chunks,)](
                plan.slots,
                plan.chunks,
                prog.seeds,
                prog.dirs,
                prog.coef_x,
                prog.coef_h,
                prog.round_start,
                prog.round_wd,
                prog.round_rseed,
                prog.n_rounds,
                prog.beta,
                prog.one_minus_beta,
                prog.h_min,
                BLOCK_GROUPS=block,
                DTYPE=DTYPE_CODES[plan.dtype],
                HAS_H=h is not None,
                RULE=int(prog.rule) if h is not None else 0,
                DIST=int(prog.distribution),
                num_warps=4,
                enable_fp_fusion=False,
            )

    def directions_sum(self, seed, n_dirs, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        """Generator-only benchmark kernel: per-program partial sums of n_dirs directions."""
        block = self._block_groups(numel)
        n_groups = ((offset + numel + 3) >> 2) - (offset >> 2)
        grid = (triton.cdiv(n_groups, block),)
        partial = torch.empty(grid[0], dtype=torch.float32, device=device)
        _directions_sum_kernel[grid](
            partial, seed, n_dirs, offset, numel, BLOCK_GROUPS=block, DIST=int(distribution), num_warps=4,
            enable_fp_fusion=False,
        )
        return partial

    def directions(self, seed, direction, offset, numel, distribution: Distribution, device) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32, device=device)
        if numel == 0:
            return out
        block = self._block_groups(numel)
        n_groups = ((offset + numel + 3) >> 2) - (offset >> 2)
        grid = (triton.cdiv(n_groups, block),)
        _directions_kernel[grid](
            out, seed, direction, offset, numel, BLOCK_GROUPS=block, DIST=int(distribution), num_warps=4,
            enable_fp_fusion=False,
        )
        return out
