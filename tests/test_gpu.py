"""GPU backends (cuda, triton) equal the cpu backend bit for bit on the device. Skipped without a CUDA device;
run by benchmarks/gpu_check.sh on a lent GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_bitwise_equal, gpu_backends
from test_backend_agreement import OPS, make_state

import hiso_kernels as hk

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
GPU_BACKENDS = gpu_backends()
REFERENCE = "cpu" if "cpu" in hk.available_backends("cpu") else "torch"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("op", list(OPS))
def test_gpu_equals_cpu(backend, op, dtype, distribution, sr):
    ref_p, ref_h = make_state(dtype)
    OPS[op](ref_p, ref_h, offset=2**32 + 3, distribution=distribution, stochastic_rounding=sr, backend=REFERENCE)
    p, h = make_state(dtype)
    p = [t.cuda() for t in p]
    h = [t.cuda() for t in h]
    OPS[op](p, h, offset=2**32 + 3, distribution=distribution, stochastic_rounding=sr, backend=backend)
    torch.cuda.synchronize()
    for a, b in zip(p + h, ref_p + ref_h):
        assert_bitwise_equal(a.cpu(), b, f"{backend} {op}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_gpu_directions_long_range(backend, distribution):
    n = 3_000_001
    ref = hk.directions(2**50 + 1, n, direction=3, offset=2**40 + 7, distribution=distribution, backend=REFERENCE)
    got = hk.directions(2**50 + 1, n, direction=3, offset=2**40 + 7, distribution=distribution, device="cuda",
                        backend=backend)
    assert_bitwise_equal(got.cpu(), ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_large_parameter_list(backend):
    """Many tensors of awkward sizes and a misaligned start in one launch (vectorised and scalar paths)."""
    g = torch.Generator().manual_seed(0)
    sizes = [1, 3, 4097, 1 << 20, 77, 1000003, 5]
    ref = [torch.randn(n, generator=g).to(torch.bfloat16) for n in sizes]
    dev = [t.cuda() for t in ref]
    h_ref = [torch.rand(n, generator=g) + 0.5 for n in sizes]
    h_dev = [t.cuda() for t in h_ref]
    for params, hess, be in ((ref, h_ref, REFERENCE), (dev, h_dev, backend)):
        hk.hiso_round_(params, hess, [11, 11, 12], [0, 1, 0], [0.1, -0.2, 0.05], [1.0, 0.5, 0.0], offset=3,
                       stochastic_rounding=True, backend=be)
    torch.cuda.synchronize()
    for a, b in zip(dev + h_dev, ref + h_ref):
        assert_bitwise_equal(a.cpu(), b, backend)
