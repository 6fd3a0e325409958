"""Every fused backend equals the torch reference bit for bit: all operations, dtypes, distributions, rounding modes,
awkward sizes, mixed lists, seeds >= 2^32 and global offsets beyond 2^32."""

from __future__ import annotations

import random

import pytest
import torch

import hiso_kernels as hk
from helpers import DTYPES, assert_bitwise_equal
from hiso_kernels import Round

_rng = random.Random(20261126)
SEEDS = [_rng.randrange(0, 2**32) for _ in range(3)] + [_rng.randrange(2**32, 2**63) for _ in range(5)]
SIZES = [1, 3, 4097, 130, 257]
OFFSETS = [0, 5, 2**32 + 3]


def make_state(dtype, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    hessian = [torch.rand(n, generator=g) * 3 + 0.05 for n in sizes]
    return params, hessian


def _perturb(ps, h, **kw):
    hk.perturb_(ps, SEEDS[3], 1e-3, **kw)


def _perturb_h(ps, h, **kw):
    hk.perturb_(ps, SEEDS[4], -2e-3, direction=3, hessian=h, **kw)


def _update(ps, h, **kw):
    hk.zo_update_(ps, SEEDS[5], range(5), [0.3, -0.2, 0.01, 0.0, 1e-4], weight_decay=1e-2, **kw)


def _update_h(ps, h, **kw):
    hk.zo_update_(ps, SEEDS[:3], [0, 7, 2], [0.05, 0.02, -0.4], hessian=h, **kw)


def _round_gsq(ps, h, **kw):
    hk.hiso_round_(ps, h, [SEEDS[6]] * 4, range(4), [0.1, -0.1, 0.2, 0.05], [0.5, 1.5, -2.0, 0.25], beta=0.9, **kw)


def _round_stein(ps, h, **kw):
    hk.hiso_round_(ps, h, SEEDS[6:8], [0, 1], [0.1, -0.1], [3.0, -1.0], curvature_rule="stein", h_min=1e-3,
                   weight_decay=1e-3, **kw)


def _replay_h(ps, h, **kw):
    rounds = [
        Round([SEEDS[0]], [0], [0.2], [2.0]),
        Round([SEEDS[1], SEEDS[1]], [0, 1], [0.1, 0.3], [1.0, -1.0], weight_decay=0.01),
        Round([SEEDS[7]], [2], [-0.05], [0.5]),
    ]
    hk.replay_(ps, rounds, hessian=h, beta=0.8, **kw)


def _replay(ps, h, **kw):
    rounds = [Round([SEEDS[2]], [1], [0.2]), Round([SEEDS[3]] * 2, [0, 1], [0.1, 0.3], weight_decay=0.02)]
    hk.replay_(ps, rounds, **kw)


OPS = {
    "perturb": _perturb,
    "perturb_h": _perturb_h,
    "update": _update,
    "update_h": _update_h,
    "round_gsq": _round_gsq,
    "round_stein": _round_stein,
    "replay_h": _replay_h,
    "replay": _replay,
}


def _run(op, backend, dtype, distribution, sr, offset):
    ps, h = make_state(dtype)
    OPS[op](ps, h, offset=offset, distribution=distribution, stochastic_rounding=sr, backend=backend)
    return ps, h


@pytest.mark.parametrize("offset", OFFSETS[1:])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("op", list(OPS))
def test_fused_equals_reference(fused_backend, op, dtype, distribution, sr, offset):
    ref_p, ref_h = _run(op, "reference", dtype, distribution, sr, offset)
    got_p, got_h = _run(op, fused_backend, dtype, distribution, sr, offset)
    for i, (a, b) in enumerate(zip(got_p, ref_p)):
        assert_bitwise_equal(a, b, f"{fused_backend} {op} params[{i}]")
    for i, (a, b) in enumerate(zip(got_h, ref_h)):
        assert_bitwise_equal(a, b, f"{fused_backend} {op} hessian[{i}]")
    # the operation did something (guards against a backend that silently does nothing)
    before, _ = make_state(dtype)
    assert any(not torch.equal(a, b) for a, b in zip(got_p, before))


@pytest.mark.parametrize("op", ["perturb_h", "round_gsq", "replay_h"])
def test_offset_zero_and_single_elements(fused_backend, op):
    for sizes in ([1], [1, 1, 1], [3, 1, 4, 1, 5]):
        ref_p, ref_h = make_state(torch.float32, sizes)
        got_p, got_h = make_state(torch.float32, sizes)
        OPS[op](ref_p, ref_h, backend="reference")
        OPS[op](got_p, got_h, backend=fused_backend)
        for a, b in zip(got_p + got_h, ref_p + ref_h):
            assert_bitwise_equal(a, b, f"{op} sizes={sizes}")


def test_mixed_dtype_list(fused_backend):
    """One call over fp32, bf16 and fp16 tensors (one launch per dtype) equals the reference."""
    def state():
        g = torch.Generator().manual_seed(3)
        ps = [torch.randn(n, generator=g).to(dt) for n, dt in zip([17, 4097, 5, 260], DTYPES + [torch.float32])]
        return ps, [torch.rand(p.numel(), generator=g) + 0.5 for p in ps]

    ref_p, ref_h = state()
    got_p, got_h = state()
    _round_gsq(ref_p, ref_h, backend="reference", offset=2**33, stochastic_rounding=True)
    _round_gsq(got_p, got_h, backend=fused_backend, offset=2**33, stochastic_rounding=True)
    for a, b in zip(got_p + got_h, ref_p + ref_h):
        assert_bitwise_equal(a, b, "mixed dtypes")


def test_multidimensional_parameters(fused_backend):
    """Shapes do not matter, only the row-major element order."""
    g = torch.Generator().manual_seed(4)
    mats = [torch.randn(33, 65, generator=g), torch.randn(2, 3, 5, generator=g).to(torch.bfloat16)]
    flat = [m.reshape(-1).clone() for m in mats]
    hk.zo_update_(mats, 11, range(3), [0.1, 0.2, 0.3], backend=fused_backend)
    hk.zo_update_(flat, 11, range(3), [0.1, 0.2, 0.3], backend="reference")
    for m, f in zip(mats, flat):
        assert_bitwise_equal(m.reshape(-1), f)


def test_flat_hessian_equals_per_tensor_hessian(fused_backend):
    ps1, h1 = make_state(torch.bfloat16)
    ps2, h2 = make_state(torch.bfloat16)
    flat = torch.cat(h2)
    _round_gsq(ps1, h1, backend=fused_backend)
    _round_gsq(ps2, flat, backend=fused_backend)
    for a, b in zip(ps1, ps2):
        assert_bitwise_equal(a, b)
    assert_bitwise_equal(torch.cat(h1), flat)


def test_perturb_with_hessian_reads_but_never_writes_it(fused_backend):
    ps, h = make_state(torch.float32)
    before = [t.clone() for t in h]
    _perturb_h(ps, h, backend=fused_backend)
    _update_h(ps, h, backend=fused_backend)
    for a, b in zip(h, before):
        assert_bitwise_equal(a, b)


def test_perturb_semantics(fused_backend):
    """perturb_ adds alpha u / sqrt(H) exactly as the design writes it."""
    x = torch.zeros(1001)
    h = torch.full((1001,), 4.0)
    hk.perturb_([x], 123, 0.5, hessian=[h], offset=7, backend=fused_backend)
    u = hk.directions(123, 1001, offset=7, backend="reference")
    assert_bitwise_equal(x, (0.5 * u) / 2.0)


def test_zero_element_tensors_are_allowed(fused_backend):
    ps = [torch.zeros(0), torch.zeros(5), torch.zeros(0, 3)]
    hk.perturb_(ps, 1, 1.0, backend=fused_backend)
    ref = hk.directions(1, 5, backend="reference")
    assert_bitwise_equal(ps[1], ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("op", ["perturb_h", "update", "round_stein", "replay_h"])
def test_aligned_and_unaligned_tensors_in_one_call(fused_backend, op, dtype):
    """Tensors of whole, aligned groups (the Triton backend's vectorised variant) beside views one element into their
    storage (its scalar variant), in one call, equal the reference."""
    from hiso_kernels.backends.base import vector_aligned

    def state():
        g = torch.Generator().manual_seed(9)
        storage = [torch.randn(n + 1, generator=g).to(dtype) for n in (4096, 12, 260, 8)]
        h_storage = [torch.rand(n + 1, generator=g) + 0.5 for n in (4096, 12, 260, 8)]
        params = [storage[0][:-1], storage[1][1:], storage[2][:-1], storage[3][1:]]
        hessian = [h_storage[0][:-1], h_storage[1][1:], h_storage[2][:-1], h_storage[3][1:]]
        return params, hessian

    ref_p, ref_h = state()
    got_p, got_h = state()
    offsets = hk.global_offsets(got_p, 2**33)
    assert [vector_aligned(p, h, o) for p, h, o in zip(got_p, got_h, offsets)] == [True, False, True, False]
    OPS[op](ref_p, ref_h, offset=2**33, stochastic_rounding=True, backend="reference")
    OPS[op](got_p, got_h, offset=2**33, stochastic_rounding=True, backend=fused_backend)
    for a, b in zip(got_p + got_h, ref_p + ref_h):
        assert_bitwise_equal(a, b, f"{fused_backend} {op}")
