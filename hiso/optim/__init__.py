"""Zeroth-order optimizers for any training loop (``torch.optim.Optimizer`` with the ``step(closure)`` contract)."""

from .exact_restore import UndoLog, perturb_with_undo
from .zo import Estimate, HiSo, ZOOptimizer, ZOSGD, ZOStep, estimate_scalars

__all__ = ["Estimate", "HiSo", "UndoLog", "ZOOptimizer", "ZOSGD", "ZOStep", "estimate_scalars", "perturb_with_undo"]
