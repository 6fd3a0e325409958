"""Known-answer tests: Random123's published Philox4x32-10 vectors on every implementation of Philox, and frozen
direction / rounding vectors of spec version 1 on every backend. A change here is a change of the specification."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hiso_kernels as hk
from helpers import assert_bitwise_equal, host_fused_backends
from hiso_kernels import spec
from hiso_kernels.backends import BACKENDS, reference

# Random123 kat_vectors: counter (4 words), key (2 words) -> output (4 words)
RANDOM123_PHILOX4X32_10 = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Spec v1 directions: (seed, direction, first global index) -> 8 consecutive fp32 values as bit patterns
GAUSSIAN_VECTORS = {
    (0, 0, 0): (0x3D408868, 0xBFAD6600, 0xBF471018, 0x3DC44892, 0x3C9D7CE2, 0x3E722D85, 0x3F3A4CF0, 0xBEE5A3B5),
    (1, 0, 0): (0x3D73A550, 0xBEF4FBD9, 0xBF62D47B, 0xBF089910, 0xBBA30681, 0xBF6440C2, 0xBF99156E, 0xBE726D7E),
    (42, 3, 1000003): (0x3E305806, 0xBF068453, 0xBF359C99, 0xBFD965CD, 0x3CA0A00C, 0xBF7E678A, 0x3F4F1B61, 0xBF907A53),
    (1099511627781, 7, 8589934595): (
        0xBF0F8B5A, 0x3FDD0036, 0xBE98BCF3, 0x3F7C7E9C, 0x3FC91A94, 0x3ED30FCD, 0xBEE401F0, 0x3E1C3B8E),
    (9223372036854775807, 2147483647, 4611686018427387896): (
        0xC01E481D, 0x3CBF4EEC, 0xBE6FA25E, 0xBF8E862D, 0x3C992593, 0xBEB41D1B, 0xBE90B725, 0xBE92C057),
}
RADEMACHER_SIGNS = {  # 1 = -1.0
    (0, 0, 0): (0, 1, 1, 1, 1, 0, 1, 0),
    (1, 0, 0): (1, 1, 1, 1, 1, 1, 0, 1),
    (42, 3, 1000003): (0, 1, 1, 0, 1, 0, 1, 0),
    (1099511627781, 7, 8589934595): (1, 0, 0, 0, 0, 1, 1, 1),
    (9223372036854775807, 2147483647, 4611686018427387896): (0, 1, 1, 1, 1, 1, 1, 1),
}
# zo_update_(x = linspace(-3, 3, 8), seed 77, direction 0, coefficient 1e-3, stochastic_rounding=True)
SR_BF16 = (0xC040, 0xC009, 0xBFA4, 0xBEDB, 0x3EDC, 0x3FA5, 0x4009, 0x4041)
SR_FP16 = (0xC201, 0xC04A, 0xBD24, 0xB6DC, 0x36E3, 0x3D25, 0x404A, 0x4201)

ALL_BACKENDS = ["reference"] + host_fused_backends()


@pytest.mark.parametrize("counter,key,expected", RANDOM123_PHILOX4X32_10)
def test_philox_random123_python_spec(counter, key, expected):
    assert spec.philox4x32_10(counter, key) == expected


@pytest.mark.parametrize("counter,key,expected", RANDOM123_PHILOX4X32_10)
def test_philox_random123_torch_reference(counter, key, expected):
    c = [torch.tensor([w], dtype=torch.int64) for w in counter]
    out = reference.philox4x32_10(*c, key[0], key[1])
    assert tuple(int(o.item()) for o in out) == expected


@pytest.mark.skipif("cpu" not in hk.available_backends(), reason="C++ extension not built")
@pytest.mark.parametrize("counter,key,expected", RANDOM123_PHILOX4X32_10)
def test_philox_random123_cpp(counter, key, expected):
    from hiso_kernels import _cpu

    assert _cpu.philox4x32_10(*counter, *key) == expected


HAVE_TRITON = "triton" in hk.available_backends("cpu")
if HAVE_TRITON:
    import triton
    import triton.language as tl

    from hiso_kernels.backends._triton_generator import philox as _philox

    @triton.jit
    def _philox_kat_kernel(c_ptr, k_ptr, out_ptr):
        c0 = tl.load(c_ptr + 0).to(tl.uint32)
        c1 = tl.load(c_ptr + 1).to(tl.uint32)
        c2 = tl.load(c_ptr + 2).to(tl.uint32)
        c3 = tl.load(c_ptr + 3).to(tl.uint32)
        k0 = tl.load(k_ptr + 0).to(tl.uint32)
        k1 = tl.load(k_ptr + 1).to(tl.uint32)
        o0, o1, o2, o3 = _philox(c0, c1, c2, c3, k0, k1)
        tl.store(out_ptr + 0, o0.to(tl.int64))
        tl.store(out_ptr + 1, o1.to(tl.int64))
        tl.store(out_ptr + 2, o2.to(tl.int64))
        tl.store(out_ptr + 3, o3.to(tl.int64))


@pytest.mark.skipif(not HAVE_TRITON, reason="triton (interpreter) not available")
@pytest.mark.parametrize("counter,key,expected", RANDOM123_PHILOX4X32_10)
def test_philox_random123_triton(counter, key, expected):
    out = torch.zeros(4, dtype=torch.int64)
    _philox_kat_kernel[(1,)](torch.tensor(counter, dtype=torch.int64), torch.tensor(key, dtype=torch.int64), out)
    assert tuple(out.tolist()) == expected


def _spec_gaussian_scalar(seed: int, p: int, j: int) -> np.float32:
    """The Gaussian transform evaluated with numpy fp32 scalars straight from docs/directions.md: an implementation
    independent of every backend."""
    f = np.float32
    g = j >> 2
    w = spec.philox4x32_10((g & spec.MASK32, g >> 32, p, spec.TAG_DIRECTION), (seed & spec.MASK32, seed >> 32))
    lane = j & 3
    ra, rb = (w[0], w[1]) if lane < 2 else (w[2], w[3])
    u = f(((ra >> 9) << 1) | 1) * f(spec.TWO_POW_M24)
    b = int(np.array([u]).view(np.uint32)[0])
    e = (b >> 23) - 127
    m = np.array([(b & 0x7FFFFF) | 0x3F800000], dtype=np.uint32).view(np.float32)[0]
    if m > f(spec.SQRT2):
        m, e = m * f(0.5), e + 1
    t = (m - f(1)) / (m + f(1))
    w2 = t * t
    poly = f(2) + w2 * (f(spec.LOG_C1) + w2 * (f(spec.LOG_C2) + w2 * (f(spec.LOG_C3) + w2 * f(spec.LOG_C4))))
    radius = np.sqrt((f(e) * f(spec.LN2) + t * poly) * f(-2))
    q = rb >> 30
    a = (f((((rb & 0x3FFFFFFF) >> 7) << 1) | 1) * f(spec.TWO_POW_M24) - f(0.5)) * f(spec.HALF_PI)
    a2 = a * a
    sa = a * (f(1) + a2 * (f(spec.SIN_C1) + a2 * (f(spec.SIN_C2) + a2 * (f(spec.SIN_C3) + a2 * f(spec.SIN_C4)))))
    ca = f(1) + a2 * (f(spec.COS_C1) + a2 * (f(spec.COS_C2) + a2 * (f(spec.COS_C3) + a2 * f(spec.COS_C4))))
    c, s = [(ca, sa), (-sa, ca), (-ca, -sa), (sa, -ca)][q]
    return radius * (c if lane % 2 == 0 else s)


def _as_bits(values: torch.Tensor) -> tuple[int, ...]:
    return tuple(v & 0xFFFFFFFF for v in values.view(torch.int32).tolist())


@pytest.mark.parametrize("key", list(GAUSSIAN_VECTORS))
def test_gaussian_vectors_match_independent_scalar_spec(key):
    seed, p, j = key
    got = tuple(int(np.array([_spec_gaussian_scalar(seed, p, j + i)]).view(np.uint32)[0]) for i in range(8))
    assert got == GAUSSIAN_VECTORS[key]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key", list(GAUSSIAN_VECTORS))
def test_gaussian_vectors(backend, key):
    seed, p, j = key
    u = hk.directions(seed, 8, direction=p, offset=j, backend=backend)
    assert _as_bits(u) == GAUSSIAN_VECTORS[key]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("key", list(RADEMACHER_SIGNS))
def test_rademacher_vectors(backend, key):
    seed, p, j = key
    u = hk.directions(seed, 8, direction=p, offset=j, distribution="rademacher", backend=backend)
    assert tuple(int(v < 0) for v in u.tolist()) == RADEMACHER_SIGNS[key]
    assert set(u.abs().tolist()) == {1.0}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, SR_BF16), (torch.float16, SR_FP16)])
def test_stochastic_rounding_vectors(backend, dtype, expected):
    x = torch.linspace(-3, 3, 8).to(dtype)
    hk.zo_update_([x], 77, 0, [1e-3], stochastic_rounding=True, backend=backend)
    assert tuple(b & 0xFFFF for b in x.view(torch.int16).tolist()) == expected


def test_directions_equal_across_backends_long_range():
    ref = hk.directions(2**45 + 3, 10007, direction=5, offset=2**40 + 1, backend="reference")
    for backend in host_fused_backends():
        u = hk.directions(2**45 + 3, 10007, direction=5, offset=2**40 + 1, backend=backend)
        assert_bitwise_equal(u, ref, backend)


@pytest.mark.skipif("cpu" not in hk.available_backends(), reason="C++ extension not built")
def test_cpu_instruction_sets_agree():
    """The generic, AVX2 and AVX-512 builds of the C++ kernel give the same bits."""
    from hiso_kernels import _cpu

    default = _cpu.isa()
    outs = {}
    try:
        for isa in _cpu.supported_isas():
            _cpu.set_isa(isa)
            x = [torch.randn(1000, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16), torch.ones(77)]
            h = [torch.rand(1000, generator=torch.Generator().manual_seed(2)) + 0.1, torch.full((77,), 2.0)]
            hk.hiso_round_(x, h, [3, 3, 4], [0, 1, 0], [0.1, 0.2, -0.3], [1.0, 1.0, 0.0], stochastic_rounding=True,
                           backend="cpu")
            outs[isa] = (torch.cat([t.float() for t in x]), torch.cat(h),
                         hk.directions(9, 999, offset=5, backend="cpu"))
    finally:
        _cpu.set_isa(default)
    first = next(iter(outs.values()))
    for isa, out in outs.items():
        for a, b in zip(out, first):
            assert_bitwise_equal(a, b, isa)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_generator_only_kernel_sums_the_directions(backend):
    """The benchmark's generator-only kernel really generates the range it is asked for."""

    for dist in ("gaussian", "rademacher"):
        want = sum(hk.directions(5, 10007, direction=p, offset=7, distribution=dist).double().sum().item()
                   for p in range(3))
        got = BACKENDS[backend].directions_sum(5, 3, 7, 10007, hk.Distribution.parse(dist), torch.device("cpu"))
        assert abs(got.double().sum().item() - want) < 1e-2
