"""Programs: the packed form of one or more zeroth-order rounds that every backend executes.

A round is a list of terms (seed, direction index, x coefficient a, curvature coefficient b) plus the round's weight
decay and stochastic-rounding seed. Every public operation (perturb, update, HiSo round, replay) is a program of one
or more rounds, so each backend needs exactly one fused kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from . import spec
from ._validate import check_f32 as _check_f32
from ._validate import check_int as _check_int
from .spec import CurvatureRule, Distribution


@dataclasses.dataclass(frozen=True)
class Round:
    """One round of updates: x <- x - (sum_i a_i u(seed_i, p_i) / sqrt(H) + weight_decay x), then the H update.

    ``curvature_coefficients`` (b_i) feed the H update (see :class:`~hiso_kernels.spec.CurvatureRule`); they default to
    zero for every term. A term's b can be non-zero while its a is zero (directions used only for curvature).
    """

    seeds: Sequence[int]
    directions: Sequence[int]
    coefficients: Sequence[float]
    curvature_coefficients: Sequence[float] | None = None
    weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class Program:
    """Rounds packed into flat arrays (CPU tensors); backends copy them to their device."""

    seeds: torch.Tensor  # int64 [T]
    dirs: torch.Tensor  # int64 [T]
    coef_x: torch.Tensor  # float32 [T]
    coef_h: torch.Tensor  # float32 [T]
    round_start: torch.Tensor  # int64 [R + 1]
    round_wd: torch.Tensor  # float32 [R]
    round_rseed: torch.Tensor  # int64 [R], -1 = round to nearest even
    distribution: Distribution
    rule: CurvatureRule
    beta: float
    one_minus_beta: float
    h_min: float

    @property
    def n_rounds(self) -> int:
        return int(self.round_wd.numel())

    @property
    def n_terms(self) -> int:
        return int(self.seeds.numel())

    def rounds(self):
        """Yield (round index, term slice, weight decay, rounding seed) in order (for the reference backend)."""
        starts = self.round_start.tolist()
        wds = self.round_wd.tolist()
        rseeds = self.round_rseed.tolist()
        for r in range(self.n_rounds):
            yield r, slice(starts[r], starts[r + 1]), wds[r], rseeds[r]

    def to(self, device: torch.device) -> "Program":
        if device.type == "cpu":
            return self
        fields = {}
        for f in ("seeds", "dirs", "coef_x", "coef_h", "round_start", "round_wd", "round_rseed"):
            fields[f] = getattr(self, f).to(device, non_blocking=True)
        return dataclasses.replace(self, **fields)


def _as_list(name: str, values) -> list:
    if isinstance(values, torch.Tensor):
        if values.dim() > 1:
            raise ValueError(f"{name} must be one-dimensional")
        return values.tolist()
    if isinstance(values, np.ndarray):
        return values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}")
    return list(values)


def normalize_round(r: int, rnd: Round) -> tuple[list[int], list[int], list[float], list[float] | None, float]:
    """Check one round and return (seeds, directions, fp32 coefficients, fp32 curvature coefficients or None, fp32
    weight decay). Errors name the round and the term."""
    if not isinstance(rnd, Round):
        raise TypeError(f"rounds[{r}] must be a hiso_kernels.Round, got {type(rnd).__name__}")
    s = _as_list(f"rounds[{r}].seeds", rnd.seeds)
    p = _as_list(f"rounds[{r}].directions", rnd.directions)
    a = _as_list(f"rounds[{r}].coefficients", rnd.coefficients)
    b = None if rnd.curvature_coefficients is None else _as_list(
        f"rounds[{r}].curvature_coefficients", rnd.curvature_coefficients
    )
    if not s:
        raise ValueError(f"rounds[{r}] has no terms")
    if len(p) != len(s) or len(a) != len(s) or (b is not None and len(b) != len(s)):
        raise ValueError(
            f"rounds[{r}]: seeds, directions, coefficients (and curvature_coefficients) must have equal lengths, "
            f"got {len(s)}, {len(p)}, {len(a)}" + ("" if b is None else f", {len(b)}")
        )
    s = [_check_int(f"rounds[{r}].seeds[{i}]", v, 0, spec.SEED_MAX) for i, v in enumerate(s)]
    p = [_check_int(f"rounds[{r}].directions[{i}]", v, 0, spec.DIRECTION_MAX) for i, v in enumerate(p)]
    a = [_check_f32(f"rounds[{r}].coefficients[{i}]", v) for i, v in enumerate(a)]
    if b is not None:
        b = [_check_f32(f"rounds[{r}].curvature_coefficients[{i}]", v) for i, v in enumerate(b)]
    return s, p, a, b, _check_f32(f"rounds[{r}].weight_decay", rnd.weight_decay)


def build_program(
    rounds: Sequence[Round],
    *,
    distribution,
    rule,
    beta: float = 0.0,
    h_min: float = 0.0,
    stochastic_rounding: bool = False,
) -> Program:
    """Validate and pack rounds. Raises ValueError / TypeError before anything is written anywhere."""
    distribution = Distribution.parse(distribution)
    rule = CurvatureRule.parse(rule)
    if not isinstance(stochastic_rounding, bool):
        raise TypeError("stochastic_rounding must be a bool")
    if rule != CurvatureRule.NONE:
        beta = _check_f32("beta", beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        h_min = _check_f32("h_min", h_min)
        if not h_min > 0.0:
            raise ValueError(f"h_min must be > 0, got {h_min}")
    else:
        beta, h_min = 0.0, 0.0
    one_minus_beta = spec.to_f32(1.0 - beta)
    if isinstance(rounds, Round):
        rounds = [rounds]
    rounds = _as_list("rounds", rounds)
    if not rounds:
        raise ValueError("a program needs at least one round")

    seeds: list[int] = []
    dirs: list[int] = []
    coef_x: list[float] = []
    coef_h: list[float] = []
    starts = [0]
    wds: list[float] = []
    rseeds: list[int] = []
    for r, rnd in enumerate(rounds):
        s, p, a, b, wd = normalize_round(r, rnd)
        b = [0.0] * len(s) if b is None else b
        seeds += s
        dirs += p
        coef_x += a
        coef_h += b
        starts.append(len(seeds))
        wds.append(wd)
        if stochastic_rounding:
            # Derived from the round's own content, so a replay of the round draws the same rounding bits.
            words = [len(s)] + s + p + [spec.f32_bits(v) for v in a] + [spec.f32_bits(wd)]
            rseeds.append(spec.rounding_seed(*words))
        else:
            rseeds.append(-1)
    return Program(
        seeds=torch.tensor(seeds, dtype=torch.int64),
        dirs=torch.tensor(dirs, dtype=torch.int64),
        coef_x=torch.tensor(coef_x, dtype=torch.float32),
        coef_h=torch.tensor(coef_h, dtype=torch.float32),
        round_start=torch.tensor(starts, dtype=torch.int64),
        round_wd=torch.tensor(wds, dtype=torch.float32),
        round_rseed=torch.tensor(rseeds, dtype=torch.int64),
        distribution=distribution,
        rule=rule,
        beta=beta,
        one_minus_beta=one_minus_beta,
        h_min=h_min,
    )
