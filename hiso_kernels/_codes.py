"""The integer codes that cross the native and Triton boundaries: storage dtypes here, distributions and curvature
rules in :mod:`hiso_kernels.spec`. Their C++ form is ``csrc/include/hiso/codes.h``; ``tests/test_build_and_info.py``
checks that the two agree."""

from __future__ import annotations

import enum

import torch


class DType(enum.IntEnum):
    """Storage dtype of a parameter tensor, as the kernels see it (H is always fp32)."""

    FLOAT32 = 0
    BFLOAT16 = 1
    FLOAT16 = 2


#: torch dtype -> kernel code
DTYPE_CODES = {torch.float32: DType.FLOAT32, torch.bfloat16: DType.BFLOAT16, torch.float16: DType.FLOAT16}
