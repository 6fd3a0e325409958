"""What only a GPU can show: the cuda and triton backends equal the cpu backend (or the reference) bit for bit on the
device, for every operation, dtype, distribution and rounding mode; the frozen spec vectors on ``device="cuda"``;
unaligned views; a tensor of 2^31 + 5 elements; many small tensors in one call; launches on the tensors' device; the
launch-checking switch. Skipped without a CUDA device; run by benchmarks/gpu_check.sh (``pytest -n``, with
``HISO_SYNC_LAUNCHES=1``).

A GPU backend that should be there and is not (a forced CUDA build, or ``HISO_EXPECT_GPU_BACKENDS``) is a failure,
not a shorter parameter list."""

from __future__ import annotations

import os

import pytest
import torch
from test_backend_agreement import OPS, make_state
from test_spec_vectors import GAUSSIAN_VECTORS, RADEMACHER_SIGNS, SR_BF16, SR_FP16

import hiso_kernels as hk
from helpers import DTYPES, assert_bitwise_equal, gpu_backends
from hiso_kernels.backends import BACKENDS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]
GPU_BACKENDS = gpu_backends()
REFERENCE = "cpu" if "cpu" in hk.available_backends("cpu") else "reference"
ON = ("1", "yes", "true", "on")


def test_expected_gpu_backends_are_usable():
    expected = {b for b in os.environ.get("HISO_EXPECT_GPU_BACKENDS", "").split(",") if b}
    if os.environ.get("HISO_BUILD_CUDA", "").lower() in ON:
        expected.add("cuda")
    missing = {b: BACKENDS[b].availability()[1] for b in expected - set(GPU_BACKENDS)}
    assert not missing, f"expected GPU backends are not usable: {missing}"
    assert GPU_BACKENDS, "no GPU backend at all on a machine with a GPU"


def _bits(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(v & 0xFFFFFFFF for v in t.cpu().view(torch.int32).tolist())


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_spec_vectors_on_device(backend):
    for (seed, p, j), want in GAUSSIAN_VECTORS.items():
        assert _bits(hk.directions(seed, 8, direction=p, offset=j, device="cuda", backend=backend)) == want
    for (seed, p, j), signs in RADEMACHER_SIGNS.items():
        u = hk.directions(seed, 8, direction=p, offset=j, distribution="rademacher", device="cuda", backend=backend)
        assert tuple(int(v < 0) for v in u.tolist()) == signs
    for dtype, want in ((torch.bfloat16, SR_BF16), (torch.float16, SR_FP16)):
        x = torch.linspace(-3, 3, 8).to(dtype).cuda()
        hk.zo_update_([x], 77, 0, [1e-3], stochastic_rounding=True, backend=backend)
        assert tuple(b & 0xFFFF for b in x.cpu().view(torch.int16).tolist()) == want


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("value", [1, 16])
def test_specialised_argument_values(backend, value):
    """Seed, direction, offset, size and round count equal to 1 or 16 (the values Triton specialises on)."""
    for dist in ("gaussian", "rademacher"):
        got = hk.directions(value, value, direction=value, offset=value, distribution=dist, device="cuda",
                            backend=backend)
        ref = hk.directions(value, value, direction=value, offset=value, distribution=dist, backend=REFERENCE)
        assert_bitwise_equal(got.cpu(), ref)
    x_ref = torch.linspace(-1, 1, value)
    x = x_ref.cuda()
    rounds = [hk.Round([value], [value], [1e-3]) for _ in range(value)]
    hk.replay_([x_ref], rounds, offset=value, backend=REFERENCE)
    hk.replay_([x], rounds, offset=value, backend=backend)
    assert_bitwise_equal(x.cpu(), x_ref)


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
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("layout", ["aligned", "big[1:]"])
def test_aligned_and_unaligned_views(backend, dtype, layout):
    """Whole aligned groups (the vectorised path) and views one element into their storage (the scalar path)."""
    g = torch.Generator().manual_seed(5)
    sizes = [4096, 1024, 12]  # multiples of 4: aligned unless viewed at [1:]
    ref_base = [torch.randn(n + 1, generator=g).to(dtype) for n in sizes]
    ref_h_base = [torch.rand(n + 1, generator=g) + 0.5 for n in sizes]
    dev_base, dev_h_base = [t.cuda() for t in ref_base], [t.cuda() for t in ref_h_base]
    cut = (lambda t: t[1:]) if layout == "big[1:]" else (lambda t: t[:-1])
    for base, h_base, be in ((ref_base, ref_h_base, REFERENCE), (dev_base, dev_h_base, backend)):
        params, hess = [cut(t) for t in base], [cut(t) for t in h_base]
        hk.hiso_round_(params, hess, 9, [0, 1], [0.1, -0.2], [1.0, 0.5], offset=8, stochastic_rounding=True,
                       backend=be)
        hk.perturb_(params, 10, 1e-2, hessian=hess, offset=8, backend=be)
    for a, b in zip(dev_base + dev_h_base, ref_base + ref_h_base):
        assert_bitwise_equal(a.cpu(), b, f"{backend} {layout}")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_gpu_directions_long_range(backend, distribution):
    n = 3_000_001
    ref = hk.directions(2**50 + 1, n, direction=3, offset=2**40 + 7, distribution=distribution, backend=REFERENCE)
    got = hk.directions(2**50 + 1, n, direction=3, offset=2**40 + 7, distribution=distribution, device="cuda",
                        backend=backend)
    assert_bitwise_equal(got.cpu(), ref)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_many_small_tensors_in_one_call(backend):
    """Thousands of tiny tensors of every dtype (one launch per dtype and alignment class), with H and rounding."""
    g = torch.Generator().manual_seed(1)
    sizes = [1 + (i * 7) % 13 for i in range(3000)]
    ref = [torch.randn(n, generator=g).to(DTYPES[i % 3]) for i, n in enumerate(sizes)]
    h_ref = [torch.rand(n, generator=g) + 0.5 for n in sizes]
    dev, h_dev = [t.cuda() for t in ref], [t.cuda() for t in h_ref]
    for params, hess, be in ((ref, h_ref, REFERENCE), (dev, h_dev, backend)):
        hk.hiso_round_(params, hess, [11, 11, 12], [0, 1, 0], [0.1, -0.2, 0.05], [1.0, 0.5, 0.0], offset=3,
                       stochastic_rounding=True, backend=be)
    for a, b in zip(dev + h_dev, ref + h_ref):
        assert_bitwise_equal(a.cpu(), b, backend)


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


@pytest.mark.skipif(not {"cuda", "triton"} <= set(GPU_BACKENDS), reason="needs both the cuda and triton backends")
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 24 << 30,
                    reason="needs 24 GiB of GPU memory")
def test_beyond_2_pow_31_elements_cuda_equals_triton():
    """A bf16 tensor of 2^31 + 5 elements (indices past int32), cuda against triton bit for bit, and windows at its
    start, around 2^31 and at its end against the cpu backend."""
    n = 2**31 + 5
    a = torch.zeros(n, dtype=torch.bfloat16, device="cuda")
    a[::997] = 1.0
    b = a.clone()
    for x, be in ((a, "cuda"), (b, "triton")):
        hk.perturb_([x], 2**40 + 3, 1e-2, offset=1, backend=be)  # offset 1: the unaligned path
        hk.zo_update_([x[: n - 1]], 7, [0, 1], [1e-3, -2e-3], backend=be)  # 2^31 + 4 from offset 0: aligned
    torch.cuda.synchronize()
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    for start in (0, 2**31 - 500, n - 1000):
        window = torch.zeros(1000, dtype=torch.bfloat16)
        window[(-start) % 997 :: 997] = 1.0
        hk.perturb_([window], 2**40 + 3, 1e-2, offset=1 + start, backend=REFERENCE)
        if start + 1000 <= n - 1:
            hk.zo_update_([window], 7, [0, 1], [1e-3, -2e-3], offset=start, backend=REFERENCE)
        else:
            hk.zo_update_([window[:-1]], 7, [0, 1], [1e-3, -2e-3], offset=start, backend=REFERENCE)
        assert_bitwise_equal(a[start : start + 1000].cpu(), window, f"window at {start}")
    del a, b
    torch.cuda.empty_cache()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launches_on_the_tensors_device(backend):
    ref = [torch.randn(1000)]
    x = [ref[0].to("cuda:1")]
    with torch.cuda.device(0):
        hk.perturb_(x, 5, 0.1, backend=backend)
    hk.perturb_(ref, 5, 0.1, backend=REFERENCE)
    assert_bitwise_equal(x[0].cpu(), ref[0])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_sync_launches_switch(backend, monkeypatch):
    """HISO_SYNC_LAUNCHES=1 waits for every launch (so an asynchronous fault is reported by the call that made it)."""
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: (calls.append(device), real(device)))
    x = [torch.zeros(100, device="cuda"), torch.zeros(10, device="cuda", dtype=torch.bfloat16)]
    monkeypatch.setenv("HISO_SYNC_LAUNCHES", "0")
    hk.perturb_(x, 1, 1.0, backend=backend)
    assert not calls
    monkeypatch.setenv("HISO_SYNC_LAUNCHES", "1")
    hk.perturb_(x, 1, 1.0, backend=backend)
    assert len(calls) >= 2  # one per launch: two dtypes


def test_programs_are_copied_once_per_device():
    """A repeated program (MeZO's +mu ... +mu) is served from the device cache, not copied again."""
    from hiso_kernels import _program

    x = [torch.zeros(64, device="cuda")]
    hk.perturb_(x, 123456789, 0.5)
    size = len(_program._DEVICE_PROGRAMS._data)
    hk.perturb_(x, 123456789, 0.5)
    assert len(_program._DEVICE_PROGRAMS._data) == size
