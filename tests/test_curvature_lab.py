"""The curvature lab's building blocks (issue 15; benchmarks/curvature/fmnist_lab.py). The reduced-dimension direction
families (Sparse-MeZO masks, LOZO low-rank directions) are regenerated from seeds and the shared parameters (a replica
draws the same bits), have the structure their papers define, and leave vectors on the library's direction; the
schedule controls end at the run's lr; unknown methods are errors, not a silent fallback."""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

import hiso_kernels as hk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "curvature"))
import fmnist_lab as lab  # noqa: E402

SHAPES = [(16, 1, 5, 5), (16,), (24, 37), (37,), (5, 3)]


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def offsets(ps):
    return hk.global_offsets(ps)


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.75, 0.9])
def test_sparse_masks_keep_the_smallest_magnitudes(sparsity):
    ps = params()
    masks = lab.sparse_masks(ps, sparsity)
    for t, m in zip(ps, masks):
        if t.dim() < 2:
            assert m is None
            continue
        k = max(1, round((1 - sparsity) * t.numel()))
        assert int(m.sum()) == k  # continuous values: no ties
        kept, dropped = t.abs()[m.bool()], t.abs()[~m.bool()]
        assert dropped.numel() == 0 or float(kept.max()) < float(dropped.min())


@pytest.mark.parametrize("family", ["sparse", "lozo"])
def test_family_directions_are_regenerated_bit_for_bit(family):
    ps = params()
    masks = lab.sparse_masks(ps, 0.75)
    a = lab.family_direction(family, ps, offsets(ps), 1234, 7, 3, 1, masks=masks)
    b = lab.family_direction(family, [t.clone() for t in ps], offsets(ps), 1234, 7, 3, 1,
                             masks=lab.sparse_masks([t.clone() for t in ps], 0.75))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    c = lab.family_direction(family, ps, offsets(ps), 1234, 7, 3, 2, masks=masks)  # another direction index
    assert not torch.equal(a[0], c[0])


def test_vectors_keep_the_library_direction_and_sparse_restricts_it():
    ps = params()
    off = offsets(ps)
    masks = lab.sparse_masks(ps, 0.75)
    z = lab.family_direction("sparse", ps, off, 99, 7, 0, 2, masks=masks)
    for i, t in enumerate(ps):
        u = hk.directions(99, t.numel(), direction=2, offset=off[i]).view_as(t)
        assert torch.equal(z[i], u if t.dim() < 2 else u * masks[i])


def test_lozo_is_rank_r_with_a_lazy_right_factor():
    ps = params()
    off = offsets(ps)
    r, nu = 2, 50
    z0 = lab.family_direction("lozo", ps, off, 11, 7, 0, 0, rank=r, nu=nu)
    z1 = lab.family_direction("lozo", ps, off, 12, 7, 49, 3, rank=r, nu=nu)  # same window: same V
    z2 = lab.family_direction("lozo", ps, off, 13, 7, 50, 0, rank=r, nu=nu)  # next window
    for i, t in enumerate(ps):
        if t.dim() < 2:
            continue
        m = t.shape[0]
        a, b, c = (z[i].reshape(m, -1).double() for z in (z0, z1, z2))

        def rank_of(x):  # float32 products: singular values of 1e-7 relative are rounding
            return int(torch.linalg.matrix_rank(x, rtol=1e-5))

        assert rank_of(a) == min(r, *a.shape)
        # rows of a window span the same r-dimensional row space (V's columns); the next window's do not
        both = torch.cat([a, b])
        assert rank_of(both) == min(r, both.shape[1])
        if min(a.shape) > 2 * r:
            assert rank_of(torch.cat([a, c])) == 2 * r


def test_lozo_scale_matches_the_full_direction():
    """/ sqrt(r): E||U V^T||_F^2 = m n r, so the family's E||z||^2 equals the full direction's m n."""
    t = torch.zeros(64, 80)
    norms = [float((lab.family_direction("lozo", [t], [0], s, 5, s, 0, rank=3)[0] ** 2).mean())
             for s in range(200)]
    assert abs(sum(norms) / len(norms) - 1.0) < 0.1


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="family"):
        lab.family_direction("lowrank", params(), offsets(params()), 1, 1, 0, 0)


def test_exponential_schedule_control_ends_at_lr():
    s = lab.schedule_for("decomfl-exp0.1", 300)
    assert len(s) == 300 and s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(1.0)
    assert all(a > b for a, b in itertools.pairwise(s))
    assert lab.schedule_for("decomfl", 300) is None
    for bad in ("decomfl-exp0", "decomfl-exp1.5", "decomfl-expx"):
        with pytest.raises(ValueError, match="decomfl-exp<R>"):
            lab.schedule_for(bad, 10)


def test_unknown_method_is_an_error():
    class Stub:  # run() validates the method before it touches the model
        P, d = 5, 10

    with pytest.raises(ValueError, match="unknown method"):
        lab.Lab.run(Stub(), "bcd-typo", 1e-3)
