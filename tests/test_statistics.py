"""Distribution checks on 10^6 samples: Gaussian mean / variance / Kolmogorov-Smirnov, higher moments and tail mass,
Rademacher balance, and no correlation between directions, seeds and neighbouring elements."""

from __future__ import annotations

import math

import numpy as np
import pytest

import hiso_kernels as hk

scipy_stats = pytest.importorskip("scipy.stats")
N = 1_000_000


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 9, 2**35 + 1)])
def test_gaussian_moments_and_ks(seed, offset):
    u = hk.directions(seed, N, offset=offset).double().numpy()
    assert abs(u.mean()) < 5 / math.sqrt(N)  # 5 sigma
    assert abs(u.var() - 1.0) < 5 * math.sqrt(2 / N)
    assert abs(scipy_stats.skew(u)) < 5 * math.sqrt(6 / N)
    assert abs(scipy_stats.kurtosis(u)) < 5 * math.sqrt(24 / N)
    ks = scipy_stats.kstest(u, "norm")
    assert ks.pvalue > 1e-3, ks
    # tails: P(|z| > 3) = 0.0027; Box-Muller on 23-bit uniforms reaches |z| <= 5.77
    tail = np.mean(np.abs(u) > 3)
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / N)
    assert np.abs(u).max() < 5.78


def test_gaussian_lanes_are_each_standard_normal():
    """Each of the four lanes of a Philox group (cos and sin outputs of two Box-Muller pairs) is N(0, 1)."""
    u = hk.directions(7, N).double().numpy().reshape(-1, 4)
    for lane in range(4):
        assert scipy_stats.kstest(u[:, lane], "norm").pvalue > 1e-3
    c = np.corrcoef(u.T)
    assert np.abs(c - np.eye(4)).max() < 5 / math.sqrt(N / 4)


def test_rademacher_is_balanced():
    u = hk.directions(3, N, distribution="rademacher").numpy()
    assert set(np.unique(u).tolist()) == {-1.0, 1.0}
    plus = (u > 0).sum()
    assert abs(plus - N / 2) < 5 * math.sqrt(N / 4)
    pairs = u[:-1] * u[1:]  # neighbouring signs independent
    assert abs(pairs.mean()) < 5 / math.sqrt(N)


@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_directions_seeds_and_neighbours_are_uncorrelated(distribution):
    n = 200_000
    a = hk.directions(5, n, distribution=distribution).double().numpy()
    b = hk.directions(5, n, direction=1, distribution=distribution).double().numpy()
    c = hk.directions(6, n, distribution=distribution).double().numpy()
    d = hk.directions(2**32 + 5, n, distribution=distribution).double().numpy()  # differs only in the key's hi word
    for other in (b, c, d):
        assert abs(np.corrcoef(a, other)[0, 1]) < 5 / math.sqrt(n)
    assert abs(np.corrcoef(a[:-4], a[4:])[0, 1]) < 5 / math.sqrt(n)  # next group
