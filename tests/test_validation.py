"""Bad input gets a clear ValueError / TypeError before any element is written (parameters and H unchanged)."""

from __future__ import annotations

import math

import pytest
import torch

import hiso_kernels as hk
from helpers import host_fused_backends
from hiso_kernels import Round

BACKENDS = ["reference"] + host_fused_backends()


def fresh():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(10, generator=g), torch.randn(7, generator=g).to(torch.bfloat16)], [
        torch.rand(10, generator=g) + 0.5,
        torch.rand(7, generator=g) + 0.5,
    ]


def expect_error(exc, fn, match=None):
    params, hessian = fresh()
    before = [t.clone() for t in params + hessian]
    with pytest.raises(exc, match=match):
        fn(params, hessian)
    for a, b in zip(params + hessian, before):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), "state changed by a rejected call"


@pytest.mark.parametrize("backend", BACKENDS)
class TestRejected:
    def test_mixed_devices(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_([p[0], torch.zeros(3, device="meta")], 1, 1.0,
                                                          backend=backend), "one device")

    @pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64, torch.uint8])
    def test_unsupported_param_dtype(self, backend, dtype):
        expect_error(TypeError, lambda p, h: hk.perturb_([p[0], torch.zeros(4, dtype=dtype)], 1, 1.0,
                                                         backend=backend), "dtype")

    def test_non_contiguous(self, backend):
        m = torch.zeros(6, 4)
        expect_error(ValueError, lambda p, h: hk.perturb_([p[0], m.t()], 1, 1.0, backend=backend), "contiguous")
        expect_error(ValueError, lambda p, h: hk.perturb_([torch.zeros(10)[::2]], 1, 1.0, backend=backend),
                     "contiguous")

    def test_not_a_tensor(self, backend):
        expect_error(TypeError, lambda p, h: hk.perturb_([p[0], [1.0, 2.0]], 1, 1.0, backend=backend), "Tensor")
        expect_error(TypeError, lambda p, h: hk.perturb_(3.0, 1, 1.0, backend=backend))

    def test_empty_params(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_([], 1, 1.0, backend=backend), "empty")

    def test_aliased_params(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_([p[0], p[0]], 1, 1.0, backend=backend), "share memory")
        expect_error(ValueError, lambda p, h: hk.perturb_([p[0][:6], p[0][4:]], 1, 1.0, backend=backend),
                     "share memory")
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, [h[0], p[0].clone()[:7]], 1, 0, [1.0], [1.0],
                                                             backend=backend))

    def test_hessian_wrong_size(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, hessian=[h[0], torch.ones(6)],
                                                          backend=backend), "elements")
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, hessian=torch.ones(16), backend=backend),
                     "17")
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, hessian=[h[0], h[1], torch.ones(2)],
                                                          backend=backend), "tensors")

    def test_hessian_wrong_dtype(self, backend):
        expect_error(TypeError, lambda p, h: hk.perturb_(p, 1, 1.0, hessian=[h[0], h[1].half()], backend=backend),
                     "float32")

    @pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, -math.inf])
    def test_hessian_values(self, backend, bad):
        params, hessian = fresh()
        hessian[1][3] = bad
        before = [t.clone() for t in params + hessian]
        with pytest.raises(ValueError, match="finite and > 0"):
            hk.hiso_round_(params, hessian, 1, 0, [0.1], [1.0], backend=backend)
        for a, b in zip(params + hessian, before):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    @pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39])
    def test_non_finite_coefficients(self, backend, bad):
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, 1, [0, 1], [0.1, bad], backend=backend))
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, h, 1, 0, [0.1], [bad], backend=backend))
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, bad, backend=backend))
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, 1, 0, [0.1], weight_decay=bad, backend=backend))

    @pytest.mark.parametrize("seed", [-1, 2**63, 2**64 + 1])
    def test_seed_out_of_range(self, backend, seed):
        expect_error(ValueError, lambda p, h: hk.perturb_(p, seed, 1.0, backend=backend), "outside")
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, [1, seed], [0, 0], [0.1, 0.1], backend=backend),
                     "outside")
        expect_error(ValueError, lambda p, h: hk.replay_(p, [Round([1], [0], [0.1]), Round([seed], [0], [0.1])],
                                                         backend=backend), "outside")

    @pytest.mark.parametrize("seed", [1.0, "1", None, True])
    def test_seed_wrong_type(self, backend, seed):
        expect_error(TypeError, lambda p, h: hk.perturb_(p, seed, 1.0, backend=backend))

    def test_direction_out_of_range(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, direction=2**31, backend=backend))
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, 1, [0, -1], [1.0, 1.0], backend=backend))

    def test_empty_term_lists(self, backend):
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, [], [], [], backend=backend))
        expect_error(ValueError, lambda p, h: hk.replay_(p, [], backend=backend))
        expect_error(ValueError, lambda p, h: hk.replay_(p, [Round([], [], [])], backend=backend))

    def test_mismatched_lengths(self, backend):
        expect_error(ValueError, lambda p, h: hk.zo_update_(p, [1, 2], [0, 1, 2], [0.1, 0.2], backend=backend),
                     "equal lengths")
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, h, [1, 2], [0, 1], [0.1, 0.2], [1.0],
                                                             backend=backend), "equal lengths")

    def test_offset(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, offset=-1, backend=backend))
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, offset=2**62 - 5, backend=backend), "index limit")
        expect_error(TypeError, lambda p, h: hk.perturb_(p, 1, 1.0, offset=1.0, backend=backend))

    @pytest.mark.parametrize("beta", [-0.1, 1.5, math.nan])
    def test_beta(self, backend, beta):
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, h, 1, 0, [0.1], [1.0], beta=beta, backend=backend))

    @pytest.mark.parametrize("h_min", [0.0, -1e-3, math.inf])
    def test_h_min(self, backend, h_min):
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, h, 1, 0, [0.1], [1.0], h_min=h_min,
                                                             backend=backend))

    def test_curvature_rule_needs_hessian(self, backend):
        expect_error(ValueError, lambda p, h: hk.replay_(p, [Round([1], [0], [0.1], [1.0])], curvature_rule="gsq",
                                                         backend=backend), "hessian")
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, None, 1, 0, [0.1], [1.0], backend=backend))

    def test_unknown_names(self, backend):
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, distribution="uniform", backend=backend))
        expect_error(ValueError, lambda p, h: hk.hiso_round_(p, h, 1, 0, [0.1], [1.0], curvature_rule="adam",
                                                             backend=backend))

    def test_flag_types(self, backend):
        expect_error(TypeError, lambda p, h: hk.perturb_(p, 1, 1.0, stochastic_rounding="yes", backend=backend))


def test_unknown_and_unavailable_backends():
    expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, backend="opencl"), "unknown backend")
    if "cuda" not in hk.available_backends():
        expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0, backend="cuda"), "not available")


@pytest.mark.parametrize("entry", ["hiso_round_", "replay_"])
def test_hessian_on_the_meta_device_is_rejected(entry):
    """An H on the meta device used to route the call to the op's fake kernel: a silent no-op. Now a ValueError,
    raised before any tensor is touched."""
    def call(p, h):
        meta = [torch.ones(t.numel(), device="meta") for t in p]
        if entry == "hiso_round_":
            hk.hiso_round_(p, meta, 1, 0, [0.1], [1.0])
        else:
            rounds = [Round(seeds=[1], directions=[0], coefficients=[0.1], curvature_coefficients=[1.0])]
            hk.replay_(p, rounds, hessian=meta, curvature_rule="gsq")
    expect_error(ValueError, call, "H lives beside the params")


def test_environment_override(monkeypatch):
    monkeypatch.setenv("HISO_BACKEND", "nonsense")
    expect_error(ValueError, lambda p, h: hk.perturb_(p, 1, 1.0), "unknown backend")
    monkeypatch.setenv("HISO_BACKEND", "reference")
    from hiso_kernels.backends import select_backend

    assert select_backend(torch.device("cpu")).name == "reference"
    assert select_backend(torch.device("cpu"), "auto").name in ("cpu", "reference")


def test_deprecated_backend_name_torch(monkeypatch):
    """"torch" (the reference backend's old name) still selects it, with a one-time DeprecationWarning."""
    from hiso_kernels import backends
    from hiso_kernels.backends.reference import ReferenceBackend, TorchBackend

    monkeypatch.setattr(backends, "_warned", set())
    a, b = [torch.zeros(7)], [torch.zeros(7)]
    with pytest.warns(DeprecationWarning, match="'torch' is deprecated; use 'reference'"):
        hk.perturb_(a, 3, 0.5, backend="torch")
    hk.perturb_(b, 3, 0.5, backend="reference")
    assert torch.equal(a[0], b[0])
    monkeypatch.setenv("HISO_BACKEND", "torch")
    assert backends.select_backend(torch.device("cpu")).name == "reference"
    assert TorchBackend is ReferenceBackend and "torch" not in hk.available_backends()


def test_deprecated_rule_keyword_and_public_offsets():
    """``rule=`` still works (with a DeprecationWarning) and means ``curvature_rule=``; ``global_offsets`` is public."""
    a = [torch.zeros(5), torch.zeros(3)]
    b = [torch.zeros(5), torch.zeros(3)]
    ha = [torch.ones(5), torch.ones(3)]
    hb = [torch.ones(5), torch.ones(3)]
    hk.hiso_round_(a, ha, 7, [0, 1], [0.1, 0.2], [0.3, 0.4], curvature_rule="stein", h_min=1e-3)
    with pytest.warns(DeprecationWarning):
        hk.hiso_round_(b, hb, 7, [0, 1], [0.1, 0.2], [0.3, 0.4], rule="stein", h_min=1e-3)
    for x, y in zip(a + ha, b + hb):
        assert torch.equal(x, y)
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError):  # the old name warns, both names raise
        hk.replay_(a, [Round([1], [0], [0.1])], curvature_rule="none", rule="gsq")
    assert hk.global_offsets(a, 10) == [10, 15]
