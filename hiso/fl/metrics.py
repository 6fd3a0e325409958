"""One metrics row per evaluation, the same keys for every method and runtime (the simulation, the baselines and
the Flower ServerApp), written as JSON lines by ``hiso train`` and the Flower app."""

from __future__ import annotations

import dataclasses
import math
import time


@dataclasses.dataclass
class RunMetrics:
    """Running totals of one run; :meth:`row` turns them into an evaluation row.

    bytes_up / bytes_down: protocol bytes, all clients together (client to server / server to client);
    rejections: replies rejected or missing (invalid, hostile, failed clients); resent: assignments sent again in
    the same round to nodes that had fallen behind (Flower only).
    """

    method: str
    bytes_up: int = 0
    bytes_down: int = 0
    rejections: int = 0
    resent: int = 0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    _train_losses: list = dataclasses.field(default_factory=list)

    def add_train_loss(self, loss: float) -> None:
        self._train_losses.append(float(loss))

    def row(self, rnd: int, accuracy: float, eval_loss: float, **extra) -> dict:
        """The row of an evaluation at round ``rnd``; the training loss is the mean since the previous row."""
        losses, self._train_losses = self._train_losses, []
        train_loss = math.fsum(losses) / len(losses) if losses else None
        row = dict(round=rnd, method=self.method, accuracy=accuracy, eval_loss=_finite(eval_loss),
                   train_loss=_finite(train_loss), bytes_up=self.bytes_up, bytes_down=self.bytes_down,
                   rejections=self.rejections, resent=self.resent, seconds=time.perf_counter() - self.started)
        row.update(extra)
        return row


def _finite(value: float | None) -> float | None:
    """Non-finite numbers are written as null (strict JSON has no NaN or Infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)
