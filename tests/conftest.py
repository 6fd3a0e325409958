"""Shared fixtures. Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
set before triton is imported."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import host_fused_backends


@pytest.fixture(params=host_fused_backends())
def fused_backend(request) -> str:
    """Each fused backend that runs on CPU tensors here."""
    return request.param
