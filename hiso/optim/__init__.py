"""Zeroth-order optimizers for any training loop (``torch.optim.Optimizer`` with the ``step(closure)`` contract).

* :mod:`.zo` - the optimizers :class:`ZOSGD` (MeZO / DeComFL) and :class:`HiSo`, their step records and replay
* :mod:`.estimate` - the perturb / evaluate / restore cycle that measures the directional scalars
* :mod:`.update` - the coefficients of an update as a kernel round (shared with :mod:`hiso.fl`)
* :mod:`.exact_restore` - the sparse undo log that brings perturbed parameters back to their exact bits
* :mod:`.layout` - global offsets of local tensors: FSDP2 / DTensor shards, kernel launches per device
* :mod:`.distributed` - data parallel steps over ``torch.distributed``: the loss exchange and the first-step checks
* :mod:`.history` - step records and their versioned encoding (checkpoints, history files in JSON or torch format)
"""

from .estimate import Estimate, NonFiniteLossError, estimate_scalars, mean_loss
from .exact_restore import UndoLog, perturb_with_undo
from .update import CURVATURE_RULES, step_round
from .zo import ZOSGD, HiSo, ZOOptimizer, ZOStep

__all__ = [
    "CURVATURE_RULES",
    "ZOSGD",
    "Estimate",
    "HiSo",
    "NonFiniteLossError",
    "UndoLog",
    "ZOOptimizer",
    "ZOStep",
    "estimate_scalars",
    "mean_loss",
    "perturb_with_undo",
    "step_round",
]
