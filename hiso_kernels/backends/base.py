"""The interface every backend implements, and the launch plan the compiled backends share."""

from __future__ import annotations

import abc
import collections
import contextlib
import os
import threading

import numpy as np
import torch

from .._codes import DTYPE_CODES
from .._program import Program, sub_program
from ..spec import Distribution

#: set to 1 to wait for every GPU launch and raise its error at the call that made it (debugging; slow)
ENV_SYNC_LAUNCHES = "HISO_SYNC_LAUNCHES"


class Backend(abc.ABC):
    """A way to execute programs on tensors. Implementations are stateless apart from caches."""

    name: str = ""
    description: str = ""

    @abc.abstractmethod
    def availability(self) -> tuple[bool, str]:
        """(usable in this process, why or why not)."""

    @abc.abstractmethod
    def supports(self, device: torch.device) -> bool:
        """Whether this backend can run on tensors of ``device`` (given that it is available)."""

    @abc.abstractmethod
    def apply(
        self,
        params: list[torch.Tensor],
        hessian: list[torch.Tensor] | None,
        offsets: list[int],
        program: Program,
    ) -> None:
        """Run ``program`` in place on ``params`` (and ``hessian``). Inputs are already validated."""

    @abc.abstractmethod
    def directions(
        self, seed: int, direction: int, offset: int, numel: int, distribution: Distribution, device: torch.device
    ) -> torch.Tensor:
        """fp32 direction values for global indices [offset, offset + numel)."""

    def directions_sum(
        self, seed: int, n_dirs: int, offset: int, numel: int, distribution: Distribution, device: torch.device
    ) -> torch.Tensor:
        """Generator-only benchmark kernel: partial sums (any shape) whose total is the sum of u(seed, p, j) over
        p < n_dirs and the index range. Its time is the generator term of a fused kernel's roofline."""
        raise NotImplementedError

    def log_support(self) -> tuple[bool, str]:
        """(whether :meth:`apply_logged` runs inside the kernel here, how it runs)."""
        return False, ("no in-kernel undo log in this backend yet: logged runs simulate on scratch copies, chunk by "
                       "chunk (today's path: the applied pass plus two copies and the simulated passes per chunk)")

    def apply_logged(
        self,
        params: list[torch.Tensor],
        hessian: list[torch.Tensor] | None,
        offsets: list[int],
        program: Program,
        n_apply: int,
        chunk: int | None = None,
    ) -> KernelLog:
        """Apply rounds ``[0, n_apply)`` of ``program`` in place, simulate the remaining rounds, and return the log of
        the elements whose simulated value differs (bit for bit) from their value before the call, with that value.
        Inputs are validated (no round updates H; 1 <= n_apply < rounds). This default simulates on scratch copies
        of ``chunk`` elements (:func:`chunked_logged_run`); backends with an in-kernel log override it (and ignore
        ``chunk``: they need no scratch)."""
        return chunked_logged_run(self, params, hessian, offsets, program, n_apply, chunk or LOG_CHUNK)


#: elements per chunk of :func:`chunked_logged_run` (1 Mi: 4 MiB of scratch per copy in fp32)
LOG_CHUNK = 1 << 20


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def chunk_slices(numels, chunk: int, start: int = 0, stop: int | None = None):
    """Split the tensors ``start:stop`` (element counts ``numels``, consecutive in global index) into groups of
    about ``chunk`` elements: lists of (tensor index, begin, end) slices, so that one kernel call covers many small
    tensors or a slice of a large one."""
    group, size = [], 0
    for i in range(start, len(numels) if stop is None else stop):
        n, begin = int(numels[i]), 0
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


def undo_entries(flats, h_flats, offsets, groups, forward, restore):
    """The undo log of a perturbation, computed by simulation: for each group of (tensor, begin, end) slices of the
    flat tensors, save a copy, ``forward(views, h_views, offsets)``, run ``restore`` on a second copy (the same
    kernels, so the simulation is bit-exact) and yield (tensor index, begin, local indices, original values) of the
    elements that would not come back. Transient memory: two groups. Shared by the kernels' fallback logged run
    (:func:`chunked_logged_run`) and :func:`hiso.optim.exact_restore.perturb_with_undo`."""
    for group in groups:
        views = [flats[i][a:b] for i, a, b in group]
        h_views = None if h_flats is None else [h_flats[i][a:b] for i, a, b in group]
        offs = [offsets[i] + a for i, a, _ in group]
        saved = [v.clone() for v in views]
        forward(views, h_views, offs)
        sim = [v.clone() for v in views]
        restore(sim, h_views, offs)
        for (i, a, _), s_view, o_view in zip(group, sim, saved):
            bad = (_bits(s_view) != _bits(o_view)).nonzero().view(-1)
            if bad.numel():
                yield i, a, bad, o_view.index_select(0, bad)


def chunked_logged_run(backend: Backend, params, hessian, offsets, program: Program, n_apply: int,
                       chunk: int = LOG_CHUNK) -> KernelLog:
    """A logged run out of plain runs (:func:`undo_entries` over chunks of about ``chunk`` elements, consecutive in
    global index across tensors): apply the applied rounds, simulate the others, keep what does not come back."""
    from .reference import IndexLog

    head, tail = sub_program(program, 0, n_apply), sub_program(program, n_apply, program.n_rounds)
    flats = [p.detach().view(-1) for p in params]
    h_flats = None if hessian is None else [h.detach().view(-1) for h in hessian]
    groups = chunk_slices([f.numel() for f in flats], chunk)
    found = undo_entries(flats, h_flats, offsets, groups, lambda xs, hs, offs: backend.apply(xs, hs, offs, head),
                         lambda xs, hs, offs: backend.apply(xs, hs, offs, tail))
    return IndexLog([(flats[i], None if h_flats is None else h_flats[i], offsets[i], bad + a, values)
                     for i, a, bad, values in found])


def device_log(backend: Backend, p, h, o, plan: LaunchPlan, index, value, counts, skip, program: Program,
               n_apply: int, chunk: int | None, unit_groups: int) -> list:
    """The entries (:class:`~hiso_kernels.backends.reference.IndexLog` form) of a GPU kernel's logged launch over
    one launch group: ``index`` / ``value`` / ``counts`` (reserved, written) as the kernel left them, grouped by
    tensor. Where the log overflowed, the units flagged in ``skip`` (``unit_groups`` groups each, the units of chunk
    c numbered from c * groups_per_chunk / unit_groups) were left untouched: they go through
    :func:`chunked_logged_run` here."""
    reserved, used = counts.tolist()
    j = index[:used]
    values = value[:used].view(p[0].dtype)
    starts = torch.tensor(o, dtype=torch.int64, device=j.device)
    slot = torch.searchsorted(starts, j, right=True) - 1  # the tensor of each entry (offsets ascend in a group)
    order = torch.argsort(slot, stable=True)
    slot, j, values = slot[order], j[order], values[order]
    sizes = torch.bincount(slot, minlength=len(p)).tolist()
    entries = []
    for i, (js, vs) in enumerate(zip(j.split(sizes), values.split(sizes))):
        if js.numel():
            entries.append((p[i].detach().view(-1), None if h is None else h[i].view(-1), o[i], js - o[i], vs))
    if reserved > used:  # some programs overflowed and left their elements as they were
        per_chunk = plan.groups_per_chunk // unit_groups
        chunks = plan.chunks.cpu()
        views, h_views, offs = [], [], []
        for u in skip.nonzero().view(-1).tolist():
            i, g_first = chunks[u // per_chunk].tolist()
            g_first += (u % per_chunk) * unit_groups
            start = max(0, 4 * g_first - o[i])
            stop = min(p[i].numel(), 4 * (g_first + unit_groups) - o[i])
            if start < stop:
                views.append(p[i].detach().view(-1)[start:stop])
                h_views.append(None if h is None else h[i].view(-1)[start:stop])
                offs.append(o[i] + start)
        if views:
            log = chunked_logged_run(backend, views, None if h is None else h_views, offs, program, n_apply,
                                     chunk or LOG_CHUNK)
            entries += log._entries  # type: ignore[attr-defined]
    return entries


class KernelLog(abc.ABC):
    """The undo log of a logged program: the elements that the simulated rounds do not bring back to their bits,
    with their values from before the program. It refers to the tensors it was made on (kept alive by it), which
    must not move or be resized before :meth:`restore`."""

    @property
    @abc.abstractmethod
    def numel(self) -> int:
        """Number of logged elements."""

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Memory held by the log."""

    @abc.abstractmethod
    def restore(self) -> None:
        """Write the saved values into the tensors (after the real restore ran: the log is exact only then)."""

    @abc.abstractmethod
    def advance(self, program: Program) -> None:
        """The saved values become what ``program`` makes of them, with H read from the tensors (not written): call
        it before a dense pass that runs ``program`` after the restore rounds, then :meth:`restore` after it, and the
        logged elements end where the program takes their exact original values (the fused restore + update)."""

    def tensors(self) -> list[torch.Tensor]:
        """The tensors (or views of them) whose elements the log holds."""
        raise NotImplementedError

    def finish(self, bound, program: Program, n_chain: int) -> None:
        """Run ``program`` on ``bound`` (a :class:`~hiso_kernels.BoundParams` over the logged tensors; one dense
        pass) where its rounds ``[0, n_chain)`` finish the logged chain and the others are an update: the tensors
        end, bit for bit, as if the chain had been undone exactly and the update then applied (the fused restore +
        update). The log is used up.

        This default advances the saved values through the update rounds (a sparse fix-up that regenerates each
        logged element's directions), runs the pass and writes the saved values back; the C++ log overrides it and
        puts the saved values in inside the pass, before round ``n_chain``, where the directions are at hand.
        ``n_chain`` is checked by :meth:`~hiso_kernels.BoundParams.finish_logged`, the entry point."""
        if not all(any(_inside(t, p) for p in bound.params) for t in self.tensors()):
            raise ValueError("the log was made on other tensors than the binding's")
        if n_chain < program.n_rounds:
            self.advance(sub_program(program, n_chain, program.n_rounds))
        bound.apply(program)
        self.restore()


def _inside(view: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``view``'s first element lies in ``tensor``'s memory."""
    start = tensor.data_ptr()
    return view.device == tensor.device and start <= view.data_ptr() < start + tensor.numel() * tensor.element_size()


class LaunchPlan:
    """Tensor slots and chunk table for one dtype group: the multi-tensor form the fused kernels consume.

    slots: int64 [n, 4] = (x address, H address or 0, numel, global offset of element 0)
    chunks: int64 [m, 2] = (slot index, first global group); a chunk covers ``groups_per_chunk`` groups of 4 elements
    or up to the end of its tensor.
    """

    __slots__ = ("chunks", "dtype", "groups_per_chunk", "n_chunks", "slots")

    def __init__(self, params, hessian, offsets, groups_per_chunk: int):
        n = len(params)
        slots = np.zeros((n, 4), dtype=np.int64)
        chunk_slot = []
        chunk_first = []
        for i, x in enumerate(params):
            numel = x.numel()
            off = offsets[i]
            slots[i] = (x.data_ptr(), 0 if hessian is None else hessian[i].data_ptr(), numel, off)
            g_first = off >> 2
            g_last = (off + numel - 1) >> 2
            firsts = np.arange(g_first, g_last + 1, groups_per_chunk, dtype=np.int64)
            chunk_first.append(firsts)
            chunk_slot.append(np.full(firsts.shape, i, dtype=np.int64))
        chunks = np.stack([np.concatenate(chunk_slot), np.concatenate(chunk_first)], axis=1)
        self.slots = torch.from_numpy(slots)
        self.chunks = torch.from_numpy(np.ascontiguousarray(chunks))
        self.n_chunks = int(chunks.shape[0])
        self.groups_per_chunk = groups_per_chunk
        self.dtype = params[0].dtype


class PlanCache:
    """Small LRU of launch plans keyed by the tensors' addresses, sizes and offsets (training calls repeat them)."""

    def __init__(self, capacity: int = 16):
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def get(self, params, hessian, offsets, groups_per_chunk: int, device: torch.device) -> LaunchPlan:
        key = (
            device,
            groups_per_chunk,
            tuple((x.data_ptr(), x.numel(), x.dtype) for x in params),
            None if hessian is None else tuple(h.data_ptr() for h in hessian),
            tuple(offsets),
        )
        with self._lock:
            plan = self._data.get(key)
            if plan is not None:
                self._data.move_to_end(key)
                return plan
        plan = LaunchPlan(params, hessian, offsets, groups_per_chunk)
        if device.type != "cpu":  # from pinned memory: the copy is asynchronous (and made once per plan)
            plan.slots = plan.slots.pin_memory().to(device, non_blocking=True)
            plan.chunks = plan.chunks.pin_memory().to(device, non_blocking=True)
        with self._lock:
            self._data[key] = plan
            while len(self._data) > self._capacity:
                self._data.popitem(last=False)
        return plan


def group_by_dtype(params, hessian, offsets):
    """Split a validated tensor list into per-dtype lists (kernels are specialised on the storage dtype)."""
    return {dtype: group for (dtype, _), group in group_for_launch(params, hessian, offsets).items()}


def vector_aligned(x: torch.Tensor, h: torch.Tensor | None, offset: int) -> bool:
    """Whole, aligned groups of four: global offset and size multiples of 4, x on a 4-element boundary in bytes and H
    on 16 bytes. Such a tensor can move as one vector access per group (the Triton backend's ALIGNED variant)."""
    return (offset % 4 == 0 and x.numel() % 4 == 0 and x.data_ptr() % (4 * x.element_size()) == 0
            and (h is None or h.data_ptr() % 16 == 0))


def group_for_launch(params, hessian, offsets, *, split_aligned: bool = False):
    """Split a validated tensor list into one list per launch: by storage dtype, and by :func:`vector_aligned` when
    ``split_aligned``. Returns {(dtype, aligned): (params, hessian or None, offsets)} in first-seen order."""
    groups: dict[tuple, tuple[list, list | None, list]] = {}
    for i, x in enumerate(params):
        h_i = None if hessian is None else hessian[i]
        aligned = split_aligned and vector_aligned(x, h_i, offsets[i])
        p, h, o = groups.setdefault((x.dtype, aligned), ([], None if hessian is None else [], []))
        p.append(x)
        if h is not None:
            h.append(h_i)
        o.append(offsets[i])
    return groups


def native_program_args(plan: LaunchPlan, program: Program, has_h: bool) -> dict:
    """Keyword arguments of ``_cpu.run`` / ``_cuda.run`` (both take keywords only) for one launch plan. ``program``
    must be on the plan's device. The codes are the tables in ``_codes.py`` and ``spec.py``."""
    return dict(
        slots=plan.slots.data_ptr(), chunks=plan.chunks.data_ptr(), n_chunks=plan.n_chunks,
        groups_per_chunk=plan.groups_per_chunk, dtype=int(DTYPE_CODES[plan.dtype]), has_h=has_h,
        rule=int(program.rule), distribution=int(program.distribution), seeds=program.seeds.data_ptr(),
        dirs=program.dirs.data_ptr(), coef_x=program.coef_x.data_ptr(), coef_h=program.coef_h.data_ptr(),
        round_start=program.round_start.data_ptr(), round_wd=program.round_wd.data_ptr(),
        round_rseed=program.round_rseed.data_ptr(), round_flags=program.round_flags.data_ptr(),
        n_rounds=program.n_rounds, beta=program.beta,
        one_minus_beta=program.one_minus_beta, h_min=program.h_min,
    )


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (a kernel goes to the current device, which may not be the tensors')."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def check_launch(device: torch.device, what: str) -> None:
    """With ``HISO_SYNC_LAUNCHES=1``: wait for the launch just made and raise its error here, naming the kernel."""
    if device.type != "cuda" or os.environ.get(ENV_SYNC_LAUNCHES, "0") in ("", "0"):
        return
    try:
        torch.cuda.synchronize(device)
    except RuntimeError as exc:  # an asynchronous error of this (or an earlier) launch
        raise RuntimeError(f"hiso_kernels: {what} on {device} failed: {exc}") from exc


def load_native(name: str, hint: str):
    """Import a compiled module of the package, or return (None, a reason a user can act on)."""
    import importlib

    full = f"hiso_kernels.{name}"
    try:
        return importlib.import_module(full), None
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None, f"{full} is not built ({hint})"
        return None, f"{full} failed to load: {exc}"
    except ImportError as exc:  # built but unloadable (missing shared library, ABI mismatch, ...)
        return None, f"{full} failed to load: {exc}"
