"""ZO-SGD and HiSo as torch.optim optimizers: the update equals the design's equations (evaluated with the torch
reference), replay reproduces the trainer bit for bit, state round-trips, frozen parameters stay untouched, and a bad
closure leaves the parameters exactly as they were."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import hiso_kernels as hk
from helpers import assert_bitwise_equal
from hiso.optim import ZOSGD, HiSo, ZOStep

torch.manual_seed(0)
X = torch.randn(64, 12)
Y = (X[:, :3].sum(1) > 0).long()


def make_model(dtype=torch.float32, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).to(dtype)


def loss_of(model):
    def f():
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(X.to(next(model.parameters()).dtype)).float(), Y)
    return f


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


CONFIGS = {
    "zosgd": (ZOSGD, dict(num_directions=3)),
    "zosgd_forward": (ZOSGD, dict(difference="forward", num_directions=2, weight_decay=0.1)),
    "hiso": (HiSo, dict(num_directions=2)),
    "hiso_stein": (HiSo, dict(curvature_rule="stein", beta=0.99, h_min=1e-2)),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_equals_design_equations(name):
    """One step, evaluated by hand from materialised directions (reference backend) and the losses."""
    cls, kw = CONFIGS[name]
    model = make_model()
    ref = copy.deepcopy(model)
    lr, mu, seed = 0.05, 1e-3, 2**40 + 17
    opt = cls(model.parameters(), lr=lr, mu=mu, backend="reference", **kw)
    opt.step(loss_of(model), seed=seed)

    x = flat(ref)
    n = x.numel()
    P = opt.num_directions
    H = torch.ones(n)
    z = [hk.directions(seed, n, direction=p, backend="reference") for p in range(P)]

    def f_at(vec):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vec, ref.parameters())
            return float(loss_of(ref)())

    c, d = [], []
    f0 = f_at(x)
    for p in range(P):
        dp = (mu * z[p]) / torch.sqrt(H)
        fp, fm = f_at(x + dp), f_at(x - dp)
        c.append((fp - fm) / (2 * mu) if opt.difference == "central" else (fp - f0) / mu)
        d.append((fp + fm - 2 * f0) / (2 * mu * mu))
    assert list(opt.history[0].scalars) == pytest.approx(c, rel=1e-3, abs=1e-3)
    # the update itself, with the recorded scalars, in the kernel's exact operation order
    c = opt.history[0].scalars
    acc = torch.zeros(n)
    for p in range(P):
        acc = acc + hk.spec.to_f32(lr * c[p] / P) * z[p]
    wd = hk.spec.to_f32(lr * kw.get("weight_decay", 0.0))
    expected = x - (acc / torch.sqrt(H) + wd * x)
    assert_bitwise_equal(flat(model), expected)
    if cls is HiSo:
        h = torch.cat([opt.state[p]["hessian"].reshape(-1) for p in model.parameters()])
        if opt.curvature_rule == "gsq":
            g = sum(hk.spec.to_f32(c[p] / P) * z[p] for p in range(P)) / torch.sqrt(H)
            v = g * g
        else:
            v = H * sum(hk.spec.to_f32(opt.history[0].second_differences[p] / P) * (z[p] * z[p] - 1) for p in range(P))
        hn = hk.spec.to_f32(opt.beta) * H + hk.spec.to_f32(1 - opt.beta) * v
        assert torch.allclose(h, hn.clamp_min(opt.h_min), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_replay_reproduces_training_bit_for_bit(name):
    cls, kw = CONFIGS[name]
    model, replica = make_model(), make_model()
    groups = lambda m: [  # noqa: E731 - two groups with their own lr and weight decay
        {"params": [m[0].weight, m[2].weight], "weight_decay": 0.01},
        {"params": [m[0].bias, m[2].bias], "lr": 0.02},
    ]
    opt = cls(groups(model), lr=0.05, seed=9, **kw)
    for _ in range(25):
        opt.step(loss_of(model))
    rep = cls(groups(replica), lr=0.05, seed=9, **kw)
    rep.replay(opt.history)
    for a, b in zip(model.parameters(), replica.parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), name)
    if cls is HiSo:
        for a, b in zip(model.parameters(), replica.parameters()):
            assert_bitwise_equal(opt.state[a]["hessian"], rep.state[b]["hessian"])
    assert rep.steps_taken == opt.steps_taken and rep.next_seed() == opt.next_seed()


def test_replay_across_many_steps_is_one_pass_per_group(monkeypatch):
    """The replica applies 40 steps with one kernel call per parameter group."""
    model, replica = make_model(), make_model()
    opt = HiSo(model.parameters(), lr=0.05, seed=2)
    for _ in range(40):
        opt.step(loss_of(model))
    calls = []
    real = hk.replay_
    monkeypatch.setattr(hk, "replay_", lambda *a, **k: (calls.append(len(a[1])), real(*a, **k)))
    HiSo(replica.parameters(), lr=0.05, seed=2).replay(opt.history)
    assert calls == [40]
    assert_bitwise_equal(flat(model), flat(replica))


def test_loss_decreases_and_state_dict_round_trip():
    model = make_model()
    opt = HiSo(model.parameters(), lr=0.1, num_directions=4, seed=3)
    f = loss_of(model)
    start = float(f())
    for _ in range(150):
        opt.step(f)
    assert float(f()) < 0.8 * start
    # interrupt, save, continue on a copy: identical to continuing the original
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(10):
        opt.step(f)
    other = make_model()
    other.load_state_dict(saved_model)
    opt2 = HiSo(other.parameters(), lr=0.1, num_directions=4, seed=123)
    opt2.load_state_dict(saved_opt)
    for _ in range(10):
        opt2.step(loss_of(other))
    assert_bitwise_equal(flat(model), flat(other))


def test_frozen_parameters_untouched():
    model = make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = ZOSGD(model.parameters(), lr=0.1)
    before = model[2].weight.detach().clone()
    for _ in range(3):
        opt.step(loss_of(model))
    assert_bitwise_equal(model[0].weight.detach(), frozen)
    assert not torch.equal(model[2].weight.detach(), before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sr", [False, True])
def test_low_precision_models_train(dtype, sr):
    model = make_model(dtype)
    opt = ZOSGD(model.parameters(), lr=0.1, mu=1e-2, num_directions=4, stochastic_rounding=sr, seed=4)
    f = loss_of(model)
    start = float(f())
    for _ in range(100):
        opt.step(f)
    assert float(f()) < 0.9 * start
    assert all(p.dtype == dtype for p in model.parameters())


class BadClosure:
    def __init__(self, model, fail_at, value):
        self.model, self.fail_at, self.value, self.calls = model, fail_at, value, 0

    def __call__(self):
        self.calls += 1
        if self.calls == self.fail_at:
            if isinstance(self.value, Exception):
                raise self.value
            return self.value
        return loss_of(self.model)()


@pytest.mark.parametrize("name,fail_at", [("zosgd", 1), ("zosgd", 2), ("hiso", 2), ("zosgd_forward", 1),
                                          ("zosgd_forward", 2), ("hiso_stein", 1), ("hiso_stein", 3)])
@pytest.mark.parametrize(
    "value,exc",
    [(torch.tensor(float("nan")), ValueError), (float("inf"), ValueError), (torch.ones(3), ValueError),
     ("loss", TypeError), (RuntimeError("boom"), RuntimeError)],
    ids=["nan", "inf", "vector", "string", "raises"],
)
def test_bad_closure_restores_exactly(name, fail_at, value, exc):
    cls, kw = CONFIGS[name]
    model = make_model()
    opt = cls(model.parameters(), lr=0.1, seed=5, **kw)
    opt.step(loss_of(model))  # H is not all ones any more
    before = [p.detach().clone() for p in model.parameters()]
    h_before = [opt.state[p]["hessian"].clone() for p in model.parameters()] if cls is HiSo else []
    steps, hist = opt.steps_taken, len(opt.history)
    with pytest.raises(exc):
        opt.step(BadClosure(model, fail_at, value))
    for a, b in zip(model.parameters(), before):
        assert_bitwise_equal(a.detach(), b)
    for p, h in zip(model.parameters(), h_before):
        assert_bitwise_equal(opt.state[p]["hessian"], h)
    assert opt.steps_taken == steps and len(opt.history) == hist


def test_exact_restore_is_needed_in_fp32():
    """Without the undo log the paired perturbations still leave a few elements one ulp off; with it none."""
    model = make_model()
    x0 = flat(model).clone()
    opt = ZOSGD(model.parameters(), lr=0.0, exact_restore=False, seed=1)
    for _ in range(20):
        opt.step(loss_of(model))
    drift = (flat(model) != x0).sum().item()
    model2 = make_model()
    opt2 = ZOSGD(model2.parameters(), lr=0.0, seed=1)
    for _ in range(20):
        opt2.step(loss_of(model2))
    assert drift > 0
    assert_bitwise_equal(flat(model2), x0)


def test_invalid_arguments():
    m = make_model()
    for kwargs in (dict(lr=-1.0), dict(mu=0.0), dict(num_directions=0), dict(difference="backward"),
                   dict(distribution="uniform"), dict(seed=-1), dict(lr=math.nan)):
        with pytest.raises(ValueError):
            ZOSGD(m.parameters(), **kwargs)
    with pytest.raises(ValueError):
        HiSo(m.parameters(), beta=1.5)
    with pytest.raises(ValueError):
        HiSo(m.parameters(), curvature_rule="stein", difference="forward")
    opt = ZOSGD(m.parameters())
    with pytest.raises(ValueError):
        opt.step()
    with pytest.raises(TypeError):
        opt.replay([("not", "a", "record")])
    with pytest.raises(ValueError):
        opt.replay([ZOStep(1, (0.1,), None, (0.1, 0.2), (0.0, 0.0))])
