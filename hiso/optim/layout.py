"""Where each trainable element lives: its global index, the local tensor that holds it, and that tensor's device.

The directions of a step depend only on the global element index j = offset of the tensor + position in it
(``docs/directions.md``), never on how the model is split. So any piece of the model a process or a device holds can
be perturbed and updated on its own, with its own global offset, and the result equals, bit for bit, the update of
the whole model in one piece:

* one device, one process: the trainable tensors in optimizer order form one flat vector (offsets from 0);
* several devices in one process (``device_map="auto"``): the tensors are grouped into *runs*, maximal lists of
  tensors on one device whose global ranges follow each other; each run is one kernel launch on its own device;
* sharded parameters (FSDP2's ``fully_shard``, DTensor with ``Shard(0)`` / ``Replicate`` placements): each rank holds
  a row range of every tensor, which is one contiguous range of the tensor's flat row-major order; its global offset
  is the tensor's offset plus the first local row times the row length.

The global order is that of the *unsharded* model (the optimizer's parameter order, group by group), so a sharded
run and a single-process run draw the same directions for every element.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

DeviceKey = Callable[[torch.Tensor], object]


def device_of(t: torch.Tensor) -> object:
    """The default grouping key of a run: the tensor's device (one kernel launch per device)."""
    return t.device


@dataclasses.dataclass(frozen=True)
class Run:
    """Local tensors ``params[start:stop]`` whose global ranges follow each other from ``offset``, on one device:
    one kernel call covers them."""

    start: int
    stop: int
    offset: int


@dataclasses.dataclass
class ParamLayout:
    """The trainable parameters of an optimizer as the kernels see them.

    ``params[i]`` is the local, writable tensor (a DTensor's local shard) of the optimizer parameter ``sources[i]``
    and its first element has the global index ``offsets[i]``; ``groups[g]`` is the index range of parameter group
    g; ``runs[g]`` its kernel calls. ``numel`` and ``shapes`` describe the unsharded model (the same on every rank).
    A tensor with no local elements (an empty shard) is in ``params`` (it has optimizer state) but in no run.
    """

    params: list[torch.Tensor]
    sources: list[torch.Tensor]
    offsets: list[int]
    groups: list[tuple[int, int]]
    runs: list[list[Run]]
    numel: int
    shapes: list[tuple[int, ...]]
    sharded: bool

    def all_runs(self) -> list[Run]:
        return [r for group in self.runs for r in group]


def split_runs(params: Sequence[torch.Tensor], offsets: Sequence[int], start: int = 0, stop: int | None = None,
               key: DeviceKey = device_of) -> list[Run]:
    """Maximal runs of ``params[start:stop]`` on one device (``key``) with consecutive global ranges (empty tensors
    belong to no run)."""
    stop = len(params) if stop is None else stop
    runs: list[Run] = []
    i = start
    while i < stop:
        if params[i].numel() == 0:  # an empty shard: nothing to launch
            i += 1
            continue
        j = i + 1
        while (j < stop and params[j].numel() and key(params[j]) == key(params[i])
               and offsets[j] == offsets[j - 1] + params[j - 1].numel()):
            j += 1
        runs.append(Run(i, j, offsets[i]))
        i = j
    return runs


def is_dtensor(p: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local_shard(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor of a parameter and the flat row-major index of its first element in the full tensor.

    A plain tensor is its own shard (start 0). A DTensor must be placed with ``Shard(0)`` or ``Replicate`` on every
    mesh dimension (what FSDP2 does by default), so that the local piece is one contiguous row range of the full
    tensor; other placements would need one kernel call per row and are refused.
    """
    if not is_dtensor(p):
        return p, 0
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    assert isinstance(p, DTensor)
    for placement in p.placements:
        if not (type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0)):
            raise ValueError(
                f"a DTensor parameter of shape {tuple(p.shape)} has placements {p.placements}; hiso perturbs each "
                "local shard with its global offset and needs Shard(0) or Replicate on every mesh dimension "
                "(FSDP2's default), so that a shard is one contiguous range of the tensor")
    local = p.to_local()
    shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"the local shard has shape {tuple(local.shape)}, the placements say {tuple(shape)}")
    row = math.prod(p.shape[1:]) if p.dim() > 0 else 1
    start = int(global_offset[0]) * row if p.dim() > 0 else 0
    return local, start


def build_layout(param_groups: Sequence[dict], key: DeviceKey = device_of) -> ParamLayout:
    """The layout of the parameters with ``requires_grad`` in ``param_groups`` (a ``torch.optim`` optimizer's)."""
    params: list[torch.Tensor] = []
    sources: list[torch.Tensor] = []
    offsets: list[int] = []
    shapes: list[tuple[int, ...]] = []
    groups: list[tuple[int, int]] = []
    runs: list[list[Run]] = []
    pos = 0
    sharded = False
    for g in param_groups:
        lo = len(params)
        for p in g["params"]:
            if not p.requires_grad:
                continue
            local, start = local_shard(p)
            sharded |= local is not p
            shapes.append(tuple(p.shape))
            params.append(local)
            sources.append(p)
            offsets.append(pos + start)
            pos += math.prod(p.shape)  # a DTensor's shape is the full tensor's
        groups.append((lo, len(params)))
        runs.append(split_runs(params, offsets, lo, len(params), key))
    if not shapes:
        raise ValueError("the optimizer has no trainable parameters (requires_grad=True)")
    return ParamLayout(params, sources, offsets, groups, runs, pos, shapes, sharded)
