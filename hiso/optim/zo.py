"""Zeroth-order optimizers on the fused kernels: ZO-SGD (MeZO, DeComFL) and HiSo.

One step with seed s and P directions (MeZO, arXiv 2305.17333; DeComFL, arXiv 2405.15861; HiSo, arXiv 2506.02370):

    c_p = (f(x + mu z_p) - f(x - mu z_p)) / (2 mu)        central difference (MeZO's default), or
    c_p = (f(x + mu z_p) - f(x)) / mu                      forward difference (DeComFL's)
    x  <- x - lr (1/P) sum_p c_p z_p - lr wd x              z_p = u(s, p) / sqrt(H)   (H = 1 for ZO-SGD)
    H  <- max(beta H + (1 - beta) v, h_min)                 HiSo only, with the H of before the step in z_p

The scalars come from :func:`hiso.optim.estimate.estimate_scalars`, the update's coefficients from
:func:`hiso.optim.update.step_round` (the single source shared with the federated layer).

Every perturbation, restore and update is one fused pass over the trainable parameters; directions are never stored.
A step is fully described by its :class:`ZOStep` record (seed and scalars), so :meth:`ZOOptimizer.replay` brings a
replica with the same initial parameters to the same bits in one pass for any number of steps.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch

import hiso_kernels as hk
from hiso_kernels import spec

from . import history as hist
from .distributed import (
    AUTO,
    LossExchange,
    check_agreement,
    check_not_gathered,
    fsdp_modules_of,
    resolve_group,
    weights_digest,
)
from .estimate import Closure, Pending, bind_runs, evaluate_step
from .exact_restore import DEFAULT_CHUNK
from .history import ZOStep
from .layout import DeviceKey, ParamLayout, build_layout, device_of, is_dtensor
from .update import step_round

__all__ = ["ZOSGD", "HiSo", "ZOOptimizer", "ZOStep"]


class ZOOptimizer(torch.optim.Optimizer):
    """Base class: the perturb / evaluate / restore cycle and the bookkeeping; subclasses choose the update.

    ``process_group`` ("auto": the default group when ``torch.distributed`` is initialised with several ranks;
    None: the default group; False: no communication; or a ``ProcessGroup``) makes a step data parallel: the
    ranks exchange their losses and apply the same update (:mod:`hiso.optim.distributed`). Parameters may be
    DTensors sharded by FSDP2 and may lie on several devices (:mod:`hiso.optim.layout`).
    """

    uses_hessian = False
    mu: float
    num_directions: int
    difference: str
    distribution: str
    stochastic_rounding: bool
    base_seed: int
    steps_taken: int
    exact_restore: bool | None
    restore_chunk: int
    record_history: bool
    backend: str | None
    allow_noop_step: bool
    process_group: Any
    last_undo_elements: int
    last_exchange_bytes: int
    last_exchange_seconds: float
    _checked_group: Any
    _fsdp_modules: list[Any] | None
    _checked_fsdp: bool

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-6,
        *,
        mu: float = 1e-3,
        num_directions: int = 1,
        difference: str = "central",
        distribution: str = "gaussian",
        weight_decay: float = 0.0,
        stochastic_rounding: bool = False,
        seed: int = 0,
        exact_restore: bool | None = None,
        restore_chunk: int = DEFAULT_CHUNK,
        record_history: bool = True,
        backend: str | None = None,
        process_group=AUTO,
    ):
        _check_real("lr", lr, minimum=0.0)
        _check_real("weight_decay", weight_decay, minimum=0.0)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        _check_real("mu", mu, minimum=0.0, strict=True)
        if isinstance(num_directions, bool) or not isinstance(num_directions, numbers.Integral) or num_directions < 1:
            raise ValueError(f"num_directions must be a positive integer, got {num_directions!r}")
        if difference not in ("central", "forward"):
            raise ValueError(f"difference must be 'central' or 'forward', got {difference!r}")
        hk.Distribution.parse(distribution)
        if not isinstance(seed, numbers.Integral) or not 0 <= seed <= spec.SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        if not isinstance(restore_chunk, numbers.Integral) or restore_chunk < 1:
            raise ValueError("restore_chunk must be a positive integer")
        if not (process_group is None or process_group is False or process_group == AUTO
                or (torch.distributed.is_available() and isinstance(process_group, torch.distributed.ProcessGroup))):
            raise TypeError(f"process_group must be 'auto', None, False or a ProcessGroup, got {process_group!r}")
        self.mu = float(mu)
        self.num_directions = int(num_directions)
        self.difference = difference
        self.distribution = distribution
        self.stochastic_rounding = bool(stochastic_rounding)
        self.base_seed = int(seed)
        self.steps_taken = 0
        self.exact_restore = exact_restore
        self.restore_chunk = int(restore_chunk)
        self.record_history = record_history
        self.backend = backend
        self.process_group = process_group
        self.history: list[ZOStep] = []
        self.last_undo_elements = 0  # elements the last step's exact restore had to write back
        self.last_exchange_bytes = 0  # bytes this rank sent in the last step's loss exchange (0: one process)
        self.last_exchange_seconds = 0.0  # and the wall time of that exchange
        # how parameters are grouped into kernel launches (one per device); replaceable, e.g. by tests
        self.device_of: DeviceKey = device_of
        self._checked_group = None  # the process group whose ranks were checked to agree (once)
        self._fsdp_modules = None
        self._checked_fsdp = False  # checked once that no parameter is an FSDP2 gathered copy
        self._layout_cache: tuple | None = None  # (key, layout): the layout of an unchanged parameter list
        self._bounds_cache: tuple | None = None  # (key, bound runs): their validation, done once
        # Trainers that call step() without a closure after having stepped through their own hook (the Hugging
        # Face integration) set this; otherwise a closure-less step is an error.
        self.allow_noop_step = False

    # ------------------------------------------------------------------ layout
    def _layout(self) -> ParamLayout:
        """Trainable parameters in global order (group by group): local tensors, global offsets, kernel runs. Kept
        while the parameter list is unchanged (the same tensors, unmoved, with the same ``requires_grad``); rebuilt
        on every call for sharded parameters (a DTensor's local shard is looked up each time)."""
        cache = self._layout_cache
        if cache is not None and cache[0] is not None and cache[0] == self._layout_key():
            return cache[1]
        layout = build_layout(self.param_groups, self.device_of)
        self._layout_cache = (None if layout.sharded else self._layout_key(), layout)
        return layout

    def _layout_key(self) -> tuple:
        return (self.device_of, tuple(tuple((id(p), p.requires_grad, p.data_ptr(), p.shape, p.dtype, p.device)
                                            for p in g["params"]) for g in self.param_groups))

    def _bounds(self, layout: ParamLayout, hessian) -> list[hk.BoundParams]:
        """The kernel runs of a layout, validated once (:func:`hiso_kernels.bind`) and kept while the layout, H's
        tensors and the kernel settings stay the same."""
        kw = self._kernel_kwargs()
        kw.pop("check_hessian")
        key = (id(layout), tuple(sorted(kw.items())),
               None if hessian is None else tuple(h.data_ptr() for h in hessian))
        cache = self._bounds_cache
        if cache is not None and cache[0] == key and cache[1] is layout:
            return cache[2]
        bounds = bind_runs(layout.params, hessian, layout.all_runs(), **kw)
        self._bounds_cache = (key, layout, bounds)
        return bounds

    @property
    def restore_path(self) -> str:
        """How exact restore runs on this optimizer's backend(s): in the kernel, or the fallback on scratch copies."""
        layout = self._layout()
        out = []
        for b in self._bounds(layout, self._hessians(layout)):
            in_kernel, how = b.log_support
            line = f"{b.backend.name}: " + ("in the kernel" if in_kernel else "fallback") + f" ({how})"
            if line not in out:
                out.append(line)
        return "; ".join(out)

    def _hessians(self, layout: ParamLayout) -> list[torch.Tensor] | None:
        if not self.uses_hessian:
            return None
        out = []
        for src, local in zip(layout.sources, layout.params):
            state = self.state[src]
            if "hessian" not in state:
                state["hessian"] = torch.ones(local.shape, dtype=torch.float32, device=local.device)
            out.append(state["hessian"])
        return out

    def _use_exact_restore(self, params) -> bool:
        if self.exact_restore is None:
            return all(p.dtype == torch.float32 for p in params)
        return bool(self.exact_restore)

    def next_seed(self) -> int:
        """The seed the next step draws when none is given (derived from the base seed and the step count)."""
        return spec.derive_seed(self.base_seed, self.steps_taken)

    def hyper(self) -> dict:
        """The settings that define the update (a checkpoint or history must have been made with the same)."""
        return dict(mu=self.mu, num_directions=self.num_directions, difference=self.difference,
                    distribution=self.distribution, stochastic_rounding=self.stochastic_rounding,
                    curvature_rule=self.curvature_rule)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, seed: int | None = None):
        """One ZO step. ``closure()`` must return the loss (a finite scalar, or a list of micro-batch losses whose
        mean is the step's loss) and must not call backward. Returns the loss at x (forward difference) or the mean
        of the two perturbed losses (central), combined over the ranks when data parallel."""
        if closure is None:
            if self.allow_noop_step:
                return None
            raise ValueError("zeroth-order optimizers need a closure that returns the loss")
        if seed is None:
            seed = self.next_seed()
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= spec.SEED_MAX:
            raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")
        layout = self._layout()
        hessian = self._hessians(layout)
        group = resolve_group(self.process_group)
        if not self._checked_fsdp:
            check_not_gathered(layout.sources)
            self._checked_fsdp = True
        if layout.sharded:
            closure = self._resharding(closure, layout)
        exchange = None
        if group is not None:
            if self._checked_group is not group:
                self._check_ranks(group, layout, hessian, int(seed))
                self._checked_group = group
            exchange = LossExchange(group, int(seed), self.steps_taken)
        bounds = self._bounds(layout, hessian)
        (scalars, second, loss), pending = self._estimate(closure, layout, hessian, int(seed), exchange, bounds)
        try:
            self.last_exchange_bytes = 0 if exchange is None else exchange.bytes_sent
            self.last_exchange_seconds = 0.0 if exchange is None else exchange.seconds
            record = ZOStep(
                seed=int(seed),
                scalars=tuple(scalars),
                second_differences=None if second is None else tuple(second),
                lrs=tuple(float(g["lr"]) for g in self.param_groups),
                weight_decays=tuple(float(g["weight_decay"]) for g in self.param_groups),
            )
            self._finish_step(pending, record, layout, hessian)
        finally:
            pending.restore()  # a no-op after finish; otherwise x comes back and nothing is updated
        if self.record_history:
            self.history.append(record)
        self.steps_taken += 1
        return loss

    def _finish_step(self, pending: Pending, record: ZOStep, layout: ParamLayout, hessian) -> None:
        """The last restore and the update in one pass per run (bit for bit: restore, then ``_apply([record])``)."""
        pending.finish([[self._round(record, gi)] for gi, runs in enumerate(layout.runs) for _ in runs])

    def _needs_f0(self) -> bool:
        return self.difference == "forward"

    def _estimate(self, closure, layout: ParamLayout, hessian, seed, exchange,
                  bounds: Sequence[hk.BoundParams]) -> tuple[tuple, Pending]:
        """The step's scalars, second differences and loss, with the last direction's perturbation pending."""
        est, pending = evaluate_step(
            closure, bounds, seed, mu=self.mu, num_directions=self.num_directions, difference=self.difference,
            with_f0=self._needs_f0(), exact_restore=self._use_exact_restore(layout.params),
            restore_chunk=self.restore_chunk, exchange=exchange,
        )
        self.last_undo_elements = est.undo_elements
        return (est.scalars, est.second_differences, est.loss), pending

    # ------------------------------------------------------------------ processes and shards
    def _check_ranks(self, group, layout: ParamLayout, hessian, seed: int) -> None:
        """Once per process group: every rank has the same settings, layout, seed stream and replicated weights."""
        replicated = [p for src, p in zip(layout.sources, layout.params) if not is_dtensor(src)]
        replicated += [h for src, h in zip(layout.sources, hessian or []) if not is_dtensor(src)]
        check_agreement(group, {
            "hyper-parameters": (type(self).__name__, sorted(self.hyper().items()),
                                 [(g["lr"], g["weight_decay"]) for g in self.param_groups]),
            "parameter layout": (layout.shapes, [[str(p.dtype) for p in g["params"] if p.requires_grad]
                                                 for g in self.param_groups]),
            "seed stream": (self.base_seed, self.steps_taken, seed),
            "initial weights": weights_digest(replicated),
        })

    def set_fsdp_modules(self, modules: Iterable[torch.nn.Module]) -> None:
        """The FSDP2 modules to reshard after every evaluation of the closure (found automatically otherwise)."""
        from torch.distributed.fsdp import FSDPModule

        self._fsdp_modules = [m for m in modules if isinstance(m, FSDPModule)]

    def _resharding(self, closure, layout: ParamLayout):
        """Wrap the closure so that every FSDP2 module owning these shards gives up its gathered parameters after
        the forward: the root module keeps them by default, and the next forward would not see the shards' next
        perturbation. Also reshard now, in case a forward ran since the last step (an evaluation)."""
        if self._fsdp_modules is None:
            self._fsdp_modules = fsdp_modules_of(layout.sources)
        modules = self._fsdp_modules
        for m in modules:
            m.reshard()

        def wrapped():
            try:
                return closure()
            finally:
                for m in modules:
                    m.reshard()
        return wrapped

    # ------------------------------------------------------------------ the update
    #: the kernel's curvature rule of this optimizer's update ("none": no H update)
    curvature_rule = "none"

    def _round(self, record: ZOStep, group: int) -> hk.Round:
        """The kernel round of a record for one parameter group (:func:`~hiso.optim.update.step_round`)."""
        second = None if record.second_differences is None else [record.second_differences]
        return step_round([record.seed], [record.scalars], lr=record.lrs[group],
                          weight_decay=record.weight_decays[group], curvature_rule=self.curvature_rule,
                          second_differences=second)

    def _apply(self, records: Sequence[ZOStep], layout: ParamLayout, hessian) -> None:
        """Apply the records' rounds group by group, one kernel call per run (device and consecutive range)."""
        for gi, runs in enumerate(layout.runs):
            if not runs:
                continue
            rounds = [self._round(rec, gi) for rec in records]
            for r in runs:
                hk.replay_(layout.params[r.start:r.stop], rounds,
                           hessian=None if hessian is None else hessian[r.start:r.stop], offset=r.offset,
                           **self._kernel_kwargs())

    def _kernel_kwargs(self) -> dict:
        return dict(curvature_rule=self.curvature_rule, distribution=self.distribution,
                    stochastic_rounding=self.stochastic_rounding, backend=self.backend, check_hessian=False)

    @torch.no_grad()
    def replay(self, history: Sequence[ZOStep]) -> None:
        """Apply recorded steps to this optimizer's parameters (a replica with the same initial values and the
        same parameter layout) in one fused pass per parameter group. Bit-identical to having taken the steps."""
        history = list(history)
        if not history:
            return
        for rec in history:
            if not isinstance(rec, ZOStep):
                raise TypeError(f"history entries must be ZOStep records, got {type(rec).__name__}")
            if len(rec.lrs) != len(self.param_groups):
                raise ValueError(f"a record has {len(rec.lrs)} parameter groups, "
                                 f"this optimizer {len(self.param_groups)}")
        layout = self._layout()
        self._apply(history, layout, self._hessians(layout))
        if self.record_history:
            self.history.extend(history)
        self.steps_taken += len(history)

    # ------------------------------------------------------------------ state
    @property
    def history_start(self) -> int:
        """The number of steps taken before the first one in :attr:`history` (0 when the history is complete)."""
        return self.steps_taken - len(self.history)

    def _meta(self) -> dict:
        layout = self._layout()
        return dict(method=type(self).__name__, hyper=self.hyper(), numel=layout.numel,
                    num_tensors=len(layout.shapes), history_start=self.history_start)

    def state_dict(self):
        """torch's state (per-parameter H for HiSo, parameter groups) plus ``"zo"``: the format version, the method
        and hyper-parameters, the seed stream, and the step history in the column encoding of
        :mod:`hiso.optim.history` (tensors, so the checkpoint loads with ``torch.load(weights_only=True)``)."""
        sd = super().state_dict()
        sd["zo"] = dict(version=hist.VERSION, base_seed=self.base_seed, steps_taken=self.steps_taken,
                        history=hist.encode(self.history), **self._meta())
        return sd

    def load_state_dict(self, state_dict):
        """Resume from :meth:`state_dict`. Raises ValueError, changing nothing, if the checkpoint was made by another
        method, with other hyper-parameters (mu, P, difference, distribution, curvature rule, ...) or for another
        number of trainable elements. Checkpoints of hiso 0.1 (no history) load with a warning."""
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if not isinstance(zo, dict):
            raise ValueError("not the state of a hiso ZO optimizer (no 'zo' entry)")
        version = int(zo.get("version", 1))
        if version > hist.VERSION:
            raise ValueError(f"the checkpoint has optimizer state version {version}; this hiso reads up to "
                             f"{hist.VERSION}")
        mine = self._meta()
        if zo.get("method", mine["method"]) != mine["method"]:
            raise ValueError(f"the checkpoint is a {zo['method']} optimizer's, this is a {mine['method']}")
        hist.check_compatible(mine["hyper"], zo.get("hyper", zo), "the checkpoint")
        for key in ("numel", "num_tensors"):
            if key in zo and int(zo[key]) != mine[key]:
                raise ValueError(f"the checkpoint has {zo[key]} trainable {'elements' if key == 'numel' else 'tensors'}"
                                 f", this optimizer {mine[key]}")
        records = hist.decode(zo["history"]) if "history" in zo else []
        if len(records) > int(zo["steps_taken"]):
            raise ValueError("the checkpoint's history is longer than its step count")
        hessians = hist.take_hessians(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        for p, h in hessians:
            self.state[p]["hessian"] = h
        if version < 2:
            warnings.warn("this optimizer checkpoint predates hiso 0.2 and has no step history: replay(history) "
                          "will cover only the steps taken after the resume", stacklevel=2)
        self.base_seed = int(zo["base_seed"])
        self.steps_taken = int(zo["steps_taken"])
        self.history = records if self.record_history else []

    def save_history(self, path: str | os.PathLike) -> None:
        """Write :attr:`history` with the method and hyper-parameters: JSON for a ``.json`` path, else
        ``torch.save`` (``torch.load(path, weights_only=True)`` reads it). See :mod:`hiso.optim.history`."""
        hist.save(path, self.history, self._meta())

    def load_history(self, path: str | os.PathLike) -> list[ZOStep]:
        """Read a history file (either format) written for an optimizer like this one, for :meth:`replay`.
        Raises ValueError if it was made by another method or with other hyper-parameters."""
        records, meta = hist.read(path)
        mine = self._meta()
        if meta.get("method") != mine["method"]:
            raise ValueError(f"{os.fspath(path)} holds a {meta.get('method')} history, this is a {mine['method']}")
        hist.check_compatible(mine["hyper"], meta.get("hyper", {}), os.fspath(path))
        if "numel" in meta and int(meta["numel"]) != mine["numel"]:
            raise ValueError(f"{os.fspath(path)} was written for {meta['numel']} trainable elements, this optimizer "
                             f"has {mine['numel']}")
        return records


class ZOSGD(ZOOptimizer):
    """ZO-SGD: MeZO (Malladi et al. 2023) / DeComFL (Li et al. 2024) step, x <- x - lr (1/P) sum_p c_p u_p - lr wd x.

    Example::

        opt = ZOSGD(model.parameters(), lr=1e-6, mu=1e-3, num_directions=1)
        for batch in data:
            loss = opt.step(lambda: loss_fn(model, batch))
    """


# ---------------------------------------------------------------------- helpers
def _check_real(name, value, minimum=None, strict=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    if minimum is not None and (value < minimum or (strict and value <= minimum)):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")


from .hiso import HiSo  # noqa: E402  (HiSo and its curvature rules live in hiso.py; importable from here)
