"""Programs: the packed form of one or more zeroth-order rounds that every backend executes.

A round is a list of terms (seed, direction index, x coefficient a, curvature coefficient b) plus the round's weight
decay and stochastic-rounding seed. Every public operation (perturb, update, HiSo round, replay) is a program of one
or more rounds, so each backend needs exactly one fused kernel. The public functions build and validate a program
once (:func:`build_program`) and hand its eight arrays to the ``hiso::apply_program_`` op as tensors.

The eight arrays are views of one byte buffer (pinned when the parameters are on a GPU), so a GPU backend moves a
program with one asynchronous copy, and a program seen recently on a device is not copied again
(:func:`device_program`).
"""

from __future__ import annotations

import collections
import dataclasses
import struct
import threading
from collections.abc import Sequence
from typing import Any

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
    ``update_hessian=False`` makes the round leave H as it is even when the program's rule updates H: a perturbation
    round fused into the same pass as a HiSo update (the optimizers' last restore) reads H without changing it.
    """

    seeds: Sequence[int]
    directions: Sequence[int]
    coefficients: Sequence[float]
    curvature_coefficients: Sequence[float] | None = None
    weight_decay: float = 0.0
    update_hessian: bool = True


#: the program's arrays in the op's schema order, with their dtypes (int64 first: every field starts 8-byte aligned)
TENSOR_FIELDS = (
    ("seeds", torch.int64),  # [T]
    ("dirs", torch.int64),  # [T]
    ("round_start", torch.int64),  # [R + 1]
    ("round_rseed", torch.int64),  # [R], -1 = round to nearest even
    ("coef_x", torch.float32),  # [T]
    ("coef_h", torch.float32),  # [T]
    ("round_wd", torch.float32),  # [R]
    ("round_flags", torch.int32),  # [R], bit 0 (ROUND_UPDATES_H): the round updates H when the rule does
)

#: round_flags bit: the round updates H (when the program's curvature rule is not "none"); csrc/include/hiso/codes.h
ROUND_UPDATES_H = 1


@dataclasses.dataclass(frozen=True)
class Program:
    """Rounds packed into flat CPU tensors; :func:`device_program` gives a backend their copy on its device."""

    seeds: torch.Tensor
    dirs: torch.Tensor
    round_start: torch.Tensor
    round_rseed: torch.Tensor
    coef_x: torch.Tensor
    coef_h: torch.Tensor
    round_wd: torch.Tensor
    round_flags: torch.Tensor
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

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name, _ in TENSOR_FIELDS)

    def rounds(self):
        """Yield (round index, term slice, weight decay, rounding seed, updates H) in order (reference backend)."""
        starts = self.round_start.tolist()
        wds = self.round_wd.tolist()
        rseeds = self.round_rseed.tolist()
        flags = self.round_flags.tolist()
        for r in range(self.n_rounds):
            yield r, slice(starts[r], starts[r + 1]), wds[r], rseeds[r], bool(flags[r] & ROUND_UPDATES_H)

    def updates_hessian(self) -> bool:
        """Whether running this program writes H (its rule updates H and some round is flagged to)."""
        return self.rule != CurvatureRule.NONE and bool((self.round_flags & ROUND_UPDATES_H).any())

    def to(self, device: torch.device) -> Program:
        return device_program(self, device)


# ------------------------------------------------------------------------------------------------ building
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
    if not isinstance(rnd.update_hessian, bool):
        raise TypeError(f"rounds[{r}].update_hessian must be a bool, got {type(rnd.update_hessian).__name__}")
    return s, p, a, b, _check_f32(f"rounds[{r}].weight_decay", rnd.weight_decay)


def curvature_parameters(rule: CurvatureRule, beta, h_min) -> tuple[float, float, float]:
    """(beta, 1 - beta, h_min) as fp32, checked when the rule updates H (zeros otherwise)."""
    if rule == CurvatureRule.NONE:
        return 0.0, spec.to_f32(1.0), 0.0
    beta = _check_f32("beta", beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    h_min = _check_f32("h_min", h_min)
    if not h_min > 0.0:
        raise ValueError(f"h_min must be > 0, got {h_min}")
    return beta, spec.to_f32(1.0 - beta), h_min


def build_program(
    rounds: Sequence[Round],
    *,
    distribution,
    rule,
    beta: float = 0.0,
    h_min: float = 0.0,
    stochastic_rounding: bool = False,
    pin_memory: bool = False,
) -> Program:
    """Validate and pack rounds. Raises ValueError / TypeError before anything is written anywhere."""
    distribution = Distribution.parse(distribution)
    rule = CurvatureRule.parse(rule)
    if not isinstance(stochastic_rounding, bool):
        raise TypeError("stochastic_rounding must be a bool")
    beta, one_minus_beta, h_min = curvature_parameters(rule, beta, h_min)
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
    flags: list[int] = []
    for r, rnd in enumerate(rounds):
        s, p, a, b, wd = normalize_round(r, rnd)
        seeds += s
        dirs += p
        coef_x += a
        coef_h += [0.0] * len(s) if b is None else b
        starts.append(len(seeds))
        wds.append(wd)
        flags.append(ROUND_UPDATES_H if rnd.update_hessian else 0)
        if stochastic_rounding:
            # Derived from the round's own content, so a replay of the round draws the same rounding bits.
            words = [len(s)] + s + p + [spec.f32_bits(v) for v in a] + [spec.f32_bits(wd)]
            rseeds.append(spec.rounding_seed(*words))
        else:
            rseeds.append(-1)
    arrays = {"seeds": seeds, "dirs": dirs, "round_start": starts, "round_rseed": rseeds, "coef_x": coef_x,
              "coef_h": coef_h, "round_wd": wds, "round_flags": flags}
    return Program(**pack(arrays, pin_memory), distribution=distribution, rule=rule, beta=beta,
                   one_minus_beta=one_minus_beta, h_min=h_min)


_STRUCT_CODES = {torch.int64: "q", torch.float32: "f", torch.int32: "i"}


def pack(arrays: dict, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """The program's arrays as views of one byte buffer, each field 8-byte aligned (one copy moves them all). Packed
    with one ``struct.pack_into`` (the values are already exact fp32 / int64): a few microseconds for the small
    programs of an optimizer step."""
    layout = []
    fmt = ["<"]
    nbytes = 0
    values: list = []
    for name, dtype in TENSOR_FIELDS:
        field = arrays[name]
        n = len(field)
        size = n * (8 if dtype == torch.int64 else 4)
        layout.append((name, dtype, nbytes, size))
        pad = (size + 7) // 8 * 8 - size
        fmt.append(f"{n}{_STRUCT_CODES[dtype]}{pad}x")
        values.extend(field)
        nbytes += size + pad
    data = bytearray(nbytes)
    struct.pack_into("".join(fmt), data, 0, *values)
    buf = torch.frombuffer(data, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    if pin_memory and torch.cuda.is_available():
        buf = buf.pin_memory()
    return {name: buf[start : start + size].view(dtype) for name, dtype, start, size in layout}


def program_from_tensors(tensors: Sequence[torch.Tensor], distribution: int, rule: int, beta: float,
                         one_minus_beta: float, h_min: float) -> Program:
    """A Program from the op's arguments, with the structural checks a direct ``torch.ops.hiso`` call needs (the
    public functions have checked every value already). Raises ValueError / TypeError."""
    fields = {}
    for (name, dtype), t in zip(TENSOR_FIELDS, tensors, strict=True):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.dim() != 1 or t.device.type != "cpu":
            raise TypeError(f"program field {name} must be a one-dimensional {dtype} CPU tensor")
        fields[name] = t
    n_terms, n_rounds = fields["seeds"].numel(), fields["round_wd"].numel()
    if any(fields[f].numel() != n_terms for f in ("dirs", "coef_x", "coef_h")) or n_rounds < 1 or \
            fields["round_rseed"].numel() != n_rounds or fields["round_start"].numel() != n_rounds + 1 or \
            fields["round_flags"].numel() != n_rounds:
        raise ValueError("program fields have inconsistent lengths")
    starts = fields["round_start"].numpy()
    if starts[0] != 0 or starts[-1] != n_terms or (np.diff(starts) <= 0).any():
        raise ValueError("round_start must rise strictly from 0 to the number of terms (every round has a term)")
    seeds, dirs = fields["seeds"].numpy(), fields["dirs"].numpy()
    if (seeds < 0).any() or (dirs < 0).any() or (dirs > spec.DIRECTION_MAX).any() or \
            (fields["round_rseed"].numpy() < -1).any():
        raise ValueError("seeds, directions or rounding seeds out of range")
    if (fields["round_flags"].numpy() & ~ROUND_UPDATES_H).any():
        raise ValueError(f"round_flags may only hold the bit ROUND_UPDATES_H ({ROUND_UPDATES_H})")
    if not all(np.isfinite(fields[f].numpy()).all() for f in ("coef_x", "coef_h", "round_wd")):
        raise ValueError("program coefficients must be finite")
    rule = CurvatureRule.parse(rule)
    return Program(**fields, distribution=Distribution.parse(distribution), rule=rule, beta=float(beta),
                   one_minus_beta=float(one_minus_beta), h_min=float(h_min))


def sub_program(prog: Program, start: int, stop: int) -> Program:
    """Rounds ``[start, stop)`` of a (CPU) program as a program of their own, with the same rule and constants: the
    applied and the simulated parts of a logged run, for backends that simulate on scratch copies."""
    if not 0 <= start < stop <= prog.n_rounds:
        raise ValueError(f"rounds [{start}, {stop}) are not a non-empty range of the program's {prog.n_rounds}")
    starts = prog.round_start.tolist()
    t0, t1 = starts[start], starts[stop]
    arrays = {"seeds": prog.seeds.tolist()[t0:t1], "dirs": prog.dirs.tolist()[t0:t1],
              "round_start": [s - t0 for s in starts[start:stop + 1]],
              "round_rseed": prog.round_rseed.tolist()[start:stop], "coef_x": prog.coef_x.tolist()[t0:t1],
              "coef_h": prog.coef_h.tolist()[t0:t1], "round_wd": prog.round_wd.tolist()[start:stop],
              "round_flags": prog.round_flags.tolist()[start:stop]}
    return Program(**pack(arrays), distribution=prog.distribution, rule=prog.rule, beta=prog.beta,
                   one_minus_beta=prog.one_minus_beta, h_min=prog.h_min)


def with_seed(prog: Program, seed: int) -> Program:
    """A copy of a program (whose arrays share one buffer) with every term's seed set to ``seed`` (checked by the
    caller): the optimizers' perturbations differ from step to step only in their seed. Only for programs without
    stochastic rounding (whose rounding seeds derive from the terms' seeds)."""
    buf = _shared_buffer(prog)
    if buf is None or bool((prog.round_rseed >= 0).any()):
        raise ValueError("with_seed needs a packed program without stochastic rounding")
    copy = buf.clone()
    fields: dict[str, Any] = {}
    for (name, dtype), t in zip(TENSOR_FIELDS, prog.tensors()):
        start = t.storage_offset() * t.element_size()
        fields[name] = copy[start : start + t.numel() * t.element_size()].view(dtype)
    fields["seeds"].fill_(seed)
    return _with_fields(prog, fields)


# ------------------------------------------------------------------------------------------------ device copies
class _DevicePrograms:
    """Device copies of recent programs, keyed by device, stream and content: a MeZO step perturbs with the same
    program twice, and a replica replays what its peers ran. Programs above ``max_bytes`` are not kept."""

    def __init__(self, capacity: int = 64, max_bytes: int = 1 << 16):
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, prog: Program, device: torch.device) -> Program:
        buf = _shared_buffer(prog)
        if buf is None:  # separate tensors (a direct op call): one copy per field
            fields: dict[str, Any] = {name: t.to(device, non_blocking=True)
                                      for (name, _), t in zip(TENSOR_FIELDS, prog.tensors())}
            return _with_fields(prog, fields)
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device, stream, buf.numpy().tobytes()) if buf.numel() <= self._max_bytes else None
        if key is not None:
            with self._lock:
                hit = self._data.get(key)
                if hit is not None:
                    self._data.move_to_end(key)
                    return _with_fields(prog, hit)
        dev = buf.to(device, non_blocking=True)  # asynchronous when buf is pinned
        fields = {}  # name -> device tensor
        for (name, dtype), t in zip(TENSOR_FIELDS, prog.tensors()):
            start = t.storage_offset() * t.element_size()
            fields[name] = dev[start : start + t.numel() * t.element_size()].view(dtype)
        if key is not None:
            with self._lock:
                self._data[key] = fields
                while len(self._data) > self._capacity:
                    self._data.popitem(last=False)
        return _with_fields(prog, fields)


def _with_fields(prog: Program, fields: dict[str, Any]) -> Program:
    return dataclasses.replace(prog, **fields)


def _shared_buffer(prog: Program) -> torch.Tensor | None:
    """The byte buffer that all eight arrays view, or None if they do not share one."""
    tensors = prog.tensors()
    storage = tensors[0].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous() for t in tensors):
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


_DEVICE_PROGRAMS = _DevicePrograms()


def device_program(prog: Program, device: torch.device) -> Program:
    """``prog`` with its arrays on ``device`` (itself on the CPU)."""
    if device.type == "cpu":
        return prog
    return _DEVICE_PROGRAMS.get(prog, device)
