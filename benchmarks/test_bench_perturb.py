"""Perturbation, without and with H: ``hk.perturb_(params, seed, mu[, hessian=H])`` against the eager MeZO loop, the
same loop under torch.compile, a copy of the same bytes and the generator alone.

Minimal bytes per element: perturb 2 s, with H 2 s + 4 (s = parameter element size; bf16: 4 and 8).
"""

import pytest

KERNELS = ("perturb", "perturb_h")


@pytest.mark.benchmark
def test_perturb(run_case, case, provider):
    run_case(case, provider)
