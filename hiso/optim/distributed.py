"""ZO steps over ``torch.distributed``: data parallel ranks combine their losses, nothing else crosses the network.

Every rank regenerates the same directions from the same seed, so a data-parallel step needs only the loss values.
Each step, every rank sends its E local losses (E = 2P central, P + 1 forward, 2P + 1 with second differences; times
m if the closure returns m micro-batch losses) and receives everyone's; all ranks then form the same combined losses

    F_e = fsum(all ranks' losses of evaluation e) / (number of them)             (``math.fsum``: correctly rounded)

and derive c_p (and the second differences) from F, so every rank applies the same fp32 coefficients. ``fsum`` does
not depend on the order of its terms, so this is, bit for bit, what one process computes when its closure returns the
same micro-batch losses (``hiso.optim`` closures may return a list of them; ``ZOTrainer`` does so for gradient
accumulation): **W ranks with local batches B_0..B_{W-1} give the bits of one process whose closure returns the
losses of B_0..B_{W-1}**. (The loss of the concatenated global batch is a different float, equal only up to rounding.)
Exchanging losses rather than averaging the scalars c_p is what makes that definition possible: c_p is not linear in
floating point.

The exchange is two ``all_gather`` calls per step: a header (status, E, m, seed, step: 40 bytes per rank) that lets a
rank whose closure failed tell the others (instead of leaving them waiting) and checks that all ranks use the same
seed, then the losses (8 E m bytes per rank). Once, at the first step, the ranks compare digests of the
hyper-parameters, the parameter layout, the seed stream and the replicated initial weights.

FSDP2 (``fully_shard``): each rank perturbs and updates its own shards (``hiso.optim.layout``); the forward
all-gathers them. The root module keeps its gathered parameters after a forward by default, which would hide the
next perturbation from the next forward, so the optimizer reshards every FSDP module that owns its parameters after
each evaluation of the closure (``FSDPModule.reshard``).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .estimate import NonFiniteLossError, mean_loss

#: the default ``process_group=``: the default group when ``torch.distributed`` is initialised with more than one rank
AUTO = "auto"
_OK, _FAILED = 0, 1


def resolve_group(process_group):
    """The process group a ZO optimizer combines losses over, or None for no communication.

    ``"auto"``: the default group if ``torch.distributed`` is initialised and has more than one rank; ``None``: the
    default group (torch's convention; must be initialised); ``False``: never communicate; a ``ProcessGroup``: that
    group. A group of one rank is the same as none.
    """
    if process_group is False:
        return None
    available = torch.distributed.is_available()
    if process_group == AUTO and isinstance(process_group, str):
        if not (available and torch.distributed.is_initialized()):
            return None
        group = torch.distributed.group.WORLD
    elif process_group is None:
        if not (available and torch.distributed.is_initialized()):
            raise ValueError("process_group=None means the default group, but torch.distributed is not initialised")
        group = torch.distributed.group.WORLD
    elif available and isinstance(process_group, torch.distributed.ProcessGroup):
        group = process_group
    else:
        raise TypeError(f"process_group must be 'auto', None, False or a ProcessGroup, got {process_group!r}")
    return group if torch.distributed.get_world_size(group) > 1 else None


def _comm_device(group) -> torch.device:
    """Where the exchanged tensors live: the current accelerator for NCCL-like backends, else the CPU (gloo)."""
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend and hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


def _all_gather(group, t: torch.Tensor) -> torch.Tensor:
    """``all_gather`` of equal-size tensors (exact copies, any dtype): stacked in rank order."""
    out = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, t.contiguous(), group=group)
    return torch.stack(out)


class LossExchange:
    """One step's loss exchange over ``group``; call it with the local losses (E lists of m values), or ``abort()``
    when the local closure failed. Every rank must do one of the two per step."""

    def __init__(self, group, seed: int, step: int):
        self.group, self.seed, self.step = group, int(seed), int(step)
        self.device = _comm_device(group)
        self.bytes_sent = 0
        self.seconds = 0.0  # wall time spent in the collectives (what the README's overhead figures measure)

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        self.bytes_sent += t.numel() * t.element_size()
        out = _all_gather(self.group, t.to(self.device)).cpu()
        self.seconds += time.perf_counter() - start
        return out

    def _header(self, status: int, evaluations: int, per_evaluation: int) -> torch.Tensor:
        return self._gather(torch.tensor([status, evaluations, per_evaluation, self.seed, self.step],
                                         dtype=torch.int64))

    def abort(self) -> None:
        """Tell the other ranks this rank's step failed (they raise instead of waiting for its losses)."""
        self._header(_FAILED, 0, 0)

    def __call__(self, local: Sequence[Sequence[float]]) -> list[float]:
        evaluations, m = len(local), len(local[0])
        heads = self._header(_OK, evaluations, m)
        failed = [r for r, h in enumerate(heads.tolist()) if h[0] != _OK]
        if failed:
            raise RuntimeError(f"rank(s) {failed} failed during this step (their closure raised); the step was "
                               "abandoned on every rank and the parameters restored")
        if len(set(heads[:, 1].tolist())) != 1:
            raise ValueError(f"ranks evaluate different numbers of losses per step: {heads[:, 1].tolist()}")
        if len(set(heads[:, 3].tolist())) != 1 or len(set(heads[:, 4].tolist())) != 1:
            raise ValueError(f"ranks disagree on the seed stream: seeds {heads[:, 3].tolist()} at steps "
                             f"{heads[:, 4].tolist()}")
        counts = heads[:, 2].tolist()
        width = max(counts)
        mine = torch.zeros(evaluations, width, dtype=torch.float64)
        mine[:, :m] = torch.tensor([list(row) for row in local], dtype=torch.float64)
        every = self._gather(mine)  # (world, E, width)
        combined = []
        for e in range(evaluations):
            values = [v for r, n in enumerate(counts) for v in every[r, e, :n].tolist()]
            combined.append(mean_loss(values))
        if not all(math.isfinite(v) for v in combined):
            raise NonFiniteLossError("a closure returned a non-finite loss on some rank; parameters were restored")
        return combined


# ---------------------------------------------------------------------- the first-step check
def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 1


def weights_digest(tensors: Iterable[torch.Tensor], chunk: int = 1 << 22) -> int:
    """A 63-bit digest of the tensors' bits (BLAKE2b over their bytes, chunk by chunk through host memory)."""
    h = hashlib.blake2b(digest_size=8)
    for t in tensors:
        flat = t.detach().reshape(-1)
        bits = flat.view({4: torch.int32, 2: torch.int16, 8: torch.int64, 1: torch.uint8}[flat.element_size()])
        for start in range(0, bits.numel(), chunk):
            h.update(bits[start:start + chunk].cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") >> 1


def check_agreement(group, parts: dict[str, object]) -> None:
    """Raise ValueError on every rank if the ranks' ``parts`` (hyper-parameters, layout, seed stream, initial
    weights; each a ``repr``-able value or an int digest) differ. One ``all_gather`` of 8 bytes per part."""
    names = list(parts)
    values = [v if isinstance(v, int) else _digest(repr(v).encode()) for v in parts.values()]
    mine = torch.tensor(values, dtype=torch.int64, device=_comm_device(group))
    every = _all_gather(group, mine).cpu()
    bad = [names[i] for i in range(len(names)) if len(set(every[:, i].tolist())) != 1]
    if bad:
        raise ValueError(f"the ranks of the process group disagree on: {', '.join(bad)}. Every rank must build the "
                         "same model (same initial weights, e.g. the same torch.manual_seed), the same optimizer "
                         "(same hyper-parameters and seed) and the same parameter order")


# ---------------------------------------------------------------------- FSDP2
def _fsdp_params():
    """(module, FSDPParam) for every FSDP2 module alive in this process (FSDP2's module registry: torch keeps no
    public map from a parameter to its FSDP module; a changed internal raises a clear error)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import FSDPModule
    except ImportError as exc:  # pragma: no cover - a torch without FSDP2's registry
        raise RuntimeError(_FSDP_HINT) from exc
    out = []
    for module in list(_module_state_mapping.keys()):
        if not isinstance(module, FSDPModule):
            continue
        try:
            for group in module._get_fsdp_state()._fsdp_param_groups:
                out += [(module, fp) for fp in group.fsdp_params]
        except AttributeError as exc:  # pragma: no cover - FSDP2 internals changed
            raise RuntimeError(_FSDP_HINT) from exc
    return out


def fsdp_modules_of(params: Sequence[torch.Tensor]) -> list[Any]:
    """The FSDP2 modules (``fully_shard``) that own some of ``params`` (their sharded DTensors)."""
    ids = {id(p) for p in params}
    found: list[Any] = []
    for module, fp in _fsdp_params():
        if id(fp.sharded_param) in ids and not any(m is module for m in found):
            found.append(module)
    return found


def check_not_gathered(params: Sequence[torch.Tensor]) -> None:
    """Raise ValueError if some of ``params`` are FSDP2's gathered (unsharded) copies rather than its sharded
    parameters: an optimizer built after a forward of the root module gets those, and FSDP frees them after
    the next reshard. Nothing to check when no FSDP2 module exists."""
    if not torch.distributed.is_available() or not params:
        return
    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:  # pragma: no cover - the registry moved: nothing to check against
        return
    if not _module_state_mapping:
        return
    ids = {id(p) for p in params}
    if any(id(getattr(fp, "_unsharded_param", None)) in ids for _, fp in _fsdp_params()):
        raise ValueError("the optimizer holds FSDP2's gathered (unsharded) parameters: a forward left the root "
                         "module gathered when the optimizer was built. Call model.reshard() (or build the "
                         "optimizer before any forward) so that it gets the sharded DTensor parameters")


_FSDP_HINT = ("hiso could not find the FSDP2 modules of the optimizer's sharded parameters on this torch; pass them "
              "with optimizer.set_fsdp_modules(model.modules())")
