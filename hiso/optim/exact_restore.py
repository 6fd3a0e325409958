"""Exact restore of perturbed parameters with a sparse undo log.

Floating-point perturb / restore is not an identity: y = fl(x + d) then fl(y - d) differs from x wherever x + d lands
in a higher binade (or is much larger than x); in fp32 that is a few percent of the elements per cycle. Replaying a
history of (seed, scalars) on another replica gives the same bits as the trainer only if the trainer's own
parameters come back exactly. Keeping a copy of the parameters would double their memory.

Instead, :func:`perturb_with_undo` applies the perturbation chunk by chunk and, for each chunk, simulates the restore
sequence that will follow (with the same fused kernel, so the simulation is bit-exact) on a scratch copy; the elements
that would not come back are recorded as (index, original value). After the real restore, :meth:`UndoLog.apply`
writes those values back. Transient memory: two chunks; persistent: the mismatching elements only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from hiso_kernels.backends.base import LOG_CHUNK, chunk_slices, undo_entries

from .layout import Run, split_runs

#: elements per chunk (1 Mi: 4 MiB scratch per buffer in fp32): the kernels' own fallback chunk
DEFAULT_CHUNK = LOG_CHUNK

# op(tensors, hessian_views or None, offset) applies a kernel to the given contiguous views at that global offset
ChunkOp = Callable[[list, "list | None", int], None]


@dataclasses.dataclass
class UndoLog:
    """Per parameter: flat indices (int32 within their chunk + chunk start) and the original values."""

    entries: list = dataclasses.field(default_factory=list)  # (param index, chunk start, local idx int32, values)

    @property
    def numel(self) -> int:
        return sum(int(e[2].numel()) for e in self.entries)

    @property
    def nbytes(self) -> int:
        return sum(int(e[2].numel()) * (4 + e[3].element_size()) for e in self.entries)

    def apply(self, params: Sequence[torch.Tensor]) -> None:
        """Write the recorded original values back (after the real restore ran)."""
        for i, start, idx, values in self.entries:
            params[i].detach().view(-1).index_copy_(0, idx.long() + start, values)


def perturb_with_undo(
    params: Sequence[torch.Tensor],
    offsets: Sequence[int],
    hessian: Sequence[torch.Tensor] | None,
    forward: ChunkOp,
    restore_sequence: Sequence[ChunkOp],
    chunk: int = DEFAULT_CHUNK,
    runs: Sequence[Run] | None = None,
) -> UndoLog:
    """Apply ``forward`` to every parameter and record what ``restore_sequence`` would fail to bring back.

    ``forward`` and each restore op are called on lists of contiguous flat views that are consecutive in global
    index, with the global offset of the first; the kernels treat them exactly like the whole tensors (directions
    depend only on the global index). ``runs`` (default: :func:`~hiso.optim.layout.split_runs` by device and
    contiguity of ``offsets``) keeps every call on one device and one consecutive global range.
    """
    log = UndoLog()
    flats = [p.detach().view(-1) for p in params]
    h_flats = None if hessian is None else [h.view(-1) for h in hessian]
    numels = [f.numel() for f in flats]
    groups = (g for r in (split_runs(params, offsets) if runs is None else runs)
              for g in chunk_slices(numels, chunk, r.start, r.stop))

    def restore(sim, h_views, offs):
        for op in restore_sequence:
            op(sim, h_views, offs[0])

    with torch.no_grad():
        found = undo_entries(flats, h_flats, offsets, groups, lambda xs, hs, offs: forward(xs, hs, offs[0]), restore)
        log.entries = [(i, a, bad.to(torch.int32), values) for i, a, bad, values in found]
    return log
