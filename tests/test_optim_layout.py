"""Where parameters live and what a closure returns: parameters grouped by device (one kernel launch per device and
consecutive range) give the bits of one group; a closure may return micro-batch losses; the loss exchange and the
process-group option in one process. The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch
from test_optim import CONFIGS, X, Y, flat, loss_of, make_model

import hiso_kernels as hk
from helpers import assert_bitwise_equal
from hiso.optim import ZOSGD, HiSo
from hiso.optim.distributed import LossExchange, check_agreement, resolve_group, weights_digest
from hiso.optim.estimate import mean_loss
from hiso.optim.layout import Run, build_layout, split_runs


def alternate_devices(model):
    """A grouping key that puts consecutive tensors on two pretend devices, as device_map="auto" would."""
    keys = {id(p): f"dev{i % 2}" for i, p in enumerate(model.parameters())}
    return lambda t: keys[id(t)]


def count_launches(monkeypatch):
    """The number of tensors of every kernel call of a step (the optimizers run bound calls, hk.BoundParams) and of
    a replay (hk.replay_)."""
    calls = []
    real = hk.replay_
    monkeypatch.setattr(hk, "replay_", lambda params, *a, **k: (calls.append(len(params)), real(params, *a, **k))[1])
    for name in ("apply", "apply_logged"):
        method = getattr(hk.BoundParams, name)
        monkeypatch.setattr(hk.BoundParams, name,
                            lambda self, *a, _m=method, **k: (calls.append(len(self.params)), _m(self, *a, **k))[1])
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("chunk", [1 << 20, 37])
def test_two_device_groups_give_the_bits_of_one(name, chunk, monkeypatch):
    cls, kw = CONFIGS[name]
    one, two = make_model(), make_model()
    opt1 = cls(one.parameters(), lr=0.05, seed=3, restore_chunk=chunk, **kw)
    opt2 = cls(two.parameters(), lr=0.05, seed=3, restore_chunk=chunk, **kw)
    opt2.device_of = alternate_devices(two)
    for _ in range(3):
        opt1.step(loss_of(one))
    calls = count_launches(monkeypatch)
    for _ in range(3):
        opt2.step(loss_of(two))
    assert max(calls) == 1  # every launch covered one tensor: the four tensors alternate between the two "devices"
    assert_bitwise_equal(flat(two), flat(one))
    assert opt1.history == opt2.history
    if cls is HiSo:
        for a, b in zip(one.parameters(), two.parameters()):
            assert_bitwise_equal(opt1.state[a]["hessian"], opt2.state[b]["hessian"])


def test_bf16_stochastic_rounding_by_device_groups():
    one, two = make_model(torch.bfloat16), make_model(torch.bfloat16)
    opt1 = ZOSGD(one.parameters(), lr=0.1, mu=1e-2, stochastic_rounding=True, seed=4)
    opt2 = ZOSGD(two.parameters(), lr=0.1, mu=1e-2, stochastic_rounding=True, seed=4)
    opt2.device_of = alternate_devices(two)
    for _ in range(3):
        opt1.step(loss_of(one))
        opt2.step(loss_of(two))
    assert_bitwise_equal(flat(two), flat(one))


def test_split_runs():
    ts = [torch.zeros(3), torch.zeros(2), torch.zeros(0), torch.zeros(4), torch.zeros(1)]
    assert split_runs(ts, [0, 3, 5, 5, 9]) == [Run(0, 2, 0), Run(3, 5, 5)]  # the empty tensor is in no run
    assert split_runs(ts, [0, 10, 12, 12, 16]) == [Run(0, 1, 0), Run(1, 2, 10), Run(3, 5, 12)]  # gap at 3 -> 10
    key = {id(t): k for t, k in zip(ts, "aabba")}
    assert split_runs(ts, [0, 3, 5, 5, 9], key=lambda t: key[id(t)]) == [Run(0, 2, 0), Run(3, 4, 5), Run(4, 5, 9)]
    layout = build_layout([{"params": [torch.zeros(2, 3, requires_grad=True), torch.zeros(5, requires_grad=False)]},
                           {"params": [torch.zeros(4, requires_grad=True)]}])
    assert layout.offsets == [0, 6] and layout.groups == [(0, 1), (1, 2)] and layout.numel == 10
    assert not layout.sharded and [len(r) for r in layout.runs] == [1, 1]


def test_closure_may_return_micro_batch_losses():
    """A list of losses is one step on their fsum mean: the same bits as returning that mean as a float."""
    cls, kw = CONFIGS["hiso_stein"]
    a, b = make_model(), make_model()
    opt_a, opt_b = cls(a.parameters(), lr=0.05, seed=1, **kw), cls(b.parameters(), lr=0.05, seed=1, **kw)

    def parts(model):
        with torch.no_grad():
            return [torch.nn.functional.cross_entropy(model(X[i::3]), Y[i::3]) for i in range(3)]

    for _ in range(3):
        loss_a = opt_a.step(lambda: parts(a))
        loss_b = opt_b.step(lambda: mean_loss([float(v) for v in parts(b)]))
        assert loss_a == loss_b
    assert_bitwise_equal(flat(a), flat(b))


def test_mean_loss_does_not_depend_on_order():
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-8, 8, (50,), generator=g)
    values = (torch.rand(50, generator=g, dtype=torch.float64) * scale).tolist()
    orders = {mean_loss([values[i] for i in torch.randperm(50, generator=g).tolist()]) for _ in range(20)}
    naive = {sum(values[i] for i in torch.randperm(50, generator=g).tolist()) / 50 for _ in range(20)}
    assert len(orders) == 1 and len(naive) > 1  # a plain sum would depend on the order of the ranks' losses
    assert orders.pop() == math.fsum(values) / 50


@pytest.mark.parametrize("closure_value,exc", [(lambda calls: [1.0, 2.0] if calls == 1 else [1.0], ValueError),
                                                (lambda calls: [], ValueError),
                                                (lambda calls: [1.0, "x"], TypeError)])
def test_bad_micro_batch_lists_change_nothing(closure_value, exc):
    model = make_model()
    opt = ZOSGD(model.parameters(), lr=0.1, seed=2)
    before = flat(model).clone()
    calls = []
    with pytest.raises(exc):
        opt.step(lambda: (calls.append(1), closure_value(len(calls)))[1])
    assert_bitwise_equal(flat(model), before)
    assert opt.steps_taken == 0 and not opt.history


def test_process_group_option():
    model = make_model()
    with pytest.raises(TypeError):
        ZOSGD(model.parameters(), process_group="world")
    assert resolve_group("auto") is None and resolve_group(False) is None
    opt = ZOSGD(model.parameters(), process_group=None)  # the default group, which does not exist here
    before = flat(model).clone()
    with pytest.raises(ValueError, match="not initialised"):
        opt.step(loss_of(model))
    assert_bitwise_equal(flat(model), before)


@pytest.fixture
def world_of_one():
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not initialised yet")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_one_rank_is_one_process(world_of_one):
    """A group of one rank does not communicate and gives the bits of no group at all."""
    assert resolve_group("auto") is None and resolve_group(world_of_one) is None
    a, b = make_model(), make_model()
    opt_a = HiSo(a.parameters(), lr=0.05, seed=5)
    opt_b = HiSo(b.parameters(), lr=0.05, seed=5, process_group=False)
    for _ in range(2):
        opt_a.step(loss_of(a))
        opt_b.step(loss_of(b))
    assert opt_a.last_exchange_bytes == 0
    assert_bitwise_equal(flat(a), flat(b))


def test_loss_exchange_over_one_rank(world_of_one):
    ex = LossExchange(world_of_one, seed=7, step=0)
    assert ex([[1.0, 2.0], [3.0, 5.0]]) == [1.5, 4.0]
    assert ex.bytes_sent == 40 + 8 * 4  # header, then 2 evaluations x 2 micro-batch losses
    with pytest.raises(ValueError, match="non-finite"):
        LossExchange(world_of_one, 7, 0)([[float("nan")]])
    check_agreement(world_of_one, {"layout": ((2, 3),), "weights": weights_digest([torch.ones(3)])})
    assert weights_digest([torch.ones(3)]) != weights_digest([torch.tensor([1.0, 1.0, -1.0])])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parameters_on_cpu_and_gpu_give_the_bits_of_one_device():
    """A model split over two real devices (cuda and cpu), each group launched on its own device."""
    one, two = make_model(), make_model()
    two[2].cuda()

    def loss_on_cpu(model):  # the same arithmetic for both models: the loss on CPU copies of the weights
        def f():
            ref = make_model()
            with torch.no_grad():
                for q, p in zip(ref.parameters(), model.parameters()):
                    q.copy_(p.cpu())
            return loss_of(ref)()
        return f

    opt1 = HiSo(one.parameters(), lr=0.05, seed=6)
    opt2 = HiSo(two.parameters(), lr=0.05, seed=6)
    for _ in range(3):
        opt1.step(loss_on_cpu(one))
        opt2.step(loss_on_cpu(two))
    assert_bitwise_equal(torch.cat([p.detach().cpu().reshape(-1) for p in two.parameters()]), flat(one))
