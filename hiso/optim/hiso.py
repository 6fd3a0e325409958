"""HiSo (Li et al., arXiv 2506.02370) as a ``torch.optim.Optimizer``: ZO steps along directions scaled by a curvature
estimate, with the curvature rules of :mod:`hiso.optim.curvature` (the authors' per-coordinate "gsq", its one-scalar
ablation "scalar", the per-coordinate and per-tensor Stein rules "stein" / "stein-tensor" (HiZOO, arXiv 2402.15173),
and "absdelta" / "absdelta-lagged", one global h from |second differences|). All of them are replayable from the
step records alone.
"""

from __future__ import annotations

import copy
import warnings

import hiso_kernels as hk

from . import curvature as curv
from . import history as hist
from .layout import ParamLayout
from .update import check_curvature_rule, needs_second_differences, step_round
from .zo import ZOOptimizer, _check_real


def _last_step(record):
    return record.seed, record.scalars, record.second_differences


class HiSo(ZOOptimizer):
    """HiSo: z_p = u_p / sqrt(H) with H from a curvature rule (``curvature_rule``, :mod:`hiso.optim.curvature`).

    ``curvature_rule="gsq"`` is the authors' rule, H <- beta H + (1 - beta) g_hat^2 with g_hat = (1/P) sum_p c_p z_p;
    ``"stein"`` uses second differences (one more loss per step), H <- beta H + (1 - beta) H (1/P) sum_p Delta_p
    (u_p^2 - 1); ``"scalar"`` is gsq with one global H; ``"stein-tensor"`` one H per tensor; ``"absdelta"`` one
    global h = EMA of 2 mean |Delta_p| / d that divides the step (directions unscaled), updated by the step's own
    Delta_p before the step divides by it ("curvature first"; ``"absdelta-lagged"``: after, as the other rules).
    H is floored at ``h_min``.
    ``beta`` and ``h_init`` ("ones" / "first-round") default to the rule's (``curvature.DEFAULT_BETA``,
    ``DEFAULT_H_INIT``). ``curvature=`` is the deprecated name of ``curvature_rule=``.
    """

    uses_hessian = True

    def __init__(self, params, lr: float = 1e-6, *, beta: float | None = None, h_min: float = 1e-8,
                 curvature_rule: str = "gsq", h_init: str | None = None, curvature: str | None = None, **kwargs):
        if curvature is not None:
            warnings.warn("HiSo(curvature=) is deprecated; use curvature_rule=", DeprecationWarning, stacklevel=2)
            curvature_rule = curvature
        check_curvature_rule(curvature_rule, kwargs.get("difference", "central"), h_init)
        if beta is None:
            beta = curv.DEFAULT_BETA[curvature_rule]
        _check_real("beta", beta, minimum=0.0)
        if beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        _check_real("h_min", h_min, minimum=0.0, strict=True)
        if curvature_rule == "stein-tensor" and kwargs.get("distribution", "gaussian") != "gaussian":
            raise ValueError("the 'stein-tensor' rule needs gaussian directions")
        super().__init__(params, lr, **kwargs)
        self.beta = float(beta)
        self.h_min = float(h_min)
        self.curvature_rule = curvature_rule
        self.h_init = curv.DEFAULT_H_INIT[curvature_rule] if h_init is None else h_init
        self.uses_hessian = curv.uses_tensor_h(curvature_rule)  # absdelta: no H tensor
        self._curvature: curv.CurvatureState | None = None

    @property
    def curvature(self) -> str:
        """Deprecated name of :attr:`curvature_rule`."""
        warnings.warn("HiSo.curvature is deprecated; use curvature_rule", DeprecationWarning, stacklevel=2)
        return self.curvature_rule

    def curvature_state(self, layout: ParamLayout | None = None) -> curv.CurvatureState:
        """The rule's Python state (global / per-tensor h, rounds seen), over the unsharded tensors in global order."""
        if self._curvature is None:
            layout = layout or self._layout()
            numels = [_prod(s) for s in layout.shapes]
            self._curvature = curv.CurvatureState(self.curvature_rule, numels, beta=self.beta, h_min=self.h_min,
                                                  h_init=self.h_init, distribution=self.distribution)
        return self._curvature

    def _needs_f0(self) -> bool:
        return self.difference == "forward" or needs_second_differences(self.curvature_rule)

    def _apply(self, records, layout: ParamLayout, hessian) -> None:
        """Apply records group by group and run by run; the curvature state decides each record's kernel rule and
        step divisor, and the H writes between records (:func:`hiso.optim.curvature.plan`)."""
        state = copy.deepcopy(self.curvature_state(layout))  # kept once every kernel call succeeded
        kw = self._kernel_kwargs()
        for seg in curv.plan(state, list(records), _last_step):
            for gi, runs in enumerate(layout.runs):
                if not runs:
                    continue
                rounds = [_planned_round(rec, gi, seg.kernel_rule, dv) for rec, dv in seg.items]
                for r in runs:
                    hk.replay_(layout.params[r.start:r.stop], rounds,
                               hessian=None if hessian is None else hessian[r.start:r.stop], offset=r.offset,
                               **dict(kw, curvature_rule=seg.kernel_rule))
            if seg.fill is not None and hessian is not None:
                curv.fill_hessian(hessian, seg.fill)
        self._curvature = state

    def _finish_step(self, pending, record, layout: ParamLayout, hessian) -> None:
        """The step's last restore fused with its update when the rule's plan for this record runs the kernel rule
        the step was bound with (then the H writes of the plan, if any, follow as in :meth:`_apply`); otherwise
        restore, then :meth:`_apply`. Bit for bit the same either way."""
        state = copy.deepcopy(self.curvature_state(layout))
        segments = curv.plan(state, [record], _last_step)
        seg = segments[0]
        if len(segments) != 1 or seg.kernel_rule != curv.kernel_rule_of(self.curvature_rule):
            pending.restore()
            self._apply([record], layout, hessian)
            return
        (rec, dv), = seg.items
        pending.finish([[_planned_round(rec, gi, seg.kernel_rule, dv)] for gi, runs in enumerate(layout.runs)
                        for _ in runs])
        if seg.fill is not None and hessian is not None:
            curv.fill_hessian(hessian, seg.fill)
        self._curvature = state

    def _kernel_kwargs(self) -> dict:
        return dict(super()._kernel_kwargs(), curvature_rule=curv.kernel_rule_of(self.curvature_rule),
                    beta=self.beta, h_min=self.h_min)

    def hyper(self) -> dict:
        return dict(super().hyper(), beta=self.beta, h_min=self.h_min, h_init=self.h_init)

    def state_dict(self):
        """The base state plus ``zo["curvature_state"]``: the rule's Python state (h values, rounds seen)."""
        sd = super().state_dict()
        sd["zo"]["curvature_state"] = self.curvature_state().to_dict()
        return sd

    def load_state_dict(self, state_dict):
        """Resume (see :meth:`ZOOptimizer.load_state_dict`), with the curvature state; ValueError, changing nothing,
        if that state belongs to another rule or model."""
        zo = state_dict.get("zo") if isinstance(state_dict, dict) else None
        saved = zo.get("curvature_state") if isinstance(zo, dict) else None
        fresh = None
        if saved is not None:
            hist.check_compatible(self.hyper(), zo.get("hyper", zo), "the checkpoint")  # type: ignore[union-attr]
            fresh = copy.deepcopy(self.curvature_state())
            fresh.rounds, fresh.h = 0, list(fresh.h)
            fresh.load_dict(saved)  # raises before anything changes
        super().load_state_dict(state_dict)
        if fresh is not None:
            self._curvature = fresh


def _planned_round(rec, group: int, kernel_rule: str, divisor):
    """A record's kernel round for one parameter group under the rule's plan (kernel rule and step divisor)."""
    second = None if rec.second_differences is None else [rec.second_differences]
    return step_round([rec.seed], [rec.scalars], lr=rec.lrs[group], weight_decay=rec.weight_decays[group],
                      curvature_rule=kernel_rule, divisor=divisor, second_differences=second)


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
