"""Exact restore in the kernel (``hiso_kernels.bind``, ``docs/kernels.md``): a logged run applies the first rounds of a
program, simulates the rest in registers and logs only the elements that will not come back; the restore writes them
back. Every backend that runs here (reference, C++, Triton interpreted) and the fallback on scratch copies agree bit
for bit; a log that overflows (Triton) still restores exactly; the optimizers' fused last restore + update equals
restore then update; a step builds no program for its perturbations."""

from __future__ import annotations

import pytest
import torch

import hiso_kernels as hk
from helpers import DTYPES, assert_bitwise_equal, host_fused_backends
from hiso.optim import ZOSGD, HiSo
from hiso_kernels.backends import BACKENDS
from hiso_kernels.backends.base import chunked_logged_run

BACKEND_NAMES = ["reference", *host_fused_backends()]
MU = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def tensors(dtype, with_h=True, seed=0):
    """Three tensors with unaligned sizes and an unaligned view (the head / tail paths of every kernel)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(97, 13, generator=g).to(dtype), torch.randn(5, generator=g).to(dtype),
              torch.randn(3001, generator=g).to(dtype)[1:]]
    hessian = [torch.rand(p.shape, generator=g) + 0.5 for p in params] if with_h else None
    return params, hessian


def chain(b: hk.BoundParams, mu: float):
    """The optimizers' central chain +mu | -mu, -mu, +mu (applied | simulated)."""
    return b.shift_program(7, 2, [mu, -mu, -mu, mu])


def run_chain(b: hk.BoundParams, mu: float, log_fn):
    log = log_fn(chain(b, mu))
    perturbed = [p.clone() for p in b.params]
    b.apply(b.shift_program(7, 2, [-mu, -mu]))
    b.apply(b.shift_program(7, 2, [mu]))
    log.restore()
    return log, perturbed


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_logged_run_restores_exactly_and_matches_the_fallback(backend, dtype):
    params, hessian = tensors(dtype)
    start = [p.clone() for p in params]
    b = hk.bind(params, hessian=hessian, backend=backend)
    log, perturbed = run_chain(b, MU[dtype], lambda prog: b.apply_logged(prog, 1))
    for p, s in zip(params, start):
        assert_bitwise_equal(p, s, "restored")
    assert log.numel > 0  # the chain does not restore every element by itself
    # the fallback (plain runs on scratch copies, in small chunks across tensor boundaries) logs the same elements
    ref_params, _ = tensors(dtype)
    rb = hk.bind(ref_params, hessian=hessian, backend=backend)
    ref_log, ref_perturbed = run_chain(
        rb, MU[dtype], lambda prog: chunked_logged_run(rb.backend, rb.params, rb.hessian, rb.offsets, prog, 1, 1000))
    assert ref_log.numel == log.numel
    for a, c in zip(perturbed, ref_perturbed):
        assert_bitwise_equal(a, c, "perturbed")


@pytest.mark.skipif("triton" not in BACKEND_NAMES, reason="triton not available here")
@pytest.mark.parametrize("capacity", [1, 10])
def test_triton_log_overflow_falls_back_per_program(capacity):
    params, hessian = tensors(torch.float32)
    start = [p.clone() for p in params]
    b = hk.bind(params, hessian=hessian, backend="triton")
    log, _ = run_chain(b, 1e-3, lambda prog: BACKENDS["triton"].apply_logged(b.params, b.hessian, b.offsets, prog, 1,
                                                                            capacity=capacity))
    full_params, _ = tensors(torch.float32)
    fb = hk.bind(full_params, hessian=hessian, backend="cpu")
    full_log, _ = run_chain(fb, 1e-3, lambda prog: fb.apply_logged(prog, 1))
    assert log.numel == full_log.numel > capacity
    for p, s in zip(params, start):
        assert_bitwise_equal(p, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_advanced_log_fuses_restore_with_update(backend, dtype):
    """advance(update), then (rest of the chain + update) in one pass, then restore == restore, then update."""
    params, hessian = tensors(dtype)
    expected, h_expected = [p.clone() for p in params], [h.clone() for h in hessian]
    update = hk.Round([7, 7], [2, 3], [0.01, -0.02], [0.3, 0.1], weight_decay=1e-3)
    hk.replay_(expected, [update], hessian=h_expected, curvature_rule="gsq", backend=backend)
    b = hk.bind(params, hessian=hessian, curvature_rule="gsq", backend=backend)
    mu = MU[dtype]
    log = b.apply_logged(chain(b, mu), 1)
    b.apply(b.shift_program(7, 2, [-mu, -mu]))
    log.advance(b.program([update]))
    b.apply(b.program([hk.Round([7], [2], [-mu], update_hessian=False), update]))
    log.restore()
    for p, e in zip(params, expected):
        assert_bitwise_equal(p, e, "x")
    for h, e in zip(hessian, h_expected):
        assert_bitwise_equal(h, e, "H")


@pytest.mark.parametrize("rule", ["gsq", "stein"])
@pytest.mark.parametrize("n_chain", [0, 1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_finish_logged_equals_restore_then_update(backend, dtype, n_chain, rule):
    """finish_logged (the rest of the chain, the restore and an update that writes H, in one pass) == the chain, the
    restore, then the update; n_chain = 2: the rest of the chain is two rounds, 0: the chain already ran."""
    g = torch.Generator().manual_seed(3)
    # 40,001 elements: three chunks of the C++ kernel, so logs of several chunks are patched in
    params = [torch.randn(40001, generator=g).to(dtype), torch.randn(7, 3, generator=g).to(dtype)]
    hessian = [torch.rand(p.shape, generator=g) + 0.5 for p in params]
    mu = MU[dtype]
    update = hk.Round([7, 7], [2, 3], [0.01, -0.02], [0.3, 0.1], weight_decay=1e-3)
    expected, h_expected = [p.clone() for p in params], [h.clone() for h in hessian]
    hk.replay_(expected, [update], hessian=h_expected, curvature_rule=rule, backend=backend)
    b = hk.bind(params, hessian=hessian, curvature_rule=rule, backend=backend)
    log = b.apply_logged(chain(b, mu), 1)
    assert log.numel > 0
    applied = {0: [-mu, -mu, mu], 1: [-mu, -mu], 2: [-mu]}[n_chain]  # the chain's rounds run before the finish
    b.apply(b.shift_program(7, 2, applied))
    rest = [hk.Round([7], [2], [a], update_hessian=False) for a in [mu, mu, -mu][3 - n_chain:]]
    b.finish_logged(b.program(rest + [update]), log, n_chain)
    for p, e in zip(params, expected):
        assert_bitwise_equal(p, e, "x")
    for h, e in zip(hessian, h_expected):
        assert_bitwise_equal(h, e, "H")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_finish_logged_restore_only(backend, dtype):
    params, hessian = tensors(dtype)
    start = [p.clone() for p in params]
    b = hk.bind(params, hessian=hessian, backend=backend)
    mu = MU[dtype]
    log = b.apply_logged(chain(b, mu), 1)
    b.apply(b.shift_program(7, 2, [-mu, -mu]))
    b.finish_logged(b.shift_program(7, 2, [mu]), log, 1)
    for p, s in zip(params, start):
        assert_bitwise_equal(p, s, "restored")


@pytest.mark.skipif("cpu" not in BACKEND_NAMES, reason="the C++ backend is not built here")
def test_patched_run_refuses_a_log_of_other_tensors():
    params, _ = tensors(torch.float32, with_h=False)
    others, _ = tensors(torch.float32, with_h=False, seed=1)
    b, ob = hk.bind(params, backend="cpu"), hk.bind(others, backend="cpu")
    log = b.apply_logged(chain(b, 1e-3), 1)
    before = [o.clone() for o in others]
    with pytest.raises(ValueError, match="other tensors"):
        ob.finish_logged(ob.shift_program(7, 2, [-1e-3]), log, 1)
    for o, s in zip(others, before):
        assert_bitwise_equal(o, s, "unchanged")
    with pytest.raises(ValueError, match="n_chain"):
        b.finish_logged(b.shift_program(7, 2, [-1e-3]), log, 2)


def test_bind_checks_once_and_refuses_moved_tensors():
    params, _ = tensors(torch.float32, with_h=False)
    b = hk.bind(params, backend="cpu")
    assert b.matches(params) and not b.matches(params[:2])
    prog = chain(b, 1e-3)
    with pytest.raises(ValueError, match="n_apply"):
        b.apply_logged(prog, 0)
    with pytest.raises(ValueError, match="n_apply"):
        b.apply_logged(prog, prog.n_rounds)
    h_params, hessian = tensors(torch.float32)
    hb = hk.bind(h_params, hessian=hessian, curvature_rule="gsq", backend="cpu")
    with pytest.raises(ValueError, match="must not update H"):
        hb.apply_logged(hb.program([hk.Round([1], [0], [0.1], [0.1]), hk.Round([1], [0], [-0.1])]), 1)
    before = [p.clone() for p in params]
    params[1].set_(torch.zeros(5))  # moved: the binding no longer describes it
    assert not b.matches(params)
    with pytest.raises(RuntimeError, match="bind again"):
        b.apply(prog)
    for p, s in zip(params[::2], before[::2]):
        assert_bitwise_equal(p, s)
    with pytest.raises(TypeError):
        hk.bind(params, backend=3)
    with pytest.raises(ValueError, match="hessian is required"):
        hk.bind(params, curvature_rule="gsq")


def mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)


@pytest.mark.parametrize("cls", [ZOSGD, HiSo])
def test_step_builds_one_program_per_run_and_validates_once(cls, monkeypatch):
    """The Python tax: after the first step, a step builds only its update program (and the log's copy of it) and
    binds nothing; perturbations reuse re-seeded templates."""
    import hiso_kernels.bound as bound_module

    model, loss = mlp()
    opt = cls(model.parameters(), lr=0.01, num_directions=4, seed=1, backend="cpu")
    opt.step(loss)
    builds, binds = [], []
    real_build, real_init = bound_module.build_program, hk.BoundParams.__init__
    monkeypatch.setattr(bound_module, "build_program", lambda *a, **k: (builds.append(1), real_build(*a, **k))[1])
    monkeypatch.setattr(hk.BoundParams, "__init__",
                        lambda self, *a, **k: (binds.append(1), real_init(self, *a, **k))[1])
    for _ in range(3):
        opt.step(loss)
    assert not binds
    assert len(builds) <= 3 * 2  # per step: the fused (restore + update) program and the log's update program
    assert "cpu: in the kernel" in opt.restore_path


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_fused_step_equals_replay_and_counts_passes(difference, monkeypatch):
    """3P passes per central step (2P forward): P logged perturbations, P paired (-mu, -mu) passes, P - 1 restores and
    one fused restore + update; replay of the history gives the same bits."""
    model, loss = mlp()
    replica, _ = mlp()
    opt = ZOSGD(model.parameters(), lr=0.01, num_directions=3, difference=difference, seed=4, backend="cpu")
    calls = []
    for name in ("apply", "apply_logged", "finish_logged"):
        method = getattr(hk.BoundParams, name)
        monkeypatch.setattr(hk.BoundParams, name,
                            lambda self, *a, _m=method, _n=name, **k: (calls.append(_n), _m(self, *a, **k))[1])
    opt.step(loss)
    assert len(calls) == (9 if difference == "central" else 6) and calls.count("apply_logged") == 3
    assert calls.count("finish_logged") == 3  # every direction's last restore is patched into a pass
    for _ in range(3):
        opt.step(loss)
    ZOSGD(replica.parameters(), lr=0.01, num_directions=3, difference=difference, seed=4, backend="cpu").replay(
        opt.history)
    for a, c in zip(model.parameters(), replica.parameters()):
        assert_bitwise_equal(a.detach(), c.detach())
