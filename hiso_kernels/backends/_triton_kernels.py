"""The Triton kernels: the fused program kernel (every operation), the direction writer and the generator-only
benchmark kernel. Launched by ``backends/triton.py``; compiled ahead of time by ``hiso_kernels/aot.py``.

Specialisation: Triton compiles a new variant when an integer argument equals 1 (it becomes a constant) or is a
multiple of 16, and when a pointer is 16-byte aligned. Here every integer and pointer argument is marked
``do_not_specialize`` / ``do_not_specialize_on_alignment`` and 64-bit arguments are annotated ``tl.int64``, so the
only variants are the ``tl.constexpr`` switches, and ``hiso_kernels.aot`` can compile all of them on a machine
without a GPU. Alignment is a constexpr instead (``ALIGNED``), decided per tensor by the launch plan.
"""

import triton
import triton.language as tl

from ._triton_generator import (
    BF16,
    F32,
    RULE_GSQ,
    RULE_NONE,
    RULE_STEIN,
    bf16_nearest,
    direction_lanes,
    directions,
    fp16_stochastic_value,
    rounding_bits,
    spread_lanes,
)

_PROGRAM_INTS = ["n_rounds", "n_apply", "log_capacity"]
_PROGRAM_PTRS = ["slots_ptr", "chunks_ptr", "seeds_ptr", "dirs_ptr", "coef_x_ptr", "coef_h_ptr", "round_start_ptr",
                 "round_wd_ptr", "round_rseed_ptr", "round_flags_ptr", "log_index_ptr", "log_value_ptr",
                 "log_count_ptr", "skip_ptr"]


@triton.jit
def load_block(ptr, first, numel, other, BLOCK_GROUPS: tl.constexpr, ALIGNED: tl.constexpr, VEC_BYTES: tl.constexpr):
    """Tensor positions first .. first + 4 BLOCK_GROUPS - 1 as a ``[G, 4]`` block, masked to [0, numel).

    ALIGNED: ``ptr + first`` is VEC_BYTES-aligned and groups are whole, so each row is one vector load and the mask is
    per row. Otherwise four strided lane loads, joined in registers (a 2-D load without alignment gets a layout of
    four threads per row, which the lane values would have to be converted to through shared memory)."""
    row = tl.arange(0, BLOCK_GROUPS)
    if ALIGNED:
        base = tl.multiple_of(ptr + first, VEC_BYTES)
        pos = 4 * row[:, None] + tl.arange(0, 4)[None, :]
        mask = tl.broadcast_to((first + 4 * row < numel)[:, None], [BLOCK_GROUPS, 4])
        return tl.load(base + pos, mask=mask, other=other)
    else:
        i = first + 4 * row.to(tl.int64)
        v0 = tl.load(ptr + i, mask=(i >= 0) & (i < numel), other=other)
        v1 = tl.load(ptr + (i + 1), mask=(i + 1 >= 0) & (i + 1 < numel), other=other)
        v2 = tl.load(ptr + (i + 2), mask=(i + 2 >= 0) & (i + 2 < numel), other=other)
        v3 = tl.load(ptr + (i + 3), mask=(i + 3 >= 0) & (i + 3 < numel), other=other)
        return spread_lanes(v0, v1, v2, v3)


@triton.jit
def store_block(ptr, first, numel, value, BLOCK_GROUPS: tl.constexpr, ALIGNED: tl.constexpr,
                VEC_BYTES: tl.constexpr):
    """The inverse of :func:`load_block`."""
    row = tl.arange(0, BLOCK_GROUPS)
    if ALIGNED:
        base = tl.multiple_of(ptr + first, VEC_BYTES)
        pos = 4 * row[:, None] + tl.arange(0, 4)[None, :]
        mask = tl.broadcast_to((first + 4 * row < numel)[:, None], [BLOCK_GROUPS, 4])
        tl.store(base + pos, value, mask=mask)
    else:
        even, odd = tl.split(tl.reshape(value, [BLOCK_GROUPS, 2, 2]))  # lanes (0, 2) and (1, 3)
        v0, v2 = tl.split(even)
        v1, v3 = tl.split(odd)
        i = first + 4 * row.to(tl.int64)
        tl.store(ptr + i, v0, mask=(i >= 0) & (i < numel))
        tl.store(ptr + (i + 1), v1, mask=(i + 1 >= 0) & (i + 1 < numel))
        tl.store(ptr + (i + 2), v2, mask=(i + 2 >= 0) & (i + 2 < numel))
        tl.store(ptr + (i + 3), v3, mask=(i + 3 >= 0) & (i + 3 < numel))


@triton.jit(do_not_specialize=_PROGRAM_INTS, do_not_specialize_on_alignment=_PROGRAM_PTRS)
def zo_program_kernel(
    slots_ptr,
    chunks_ptr,
    seeds_ptr,
    dirs_ptr,
    coef_x_ptr,
    coef_h_ptr,
    round_start_ptr,
    round_wd_ptr,
    round_rseed_ptr,
    round_flags_ptr,
    log_index_ptr,
    log_value_ptr,
    log_count_ptr,
    skip_ptr,
    n_rounds: tl.int32,
    n_apply: tl.int32,
    log_capacity: tl.int64,
    beta,
    one_minus_beta,
    h_min,
    BLOCK_GROUPS: tl.constexpr,
    DTYPE: tl.constexpr,
    HAS_H: tl.constexpr,
    RULE: tl.constexpr,
    DIST: tl.constexpr,
    ALIGNED: tl.constexpr,
    LOG: tl.constexpr,
):
    """One program instance runs the whole program on one chunk (BLOCK_GROUPS groups of four elements) of one tensor:
    x (and H) are read once, kept in registers across every round and term, and written once.

    ALIGNED (promised by the launch plan): the tensor's global offset and size are multiples of 4 and x (and H) start
    on a 4-element boundary in bytes (16 for fp32, 8 for 16-bit types; 16 for H), so each row of the block is one
    aligned vector access and the mask is per group.

    LOG (a logged run, RULE none): rounds [0, n_apply) are stored, the others only simulated; the elements whose
    simulated end differs in bits from their value before the run are appended to the log (global index, original
    bits) at a place reserved with one atomic add on log_count[0] per program; log_count[1] counts the entries
    written. A program whose entries do not fit in log_capacity writes neither them nor x and sets skip[chunk]: the
    caller runs those chunks through the fallback path (``docs/kernels.md``, "Exact restore in the kernel").
    """
    chunk = tl.program_id(0).to(tl.int64)
    slot = tl.load(chunks_ptr + 2 * chunk)
    g_begin = tl.load(chunks_ptr + 2 * chunk + 1)
    x_addr = tl.load(slots_ptr + 4 * slot)
    h_addr = tl.load(slots_ptr + 4 * slot + 1)
    numel = tl.load(slots_ptr + 4 * slot + 2)
    offset = tl.load(slots_ptr + 4 * slot + 3)

    g = g_begin + tl.arange(0, BLOCK_GROUPS).to(tl.int64)  # [G] global group index
    first = 4 * g_begin - offset  # tensor position of the chunk's first element (negative for a head chunk)
    if DTYPE == F32:
        xp = x_addr.to(tl.pointer_type(tl.float32))
        x = load_block(xp, first, numel, 0.0, BLOCK_GROUPS, ALIGNED, 16)
    elif DTYPE == BF16:
        xp = x_addr.to(tl.pointer_type(tl.uint16))
        raw = load_block(xp, first, numel, 0, BLOCK_GROUPS, ALIGNED, 8).to(tl.uint32)  # the stored bits
        x = (raw << 16).to(tl.float32, bitcast=True)
    else:
        xp = x_addr.to(tl.pointer_type(tl.float16))
        x = load_block(xp, first, numel, 0.0, BLOCK_GROUPS, ALIGNED, 8).to(tl.float32)
    if HAS_H:
        hp = h_addr.to(tl.pointer_type(tl.float32))
        h = load_block(hp, first, numel, 1.0, BLOCK_GROUPS, ALIGNED, 16)
    else:
        h = tl.full([BLOCK_GROUPS, 4], 1.0, tl.float32)
    if LOG:
        x_orig = x  # the stored value (exact in fp32 for every storage dtype)
        x_app = x  # the value after the applied rounds

    for r in range(n_rounds):
        if LOG:
            x_app = tl.where(r == n_apply, x, x_app)
        t_begin = tl.load(round_start_ptr + r)
        t_end = tl.load(round_start_ptr + r + 1)
        # sums of the round's terms, per lane (values carried by the loop stay [G] vectors: see _triton_generator)
        ax0 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ax1 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ax2 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ax3 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ah0 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ah1 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ah2 = tl.zeros([BLOCK_GROUPS], tl.float32)
        ah3 = tl.zeros([BLOCK_GROUPS], tl.float32)
        for t in range(t_begin, t_end):
            seed = tl.load(seeds_ptr + t)
            p = tl.load(dirs_ptr + t).to(tl.uint32)
            z0, z1, z2, z3 = direction_lanes(seed, p, g, DIST)
            a = tl.load(coef_x_ptr + t)
            ax0 = ax0 + a * z0
            ax1 = ax1 + a * z1
            ax2 = ax2 + a * z2
            ax3 = ax3 + a * z3
            if RULE == RULE_GSQ:
                b = tl.load(coef_h_ptr + t)
                ah0 = ah0 + b * z0
                ah1 = ah1 + b * z1
                ah2 = ah2 + b * z2
                ah3 = ah3 + b * z3
            elif RULE == RULE_STEIN:
                b = tl.load(coef_h_ptr + t)
                ah0 = ah0 + b * (z0 * z0 - 1.0)
                ah1 = ah1 + b * (z1 * z1 - 1.0)
                ah2 = ah2 + b * (z2 * z2 - 1.0)
                ah3 = ah3 + b * (z3 * z3 - 1.0)
        acc_x = spread_lanes(ax0, ax1, ax2, ax3)
        acc_h = spread_lanes(ah0, ah1, ah2, ah3)
        if HAS_H:
            s = tl.sqrt_rn(h)
            step = tl.div_rn(acc_x, s)
        else:
            step = acc_x
        wd = tl.load(round_wd_ptr + r)
        y = x - (step + wd * x)
        if HAS_H:
            # rounds without the ROUND_UPDATES_H flag leave H as it is (a perturbation fused with a HiSo update)
            if RULE == RULE_GSQ:
                updates_h = (tl.load(round_flags_ptr + r) & 1) != 0
                gh = tl.div_rn(acc_h, s)
                hn = beta * h + one_minus_beta * (gh * gh)
                h = tl.where(updates_h, tl.where(hn >= h_min, hn, h_min), h)
            elif RULE == RULE_STEIN:
                updates_h = (tl.load(round_flags_ptr + r) & 1) != 0
                hn = beta * h + one_minus_beta * (h * acc_h)
                h = tl.where(updates_h, tl.where(hn >= h_min, hn, h_min), h)
        if DTYPE == F32:
            x = y
        else:
            rseed = tl.load(round_rseed_ptr + r)
            b = y.to(tl.uint32, bitcast=True)
            if rseed >= 0:
                bits = rounding_bits(rseed, g)
            else:
                bits = b & 0  # unused; derived from y so that it shares y's layout
            if DTYPE == BF16:
                if rseed >= 0:
                    finite = (b & 0x7F800000) != 0x7F800000
                    raw = tl.where(finite, (b + (bits & 0xFFFF)) >> 16, bf16_nearest(b))
                else:
                    raw = bf16_nearest(b)
                x = (raw << 16).to(tl.float32, bitcast=True)
            else:
                if rseed >= 0:
                    y = fp16_stochastic_value(y, bits)
                x = y.to(tl.float16).to(tl.float32)

    if LOG:
        row = tl.arange(0, BLOCK_GROUPS).to(tl.int64)
        pos = first + 4 * row[:, None] + tl.arange(0, 4)[None, :]  # [G, 4] tensor positions
        bad = (pos >= 0) & (pos < numel) & (x.to(tl.uint32, bitcast=True) != x_orig.to(tl.uint32, bitcast=True))
        flags = tl.reshape(bad.to(tl.int32), [4 * BLOCK_GROUPS])
        count = tl.sum(flags, axis=0)
        reserve = tl.atomic_add(log_count_ptr, count.to(tl.int64))
        fits = reserve + count <= log_capacity
        where = reserve + tl.cumsum(flags, axis=0) - 1
        keep = (flags * fits.to(tl.int32)) != 0
        tl.store(log_index_ptr + where, tl.reshape(pos + offset, [4 * BLOCK_GROUPS]), mask=keep)
        if DTYPE == F32:
            orig_bits = x_orig.to(tl.int32, bitcast=True)
        elif DTYPE == BF16:
            orig_bits = (x_orig.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
        else:
            orig_bits = x_orig.to(tl.float16).to(tl.int16, bitcast=True)
        tl.store(log_value_ptr + where, tl.reshape(orig_bits, [4 * BLOCK_GROUPS]), mask=keep)
        tl.atomic_add(log_count_ptr + 1, tl.where(fits, count, 0).to(tl.int64))
        tl.store(skip_ptr + chunk, tl.where(fits, 0, 1).to(tl.int8))
        x = tl.where(fits, x_app, x_orig)  # an overflowing program leaves its chunk as it was
        if DTYPE == BF16:
            raw = x.to(tl.uint32, bitcast=True) >> 16
    if DTYPE == F32:
        store_block(xp, first, numel, x, BLOCK_GROUPS, ALIGNED, 16)
    elif DTYPE == BF16:
        store_block(xp, first, numel, raw.to(tl.uint16), BLOCK_GROUPS, ALIGNED, 8)
    else:
        store_block(xp, first, numel, x.to(tl.float16), BLOCK_GROUPS, ALIGNED, 8)
    if HAS_H and RULE != RULE_NONE:
        store_block(hp, first, numel, h, BLOCK_GROUPS, ALIGNED, 16)


@triton.jit(do_not_specialize=["seed", "p", "start", "n"], do_not_specialize_on_alignment=["out_ptr"])
def directions_kernel(out_ptr, seed: tl.int64, p: tl.int32, start: tl.int64, n: tl.int64,
                      BLOCK_GROUPS: tl.constexpr, DIST: tl.constexpr):
    """out[i] = u(seed, p, start + i) for i < n."""
    pid = tl.program_id(0).to(tl.int64)
    start = start.to(tl.int64)
    g0 = (start >> 2) + pid * BLOCK_GROUPS
    g = g0 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    u = directions(seed, p.to(tl.uint32), g, DIST)
    store_block(out_ptr, 4 * g0 - start, n, u, BLOCK_GROUPS, False, 4)  # lane stores: start need not be aligned


@triton.jit(do_not_specialize=["seed", "n_dirs", "start", "n"], do_not_specialize_on_alignment=["partial_ptr"])
def directions_sum_kernel(partial_ptr, seed: tl.int64, n_dirs: tl.int32, start: tl.int64, n: tl.int64,
                          BLOCK_GROUPS: tl.constexpr, DIST: tl.constexpr):
    """Generator-only benchmark kernel: per-program sum of n_dirs directions (no memory traffic per element)."""
    pid = tl.program_id(0).to(tl.int64)
    start = start.to(tl.int64)
    g0 = (start >> 2) + pid * BLOCK_GROUPS
    g = g0 + tl.arange(0, BLOCK_GROUPS).to(tl.int64)
    local0 = 4 * g - start  # [G] position of each group's lane 0
    s0 = tl.zeros([BLOCK_GROUPS], tl.float32)
    s1 = tl.zeros([BLOCK_GROUPS], tl.float32)
    s2 = tl.zeros([BLOCK_GROUPS], tl.float32)
    s3 = tl.zeros([BLOCK_GROUPS], tl.float32)
    for p in range(n_dirs):
        pu = tl.full([], 0, tl.uint32) + p  # a Python int under the interpreter, a tensor when compiled
        z0, z1, z2, z3 = direction_lanes(seed, pu, g, DIST)
        s0 += tl.where((local0 >= 0) & (local0 < n), z0, 0.0)
        s1 += tl.where((local0 + 1 >= 0) & (local0 + 1 < n), z1, 0.0)
        s2 += tl.where((local0 + 2 >= 0) & (local0 + 2 < n), z2, 0.0)
        s3 += tl.where((local0 + 3 >= 0) & (local0 + 3 < n), z3, 0.0)
    tl.store(partial_ptr + pid, tl.sum(s0 + s1 + s2 + s3, axis=0))
