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

from .layout import Run, split_runs

#: elements per chunk (1 Mi: 4 MiB scratch per buffer in fp32)
DEFAULT_CHUNK = 1 << 20

# op(tensors, hessian_views or None, offset) applies a kernel to the given contiguous views at that global offset
ChunkOp = Callable[[list, "list | None", int], None]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


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


def _chunk_groups(params: Sequence[torch.Tensor], chunk: int, start: int = 0, stop: int | None = None):
    """Split the global index range of ``params[start:stop]`` (one run: consecutive global ranges, one device) into
    pieces of about ``chunk`` elements: (param, start, stop) slices, consecutive in global index, so that one kernel
    call covers many small tensors or a slice of a large one."""
    group, size = [], 0
    for i in range(start, len(params) if stop is None else stop):
        n, begin = params[i].numel(), 0
        while begin < n:
            take = min(n - begin, chunk - size)
            group.append((i, begin, begin + take))
            size += take
            begin += take
            if size >= chunk:
                yield group
                group, size = [], 0
    if group:
        yield group


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
    with torch.no_grad():
        pieces = (g for r in (split_runs(params, offsets) if runs is None else runs)
                  for g in _chunk_groups(params, chunk, r.start, r.stop))
        for group in pieces:
            views = [flats[i][a:b] for i, a, b in group]
            h_views = None if h_flats is None else [h_flats[i][a:b] for i, a, b in group]
            offset = offsets[group[0][0]] + group[0][1]
            saved = [v.clone() for v in views]
            forward(views, h_views, offset)
            sim = [v.clone() for v in views]
            for op in restore_sequence:
                op(sim, h_views, offset)
            for (i, a, _), s_view, o_view in zip(group, sim, saved):
                bad = (_bits(s_view) != _bits(o_view)).nonzero().view(-1)
                if bad.numel():
                    log.entries.append((i, a, bad.to(torch.int32), o_view.index_select(0, bad)))
    return log
