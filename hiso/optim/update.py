"""The update of one ZO step (or one federated round of K local steps) as a kernel round: the single source of the
coefficients that the optimizers, the federated server, the clients and every replay use.

A step with seed s, P directions and directional scalars c_p moves

    x <- x - sum_p (lr c_p / P) z_p - lr wd x,          z_p = u(s, p) / sqrt(H)      (H = 1 for ZO-SGD / DeComFL)

(MeZO, arXiv 2305.17333; DeComFL, arXiv 2405.15861). A federated round of K local steps with seeds s_k applies the K
steps' terms in one pass with weight decay K lr wd (``docs/decisions.md``). HiSo (arXiv 2506.02370) then updates H
from the last step's aggregated scalars with coefficients b_p:

    "gsq"   (the authors' rule)   b_p = c_p / P                    H <- beta H + (1 - beta) (sum_p b_p u_p / sqrt(H))^2
    "stein" (second differences)  b_p = second_difference_p / P    H <- beta H + (1 - beta) H sum_p b_p (u_p^2 - 1)

The rules whose state is a few Python floats ("scalar", the absdelta rules, "stein-tensor", :mod:`hiso.optim.curvature`)
run kernel rounds without H update; their ``divisor`` (h for absdelta, hbar for stein-tensor) divides the step:
a_p = lr c_p / (P divisor), with divisor 1 giving exactly the bits of lr c_p / P.

The kernels apply the round (``hiso_kernels.replay_``); every replica that applies the same rounds holds the same bits.
Python evaluates ``lr * c / P`` left to right in float64 and the kernels round each coefficient once to fp32, so the
expressions here must not be rearranged: a replica that computed ``lr / P * c`` would drift by an ulp.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import hiso_kernels as hk

from .curvature import CURVATURE_RULES, KERNEL_RULES, SECOND_DIFFERENCE_RULES, check_rule

__all__ = ["CURVATURE_RULES", "check_curvature_rule", "needs_second_differences", "step_round"]


def check_curvature_rule(rule: str, difference: str = "central", h_init: str | None = None) -> str:
    """Validate a HiSo curvature rule name (and that it fits the finite-difference scheme and ``h_init``)."""
    return check_rule(rule, difference, h_init)


def needs_second_differences(curvature_rule: str | None) -> bool:
    """Whether a rule's H update needs the second differences (f(x + mu z) + f(x - mu z) - 2 f(x)) / (2 mu^2)."""
    return curvature_rule in SECOND_DIFFERENCE_RULES


def step_round(
    seeds: Sequence[int],
    scalars: Sequence[Sequence[float]],
    *,
    lr: float,
    weight_decay: float = 0.0,
    curvature_rule: str | None = None,
    second_differences: Sequence[Sequence[float]] | None = None,
    divisor: float = 1.0,
) -> hk.Round:
    """The kernel round of K local steps (``seeds[k]``, ``scalars[k][p]``), K = 1 for an optimizer step.

    ``curvature_rule`` None (or "none") gives a round without H update (ZO-SGD, DeComFL, the local steps of a
    client); "gsq" / "stein" add the curvature coefficients of the last step (``second_differences`` for "stein").
    ``divisor`` divides every step coefficient (the scalar-state rules' h; see the module doc).
    """
    k_steps = len(seeds)
    if k_steps == 0 or len(scalars) != k_steps:
        raise ValueError(f"need one row of scalars per seed, got {len(scalars)} rows for {k_steps} seeds")
    p_dirs = len(scalars[0])
    if p_dirs == 0 or any(len(row) != p_dirs for row in scalars):
        raise ValueError("every step needs the same positive number of directional scalars")
    rule = None if curvature_rule in (None, "none") else curvature_rule
    if rule is not None and rule not in KERNEL_RULES:
        raise ValueError(f"step_round takes a kernel rule {KERNEL_RULES} or none, got {rule!r}")
    if not (math.isfinite(divisor) and divisor > 0):
        raise ValueError(f"divisor must be finite and > 0, got {divisor!r}")
    if rule == "stein" and (second_differences is None or len(second_differences) != k_steps
                                           or any(len(row) != p_dirs for row in second_differences)):
        raise ValueError(f"the {rule!r} rule needs K x P second differences")
    out_seeds, dirs, a, b = [], [], [], []
    for k in range(k_steps):
        last = k == k_steps - 1  # HiSo updates H from the round's last local step
        for p in range(p_dirs):
            out_seeds.append(seeds[k])
            dirs.append(p)
            a.append(lr * scalars[k][p] / (p_dirs * divisor))
            if rule is not None:
                if not last:
                    b.append(0.0)
                elif rule == "stein":
                    b.append(second_differences[k][p] / p_dirs)  # type: ignore[index]
                else:
                    b.append(scalars[k][p] / p_dirs)
    return hk.Round(out_seeds, dirs, a, b if rule is not None else None, weight_decay=lr * weight_decay * k_steps)
