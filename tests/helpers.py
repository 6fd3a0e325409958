"""Helpers shared by the tests."""

from __future__ import annotations

import torch

import hiso_kernels as hk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def host_fused_backends() -> list[str]:
    """Fused backends that run on CPU tensors here (cpu; triton when interpreted)."""
    return [b for b in hk.available_backends("cpu") if b != "reference"]


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [b for b in hk.available_backends("cuda") if b != "reference"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's storage, for bit-for-bit comparisons (NaN-safe, -0 != +0)."""
    t = t.contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, msg
    diff = (bits(a.cpu()) != bits(b.cpu())).nonzero()
    if diff.numel():
        i = diff[0].tolist()
        raise AssertionError(
            f"{msg}: {diff.shape[0]} of {a.numel()} elements differ; first at {i}: {a.cpu()[tuple(i)].item()!r} "
            f"vs {b.cpu()[tuple(i)].item()!r}"
        )

