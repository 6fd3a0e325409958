"""Multi-direction update for 1, 2, 4, 8, 16, 32 directions:
``hk.zo_update_(params, seed, range(D), coefficients)`` (one pass for all D) against one fused call per direction,
D passes of the eager MeZO update loop, the same under torch.compile, the copy and the generator drawing D directions.

Minimal bytes per element: 2 s whatever D; elements/s counts element x directions.
"""

import pytest

KERNELS = ("update",)


@pytest.mark.benchmark
def test_update(run_case, case, provider):
    run_case(case, provider)
