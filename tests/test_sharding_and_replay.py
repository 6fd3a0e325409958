"""Sharding invariance (a list equals its tensors with their own offsets, and a tensor split in chunks) and replay
(R rounds in one call equal R single-round calls, bit for bit)."""

from __future__ import annotations

import pytest
import torch

import hiso_kernels as hk
from helpers import DTYPES, assert_bitwise_equal, host_fused_backends
from hiso_kernels import Round

BACKENDS = ["reference"] + host_fused_backends()
SIZES = [5, 4097, 3, 1030]


def state(dtype, sizes=SIZES):
    g = torch.Generator().manual_seed(11)
    return ([torch.randn(n, generator=g).to(dtype) for n in sizes],
            [torch.rand(n, generator=g) + 0.25 for n in sizes])


def apply_round(params, hessian, offset, backend, sr=False):
    hk.hiso_round_(params, hessian, [2**40 + 1, 2**40 + 1, 99], [0, 1, 0], [0.1, 0.2, -0.05], [1.0, -0.5, 0.0],
                   offset=offset, weight_decay=1e-3, stochastic_rounding=sr, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_list_equals_each_tensor_with_its_offset(backend, dtype):
    base = 2**32 - 7
    lp, lh = state(dtype)
    apply_round(lp, lh, base, backend, sr=True)
    sp, sh = state(dtype)
    pos = base
    for p, h in zip(sp, sh):
        apply_round([p], [h], pos, backend, sr=True)
        pos += p.numel()
    for a, b in zip(lp + lh, sp + sh):
        assert_bitwise_equal(a, b, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cuts", [(1,), (3, 4), (4097, 4099), (1, 2, 3, 1000, 5000)])
def test_tensor_split_in_chunks(backend, cuts):
    """A shard (tensor parallel, FSDP) perturbed with its own offset gets the same directions as the whole tensor."""
    g = torch.Generator().manual_seed(5)
    whole = torch.randn(9001, generator=g).to(torch.bfloat16)
    h_whole = torch.rand(9001, generator=g) + 0.5
    shards = [t.clone() for t in torch.tensor_split(whole, list(cuts))]
    h_shards = [t.clone() for t in torch.tensor_split(h_whole, list(cuts))]
    apply_round([whole], [h_whole], 17, backend, sr=True)
    pos = 17
    for s, h in zip(shards, h_shards):
        apply_round([s], [h], pos, backend, sr=True)
        pos += s.numel()
    assert_bitwise_equal(torch.cat(shards), whole)
    assert_bitwise_equal(torch.cat(h_shards), h_whole)


def rounds(n_rounds: int, with_curvature: bool):
    out = []
    for r in range(n_rounds):
        k = 1 + r % 3
        seeds = [1000 + 7 * r + i for i in range(k)]
        out.append(Round(seeds, [i % 2 for i in range(k)], [0.01 * (i + 1) * (-1) ** r for i in range(k)],
                         [0.5 + 0.1 * i for i in range(k)] if with_curvature else None,
                         weight_decay=1e-3 * (r % 2)))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("mode", ["no_h", "gsq", "stein"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_replay_equals_rounds_one_by_one(backend, dtype, mode, sr):
    rs = rounds(12, mode != "no_h")
    kw = dict(offset=2**33 + 1, stochastic_rounding=sr, backend=backend)
    if mode != "no_h":
        kw.update(curvature_rule=mode, beta=0.9, h_min=1e-4)
    ap, ah = state(dtype)
    hk.replay_(ap, rs, hessian=ah if mode != "no_h" else None, **kw)
    bp, bh = state(dtype)
    for rnd in rs:
        hk.replay_(bp, [rnd], hessian=bh if mode != "no_h" else None, **kw)
    for a, b in zip(ap + ah, bp + bh):
        assert_bitwise_equal(a, b, f"{backend} {mode}")
    if mode != "no_h":  # and the single-round API is the same thing
        cp, ch = state(dtype)
        for rnd in rs:
            hk.hiso_round_(cp, ch, rnd.seeds, rnd.directions, rnd.coefficients, rnd.curvature_coefficients,
                           weight_decay=rnd.weight_decay, **kw)
        for a, c in zip(ap + ah, cp + ch):
            assert_bitwise_equal(a, c, f"{backend} {mode} hiso_round_")


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_equals_sum_of_single_direction_updates_in_fp32_math(backend):
    """A P-direction update is one pass computing sum_i a_i u_i in fp32; check against materialised directions."""
    x = torch.zeros(4099)
    coefs = [0.5, -0.25, 0.125, 2.0]
    hk.zo_update_([x], 31, range(4), coefs, offset=3, backend=backend)
    acc = torch.zeros(4099)
    for p, a in enumerate(coefs):
        acc = acc + a * hk.directions(31, 4099, direction=p, offset=3, backend="reference")
    assert_bitwise_equal(x, -acc)
