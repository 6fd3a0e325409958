"""Zeroth-order optimizers for any training loop (``torch.optim.Optimizer`` with the ``step(closure)`` contract)."""

from .exact_restore import UndoLog, perturb_with_undo
from .zo import HiSo, ZOOptimizer, ZOSGD, ZOStep

__all__ = ["HiSo", "UndoLog", "ZOOptimizer", "ZOSGD", "ZOStep", "perturb_with_undo"]
