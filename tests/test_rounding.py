"""Storage rounding: round-to-nearest-even equals torch's own conversion for every fp16 / bf16 boundary and 2^20
random bit patterns; stochastic rounding is identical across backends, lands on one of the two neighbours, and is
unbiased."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hiso_kernels as hk
from helpers import assert_bitwise_equal
from hiso_kernels.backends import reference

HAVE_CPU = "cpu" in hk.available_backends()
LOW = [torch.bfloat16, torch.float16]


def interesting_floats() -> torch.Tensor:
    rng = np.random.default_rng(7)
    random_bits = rng.integers(0, 2**32, 1 << 20, dtype=np.uint64).astype(np.uint32)
    # every fp16 and bf16 value and the midpoints around them (ties), as fp32
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    bhalves = (torch.arange(0, 1 << 16, dtype=torch.int64) << 16).to(torch.int32).view(torch.float32)
    parts = [torch.from_numpy(random_bits.view(np.float32).copy()), halves, bhalves]
    for base in (halves, bhalves):
        for delta in (-1, 1, 0x0FFF, 0x1000, 0x1001, 0x7FFF, 0x8000, 0x8001):
            parts.append(_add_bits(base, delta))
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 65504.0, 65519.996, 65520.0, 65536.0, 2.0**-24, 2.0**-25,
                            2.0**-25 * 1.5, 2.0**-26, 1.5 * 2.0**-24, 2.5 * 2.0**-24, 6.1e-5, 1e-45, -1e-40,
                            3.3895314e38, 3.4028235e38])
    parts.append(special)
    out = torch.cat(parts)
    return out[~torch.isnan(out)]


def _add_bits(x: torch.Tensor, delta: int) -> torch.Tensor:
    b = x.view(torch.int32).to(torch.int64) + delta
    b = ((b + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
    return b.to(torch.int32).view(torch.float32)


VALUES = interesting_floats()


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_reference_nearest_equals_torch_conversion(dtype):
    got = reference.round_to_storage(VALUES, dtype, None)
    assert_bitwise_equal(got.to(dtype), VALUES.to(dtype))


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_cpp_nearest_equals_torch_conversion_on_every_isa(dtype):
    from hiso_kernels import _cpu

    code = {torch.bfloat16: 1, torch.float16: 2}[dtype]
    default = _cpu.isa()
    try:
        for isa in _cpu.supported_isas():
            _cpu.set_isa(isa)
            out = torch.empty(VALUES.numel(), dtype=dtype)
            _cpu.round_to_storage(VALUES.data_ptr(), out.data_ptr(), 0, VALUES.numel(), code, -1)
            assert_bitwise_equal(out, VALUES.to(dtype), isa)
    finally:
        _cpu.set_isa(default)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension not built")
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("start", [0, 3, 2**40 + 1])
def test_cpp_stochastic_equals_reference(dtype, start):
    from hiso_kernels import _cpu

    code = {torch.bfloat16: 1, torch.float16: 2}[dtype]
    values = VALUES[torch.isfinite(VALUES)]
    out = torch.empty(values.numel(), dtype=dtype)
    _cpu.round_to_storage(values.data_ptr(), out.data_ptr(), start, values.numel(), code, 12345)
    rbits = reference.rounding_bits(12345, start, values.numel(), "cpu")
    ref = reference.round_to_storage(values, dtype, rbits)
    assert_bitwise_equal(out, ref.to(dtype))


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased(dtype):
    n = 200_000
    y = torch.full((n,), 1.0 + 2.0**-10 + 2.0**-12)  # between two representable neighbours in both formats
    rbits = reference.rounding_bits(99, 0, n, "cpu")
    r = reference.round_to_storage(y, dtype, rbits)
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[dtype]
    down = math.floor((y[0].item() - 1.0) / ulp) * ulp + 1.0
    assert set(r.unique().tolist()) <= {down, down + ulp}, r.unique()
    p_up = (y[0].item() - down) / ulp
    assert abs((r == down + ulp).float().mean().item() - p_up) < 5 * math.sqrt(p_up * (1 - p_up) / n)
    assert abs(r.double().mean().item() - y[0].item()) < 5 * ulp / math.sqrt(n)


def test_fp16_stochastic_rounding_in_the_subnormal_range_is_unbiased():
    n = 200_000
    value = 2.0**-24 * 0.3
    y = torch.full((n,), value)
    r = reference.round_to_storage(y, torch.float16, reference.rounding_bits(5, 0, n, "cpu"))
    assert set(r.unique().tolist()) <= {0.0, 2.0**-24}
    assert abs((r > 0).float().mean().item() - 0.3) < 5 * math.sqrt(0.21 / n)


HAVE_TRITON = "triton" in hk.available_backends("cpu")
if HAVE_TRITON:
    import triton
    import triton.language as tl

    from hiso_kernels.backends._triton_generator import bf16_nearest as _bf16_nearest
    from hiso_kernels.backends._triton_generator import fp16_stochastic_value as _fp16_stochastic_value
    from hiso_kernels.backends._triton_generator import rounding_bits as _rounding_bits

    @triton.jit
    def _round_kernel(y_ptr, out_ptr, n, start, rseed, BF16: tl.constexpr, SR: tl.constexpr, BLOCK: tl.constexpr):
        """Element i is rounded with the bits of global index start + i (start is a multiple of 4 here)."""
        G: tl.constexpr = BLOCK // 4
        pid = tl.program_id(0)
        g = start // 4 + pid * G + tl.arange(0, G).to(tl.int64)
        i = pid * BLOCK + 4 * tl.arange(0, G)[:, None] + tl.arange(0, 4)[None, :]  # [G, 4] blocks, as the kernels
        mask = i < n
        y = tl.load(y_ptr + i, mask=mask, other=0.0)
        b = y.to(tl.uint32, bitcast=True)
        if SR:
            bits = _rounding_bits(rseed, g)
        else:
            bits = tl.zeros([G, 4], tl.uint32)
        if BF16:
            if SR:
                finite = (b & 0x7F800000) != 0x7F800000
                r = tl.where(finite, (b + (bits & 0xFFFF)) >> 16, _bf16_nearest(b))
            else:
                r = _bf16_nearest(b)
            tl.store(out_ptr + i, r.to(tl.int32), mask=mask)
        else:
            if SR:
                y = _fp16_stochastic_value(y, bits)
            tl.store(out_ptr + i, y.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32), mask=mask)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton (interpreter) not available")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # numpy's fp16 cast of huge values: inf, as meant
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_triton_rounding_equals_reference(dtype, sr):
    values = VALUES[torch.isfinite(VALUES)] if sr else VALUES
    n = values.numel()
    out = torch.empty(n, dtype=torch.int32)
    block = 1 << 16
    _round_kernel[(triton.cdiv(n, block),)](values, out, n, 8, 777, BF16=dtype == torch.bfloat16, SR=sr,
                                            BLOCK=block)
    rbits = reference.rounding_bits(777, 8, n, "cpu") if sr else None
    ref = reference.round_to_storage(values, dtype, rbits).to(dtype)
    assert_bitwise_equal(out.to(torch.int16).view(dtype), ref)
