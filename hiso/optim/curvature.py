"""HiSo's curvature rules, and the part of their state that is a few Python floats (issue 15, ``docs/curvature.md``).

Every rule is scalar-only: a replica derives it from the seeds and the aggregated scalars of the log, nothing else.
With c_p the directional scalars and Delta_p = (f(x + mu z_p) + f(x - mu z_p) - 2 f(x)) / (2 mu^2) the second
differences of a round's last local step (both aggregated), d the number of trainable elements:

    "gsq"           per coordinate, the authors' rule (HiSo, arXiv 2506.02370): H <- beta H + (1 - beta) g_hat^2,
                    g_hat = (1/P) sum_p c_p u_p / sqrt(H)                                       (in the kernels)
    "stein"         per coordinate, Stein's identity on second differences (HiZOO, arXiv 2402.15173, made
                    scalar-only): H <- beta H + (1 - beta) H (1/P) sum_p Delta_p (u_p^2 - 1)     (in the kernels)
    "scalar"        the ablation of "gsq": one global H for every coordinate, the same update. H is updated with the
                    expectation over the directions of mean_j g_hat_j^2, which is sum_p (c_p / P)^2 / H (exact up to
                    the relative noise sqrt(2/d) of ||u||^2 / d)
    "stein-tensor"  one h_t per tensor t: the Stein estimate averaged over the tensor's n_t coordinates,
                    v_t = (1/P) sum_p Delta_p (||u_p,t||^2 - n_t) / (n_t s_t^2),  s_t^2 = hbar / h_t,
                    whose relative noise falls like sqrt(2 / n_t); h_t <- max(beta h_t + (1 - beta) v_t, 0.1 hbar,
                    h_min), hbar = sum_t n_t h_t / d. Directions are scaled per tensor, z_p,t = s_t u_p,t (H filled
                    with h_t / hbar), and the step is divided by hbar
    "absdelta"      one global h from the mean |second difference| (HiZOO's |Delta| estimator made one scalar):
                    h <- max(beta h + (1 - beta) 2 mean_p |Delta_p| / d, h_min); directions are u_p and the step is
                    divided by h: x <- x - lr / (P h) sum_p c_p u_p. On a quadratic E[Delta_p] = tr(A) / 2 with
                    u ~ N(0, I), so 2 Delta / d estimates the mean curvature tr(A) / d; the absolute value keeps it
                    positive where the Hessian is indefinite (at initialisation). A magnitude, not a diagonal.
                    Curvature first: the probes do not depend on h, so a round's own Delta_p update h *before* its
                    step divides by it (the step of round t uses rounds <= t). The first step is then lr c / h_0
                    instead of lr c (h = 1), which on a network is 10^2-10^5 times too small and on a stiff problem
                    too large (docs/curvature.md, sections 3 and 8)
    "absdelta-lagged" the same h, updated *after* the step (round t divides by the h of rounds < t), as every
                    other rule must since their probes depend on H: the order of hiso before curvature first, kept
                    for the results measured with it and as the ablation of the order

``h_init``: "ones" (H = 1 before the first round, the authors' choice) or "first-round": the first round's step uses
H = 1 and then H is *set* (not averaged) to the round's own level, sum_p (c_p / P)^2 for gsq / scalar and
2 mean_p |Delta_p| / d for the second-difference rules (floored at h_min). The absdelta rules and "stein-tensor"
default to "first-round" (the setting of the Fashion-MNIST study), the others to "ones". With curvature first
("absdelta"), "first-round" sets h from round 0 before round 0's step.

Determinism: the state is Python floats updated in a fixed order from the log's fp32 scalars; stein-tensor's
||u_p,t||^2 is summed exactly (each u^2 quantised to 2^-32 as an integer, so the sum does not depend on the order,
thread count or device), so every replica on any backend computes the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

import hiso_kernels as hk

#: rules whose H lives in the kernels (a per-coordinate fp32 tensor updated by the fused pass)
KERNEL_RULES = ("gsq", "stein")
#: rules whose state is Python floats (one global h, or one h per tensor)
SCALAR_STATE_RULES = ("scalar", "absdelta", "absdelta-lagged", "stein-tensor")
CURVATURE_RULES = (*KERNEL_RULES, *SCALAR_STATE_RULES)
SECOND_DIFFERENCE_RULES = ("stein", "stein-tensor", "absdelta", "absdelta-lagged")
#: rules with one global h that divides the step (no H tensor; directions unscaled)
STEP_DIVISOR_RULES = ("absdelta", "absdelta-lagged")
#: rules whose round updates h from its own second differences before its step: their probes do not depend on h
CURVATURE_FIRST_RULES = ("absdelta",)
H_INITS = ("ones", "first-round")
#: the EMA factor of each rule when none is given (absdelta / stein-tensor: the Fashion-MNIST study's settings)
DEFAULT_BETA = {"gsq": 0.95, "stein": 0.95, "scalar": 0.95, "stein-tensor": 0.99, "absdelta": 0.9,
                "absdelta-lagged": 0.9}
DEFAULT_H_INIT = {"gsq": "ones", "stein": "ones", "scalar": "ones", "stein-tensor": "first-round",
                  "absdelta": "first-round", "absdelta-lagged": "first-round"}
_QUANT = 2 ** 32  # stein-tensor: u^2 in units of 2^-32 (exact in float64 and int64 for |u| < 2^15)
_CHUNK = 1 << 22  # stein-tensor: elements per regenerated block of a direction


def check_rule(rule: str, difference: str = "central", h_init: str | None = None) -> str:
    """Validate a rule name, that it fits the difference scheme, and the ``h_init`` value (None: the rule's)."""
    if rule not in CURVATURE_RULES:
        raise ValueError(f"curvature_rule must be one of {CURVATURE_RULES}, got {rule!r}")
    if rule in SECOND_DIFFERENCE_RULES and difference != "central":
        raise ValueError(f"the {rule!r} curvature rule needs central differences (it uses second differences)")
    if h_init is not None and h_init not in H_INITS:
        raise ValueError(f"h_init must be one of {H_INITS}, got {h_init!r}")
    return rule


def kernel_rule_of(rule: str) -> str:
    """The kernels' rule of a round: "gsq" / "stein" for the kernel rules, "none" for the scalar-state rules (their
    H, if any, is written between rounds and only read by the kernels)."""
    return rule if rule in KERNEL_RULES else "none"


def uses_tensor_h(rule: str) -> bool:
    """Whether the rule scales directions by a per-coordinate H tensor (the absdelta rules do not: they divide the
    step)."""
    return rule not in STEP_DIVISOR_RULES


class CurvatureState:
    """The Python side of a rule over a model with tensors of ``numels`` elements (global order): the global h
    (scalar, absdelta) or the per-tensor h_t (stein-tensor), and the number of rounds seen. For the kernel rules it
    only tracks the round count (for ``h_init="first-round"``)."""

    def __init__(self, rule: str, numels: Sequence[int], *, beta: float | None = None, h_min: float = 1e-8,
                 h_init: str | None = None, distribution: str = "gaussian"):
        check_rule(rule, h_init=h_init)
        if rule == "stein-tensor" and distribution != "gaussian":
            raise ValueError("the 'stein-tensor' rule needs gaussian directions (u^2 - 1 is zero for rademacher)")
        self.rule = rule
        self.beta = DEFAULT_BETA[rule] if beta is None else float(beta)
        self.h_min = float(h_min)
        self.h_init = DEFAULT_H_INIT[rule] if h_init is None else h_init
        self.distribution = distribution
        self.numels = [int(n) for n in numels]
        self.offsets = [sum(self.numels[:i]) for i in range(len(self.numels))]
        self.d = sum(self.numels)
        self.rounds = 0
        # stein-tensor: one h per tensor; scalar, absdelta: one global h; kernel rules: none (H is in the kernels)
        self.h = [1.0] * (len(self.numels) if rule == "stein-tensor" else 1 if rule in SCALAR_STATE_RULES else 0)

    # ---------------------------------------------------------------- what a round uses
    def divisor(self) -> float:
        """The step's divisor: h (absdelta rules), hbar (stein-tensor), else 1."""
        if self.rule in STEP_DIVISOR_RULES:
            return self.h[0]
        if self.rule == "stein-tensor":
            return self._hbar(self.h)
        return 1.0

    @property
    def curvature_first(self) -> bool:
        """Whether a round's own second differences update the state before its step (:data:`CURVATURE_FIRST_RULES`)."""
        return self.rule in CURVATURE_FIRST_RULES

    def step_divisor(self, seed: int, scalars: Sequence[float], second: Sequence[float] | None) -> float:
        """The divisor of a step that only this state sees: a client's local step at K > 1, on the client's copy of
        the state. With curvature first the step's own second differences update the copy first (the local steps
        follow the rule on the client's own scalars); otherwise the copy stays as it is and the divisor is the one of
        the rounds applied so far. The aggregated round then advances the shared state as on every replica."""
        if self.curvature_first:
            self.advance(seed, scalars, second)
        return self.divisor()

    def round_kernel_rule(self) -> str:
        """The kernel rule of the next round ("none" for a first round whose H is set afterwards)."""
        if self.rounds == 0 and self.h_init == "first-round":
            return "none"
        return kernel_rule_of(self.rule)

    def fill_values(self) -> list[float] | None:
        """Per-tensor values of the H tensor for the next round (scalar: h; stein-tensor: h_t / hbar), else None."""
        if self.rule == "scalar":
            return [self.h[0]] * len(self.numels)
        if self.rule == "stein-tensor":
            hbar = self._hbar(self.h)
            return [h / hbar for h in self.h]
        return None

    # ---------------------------------------------------------------- the update after a round
    def advance(self, seed: int, scalars: Sequence[float], second: Sequence[float] | None) -> list[float] | None:
        """Update the state from a round's last local step (seed, aggregated c_p and Delta_p). Returns the values
        to write into the H tensors now (per tensor), or None when H needs no write."""
        p_dirs = len(scalars)
        first = self.rounds == 0 and self.h_init == "first-round"
        self.rounds += 1
        if self.rule in SECOND_DIFFERENCE_RULES and second is None:
            raise ValueError(f"the {self.rule!r} rule needs the second differences of the round")
        if first:
            level = self._first_level(scalars, second, p_dirs)
            if self.rule == "stein-tensor":
                self.h = [level] * len(self.numels)
            elif self.rule in SCALAR_STATE_RULES:
                self.h = [level]
            else:
                return [level] * len(self.numels)  # a kernel rule: H set once, then the kernels update it
            return self.fill_values()
        beta = self.beta
        if self.rule == "scalar":
            h = self.h[0]
            v = math.fsum((c / p_dirs) ** 2 for c in scalars) / h
            self.h = [max(beta * h + (1 - beta) * v, self.h_min)]
        elif self.rule in STEP_DIVISOR_RULES:
            v = 2 * math.fsum(abs(x) for x in second) / (p_dirs * self.d)  # type: ignore[union-attr]
            self.h = [max(beta * self.h[0] + (1 - beta) * v, self.h_min)]
        elif self.rule == "stein-tensor":
            hbar = self._hbar(self.h)
            new = []
            for i, (n, h) in enumerate(zip(self.numels, self.h)):
                s2 = hbar / h
                v = math.fsum(delta * self._energy_excess(seed, p, i) / (n * s2)
                              for p, delta in enumerate(second)) / p_dirs  # type: ignore[arg-type]
                new.append(beta * h + (1 - beta) * v)
            hbar = self._hbar(new)
            self.h = [max(h, 0.1 * hbar, self.h_min) for h in new]
        return self.fill_values()

    def _first_level(self, scalars, second, p_dirs) -> float:
        if self.rule in SECOND_DIFFERENCE_RULES:
            level = 2 * math.fsum(abs(x) for x in second) / (p_dirs * self.d)
        else:
            level = math.fsum((c / p_dirs) ** 2 for c in scalars)
        return max(level, self.h_min)

    def _hbar(self, hs: Sequence[float]) -> float:
        return math.fsum(n * h for n, h in zip(self.numels, hs)) / self.d

    def _energy_excess(self, seed: int, p: int, i: int) -> float:
        """||u_p,t||^2 - n_t for tensor i, summed exactly (see module doc)."""
        n, off = self.numels[i], self.offsets[i]
        total = 0
        for start in range(0, n, _CHUNK):
            m = min(_CHUNK, n - start)
            u = hk.directions(seed, m, direction=p, offset=off + start, distribution=self.distribution).double()
            total += int(torch.floor(u * u * _QUANT).to(torch.int64).sum())
        return (total - n * _QUANT) / _QUANT

    # ---------------------------------------------------------------- checkpoints
    def to_dict(self) -> dict:
        return dict(rule=self.rule, rounds=self.rounds, h=list(self.h))

    def load_dict(self, state: dict) -> None:
        """Restore :meth:`to_dict`; ValueError (state unchanged) if it belongs to another rule or model."""
        if state.get("rule") != self.rule or len(state.get("h", ())) != len(self.h):
            raise ValueError(f"the saved curvature state is for rule {state.get('rule')!r} with "
                             f"{len(state.get('h', ()))} values, this is {self.rule!r} with {len(self.h)}")
        h = [float(x) for x in state["h"]]
        if not all(math.isfinite(x) and x > 0 for x in h):
            raise ValueError("the saved curvature state has a non-finite or non-positive h")
        self.rounds, self.h = int(state["rounds"]), h


def fill_hessian(hessian: Sequence[torch.Tensor], values: Sequence[float]) -> None:
    """Write one value per tensor into the H tensors (fp32, the same bits on every device)."""
    for h, v in zip(hessian, values, strict=True):
        h.fill_(v)


class Segment:
    """Consecutive records that one kernel call applies (same kernel rule, no H write between them), the divisor
    of each, and the H values to write after them (or None)."""

    def __init__(self, kernel_rule: str):
        self.kernel_rule = kernel_rule
        self.items: list[tuple[Any, float]] = []  # (record, divisor)
        self.fill: list[float] | None = None


def plan(state: CurvatureState, records: Sequence, last_step) -> list[Segment]:
    """Advance ``state`` over ``records`` (``last_step(record)`` gives the (seed, scalars, second differences) of a
    record's last local step) and group them into :class:`Segment` s. The state only depends on the records, so it
    can be advanced before the parameters move; callers plan on a copy and keep it once the kernels succeeded.
    A record's divisor is the state's before its own update, or after it for the curvature-first rules."""
    segments: list[Segment] = []
    for rec in records:
        if state.curvature_first:  # the round's own second differences first (no H tensor, kernel rule "none")
            fill = state.advance(*last_step(rec))
            rule, divisor = kernel_rule_of(state.rule), state.divisor()
        else:
            rule, divisor = state.round_kernel_rule(), state.divisor()
            fill = state.advance(*last_step(rec))
        if not segments or segments[-1].fill is not None or segments[-1].kernel_rule != rule:
            segments.append(Segment(rule))
        segments[-1].items.append((rec, divisor))
        segments[-1].fill = fill
    return segments
