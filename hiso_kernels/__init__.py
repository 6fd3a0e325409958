"""hiso_kernels: fused, seed-regenerated zeroth-order perturbation and update kernels.

Directions u(seed, p) are never stored: every kernel regenerates them from a counter-based generator (Philox4x32-10,
keyed by the seed, counted by the global element index), so perturbing, updating and replaying a model costs one pass
over its parameters and no extra memory, and gives the same bits on every backend (``docs/directions.md``).

    import hiso_kernels as hk
    hk.perturb_(params, seed, +mu)            # x <- x + mu u
    ...
    hk.zo_update_(params, seed, range(P), [lr * c / P for c in scalars])
"""

from __future__ import annotations

from ._program import Round
from ._version import __version__
from .backends import available_backends
from .bound import BoundParams, bind
from .ops import directions, global_offsets, hiso_round_, perturb_, replay_, zo_update_
from .spec import SPEC_VERSION, CurvatureRule, Distribution

__all__ = [
    "SPEC_VERSION",
    "BoundParams",
    "CurvatureRule",
    "Distribution",
    "Round",
    "__version__",
    "available_backends",
    "bind",
    "directions",
    "global_offsets",
    "hiso_round_",
    "perturb_",
    "replay_",
    "zo_update_",
]
