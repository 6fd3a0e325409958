"""The fused HiSo round (x and H updated in one pass) and the replay of 1, 10, 100 HiSo rounds in one pass, against
one fused call per round, the eager loop written the MeZO way (per round: torch.manual_seed, then per tensor normal,
divide by sqrt(H), update x, update H), the same under torch.compile, the copy and the generator alone.

Minimal bytes per element: 2 s + 8 (read and write x and H) whatever the number of rounds.
"""

import pytest

KERNELS = ("hiso_round", "replay")


@pytest.mark.benchmark
def test_hiso(run_case, case, provider):
    run_case(case, provider)
