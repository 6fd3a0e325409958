"""Argument checks shared by the public operations. Every check runs before any element is written."""

from __future__ import annotations

import itertools
import math
import numbers

import torch

from . import spec

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name} = {value} is outside [{lo}, {hi}]")
    return value


def check_f32(name: str, value) -> float:
    """A finite real number, rounded once to fp32 (the precision of the kernels)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    try:
        rounded = spec.to_f32(value)
    except OverflowError:
        rounded = math.inf
    if not math.isfinite(rounded):
        raise ValueError(f"{name} = {value} overflows fp32")
    return rounded


def tensor_list(name: str, value, *, allow_empty: bool = False) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        value = [value]
    elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}")
    out = list(value)
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty")
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def check_params(params: list[torch.Tensor]) -> torch.device:
    device = params[0].device
    for i, t in enumerate(params):
        if t.layout != torch.strided:
            raise TypeError(f"params[{i}] has layout {t.layout}; only dense (strided) tensors are supported")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params[{i}] has dtype {t.dtype}; supported: float32, bfloat16, float16")
        if t.device != device:
            raise ValueError(f"params[{i}] is on {t.device} but params[0] is on {device}: use one device per call")
        if not t.is_contiguous():
            raise ValueError(f"params[{i}] is not contiguous; call .contiguous() on it (the update is in place)")
    check_no_overlap(params)
    return device


def check_hessian(hessian: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Return per-tensor H views, or None. Accepts one H per parameter or a single flat H over all of them."""
    if not hessian:
        return None
    numels = [p.numel() for p in params]
    total = sum(numels)
    device = params[0].device
    if len(hessian) == 1 and len(params) > 1:
        flat = hessian[0]
        _check_h_tensor("hessian", flat, device)
        if flat.numel() != total:
            raise ValueError(f"hessian has {flat.numel()} elements but params have {total} in all")
        views = list(flat.reshape(-1).split(numels))
    else:
        if len(hessian) != len(params):
            raise ValueError(f"hessian has {len(hessian)} tensors but params has {len(params)}")
        views = []
        for i, (h, p) in enumerate(zip(hessian, params)):
            _check_h_tensor(f"hessian[{i}]", h, device)
            if h.numel() != p.numel():
                raise ValueError(f"hessian[{i}] has {h.numel()} elements but params[{i}] has {p.numel()}")
            views.append(h)
    check_no_overlap(params + views)
    return views


def _check_h_tensor(name: str, h: torch.Tensor, device: torch.device) -> None:
    if h.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {h.dtype}")
    if h.device != device:
        raise ValueError(f"{name} is on {h.device} but params are on {device}")
    if h.layout != torch.strided or not h.is_contiguous():
        raise ValueError(f"{name} must be a contiguous dense tensor")


def check_hessian_values(hessian: list[torch.Tensor]) -> None:
    """H must be finite and > 0 everywhere (it is divided by its square root). One read pass over every tensor and a
    single synchronisation for the whole list (the minima and maxima are gathered on the device first)."""
    nonempty = [(i, h) for i, h in enumerate(hessian) if h.numel()]
    if not nonempty:
        return
    stats = torch.stack([torch.stack(torch.aminmax(h)) for _, h in nonempty]).tolist()
    for (i, _), (lo, hi) in zip(nonempty, stats):
        if not (lo > 0.0 and hi < math.inf):  # NaN fails both comparisons
            raise ValueError(
                f"hessian[{i}] must be finite and > 0 everywhere (found min {lo}, max {hi}); "
                "H is the diagonal curvature estimate and starts at 1"
            )


def check_no_overlap(tensors: list[torch.Tensor]) -> None:
    spans = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            continue
        start = t.data_ptr()
        spans.append((start, start + t.numel() * t.element_size(), i))
    spans.sort()
    for (_, e0, i0), (s1, _, i1) in itertools.pairwise(spans):
        if s1 < e0:
            raise ValueError(
                f"tensors {min(i0, i1)} and {max(i0, i1)} share memory; each element may be updated only once per call"
            )


def global_offsets(params: list[torch.Tensor], offset) -> list[int]:
    if isinstance(offset, bool) or not isinstance(offset, numbers.Integral):
        raise TypeError(f"offset must be an integer, got {type(offset).__name__}")
    offset = int(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    offsets = []
    pos = offset
    for t in params:
        offsets.append(pos)
        pos += t.numel()
    if pos > spec.INDEX_LIMIT:
        raise ValueError(f"offset + number of elements = {pos} exceeds the index limit 2^62")
    return offsets
