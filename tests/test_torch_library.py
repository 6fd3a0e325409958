"""The operations are torch.library custom ops with their mutated arguments declared, checked with
``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch) and usable from torch.compile."""

from __future__ import annotations

import pytest
import torch

import hiso_kernels as hk
from helpers import assert_bitwise_equal
from hiso_kernels import Round
from hiso_kernels._program import build_program


@pytest.mark.parametrize(
    "name,mutated",
    [("apply_program_", {"params", "hessian"}), ("perturb_", {"params"}), ("directions", set())],
)
def test_registered_with_mutation_annotations(name, mutated):
    schema = getattr(torch.ops.hiso, name).default._schema
    got = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert got == mutated


def _program_args(params, hessian, rounds, rule, offset=0, sr=False, backend=None):
    prog = build_program(rounds, distribution="gaussian", rule=rule, beta=0.9, h_min=1e-6, stochastic_rounding=sr)
    return (params, hessian, *prog.tensors(), offset, int(prog.distribution), int(prog.rule), prog.beta,
            prog.one_minus_beta, prog.h_min, backend, True)


def _state():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, generator=g), torch.randn(5, 3, generator=g).to(torch.bfloat16)]
    hessian = [torch.rand(37, generator=g) + 0.5, torch.rand(5, 3, generator=g) + 0.5]
    return params, hessian


def _opcheck_cases():
    p, h = _state()
    rounds = [Round([7, 7], [0, 1], [0.1, -0.2], [1.0, 0.5]), Round([9], [0], [0.05], [0.25], weight_decay=1e-3)]
    return {
        "apply_program_ gsq": (torch.ops.hiso.apply_program_.default, _program_args(p, h, rounds, "gsq", 3, True)),
        "apply_program_ no H": (torch.ops.hiso.apply_program_.default,
                                _program_args(_state()[0], [], [Round([5], [2], [0.3])], "none")),
        "apply_program_ stein": (torch.ops.hiso.apply_program_.default,
                                 _program_args(*_state(), rounds, "stein", 2**33)),
        "perturb_": (torch.ops.hiso.perturb_.default, (_state()[0], [], 5, 0.5, 0, 0, "gaussian", False, None, True)),
        "perturb_ with H": (torch.ops.hiso.perturb_.default,
                            (*_state(), 2**40, -0.25, 3, 17, "rademacher", True, None, True)),
        "directions": (torch.ops.hiso.directions.default, (3, 10, 1, 5, "gaussian", torch.device("cpu"), None)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    """torch.library.opcheck's schema (declared mutations only), fake-tensor, autograd-registration and AOT
    dispatch tests, as bitsandbytes and torchao run them for their ops."""
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_apply_program_op_checks_a_direct_call():
    """A direct torch.ops call with an inconsistent program raises before anything is written."""
    p, h = _state()
    before = [t.clone() for t in p + h]
    args = list(_program_args(p, h, [Round([1], [0], [0.1], [1.0])], "gsq"))
    bad_start = torch.tensor([0, 2], dtype=torch.int64)  # one round that claims two terms
    with pytest.raises(ValueError, match="round_start"):
        torch.ops.hiso.apply_program_(*args[:4], bad_start, *args[5:])
    args[2] = args[2].to(torch.int32)  # seeds of the wrong dtype
    with pytest.raises(TypeError, match="seeds"):
        torch.ops.hiso.apply_program_(*args)
    for a, b in zip(p + h, before):
        assert_bitwise_equal(a, b)


def test_ops_callable_through_torch_ops():
    x = [torch.zeros(9)]
    torch.ops.hiso.perturb_(x, [], 5, 0.5, 0, 0, "gaussian", False, None, True)
    assert_bitwise_equal(x[0], 0.5 * hk.directions(5, 9))
    y = [torch.zeros(9)]
    torch.ops.hiso.apply_program_(*_program_args(y, [], [Round([5], [0], [-0.5])], "none"))
    assert_bitwise_equal(y[0], x[0])


def test_public_functions_pass_one_packed_program():
    """The program's seven arrays are views of one buffer (one host-to-device copy on a GPU)."""
    prog = build_program([Round([1, 2], [0, 1], [0.1, 0.2], [0.3, 0.4]), Round([3], [0], [0.5])],
                         distribution="gaussian", rule="gsq", beta=0.9, h_min=1e-8)
    storages = {t.untyped_storage().data_ptr() for t in prog.tensors()}
    assert len(storages) == 1
    assert prog.seeds.tolist() == [1, 2, 3] and prog.round_start.tolist() == [0, 2, 3]
    assert prog.coef_h.tolist() == pytest.approx([0.3, 0.4, 0.0]) and prog.round_rseed.tolist() == [-1, -1]


def test_device_copies_are_cached_by_content():
    """A GPU backend gets a program's arrays with one copy of the packed buffer, and a program with the same content
    (on the same device and stream) from a cache. The CPU 'copy' exercises the same code."""
    import dataclasses

    from hiso_kernels._program import _DevicePrograms

    cache = _DevicePrograms()
    cpu = torch.device("cpu")

    def prog(seed):
        return build_program([Round([seed, 5], [0, 1], [0.5, 0.25], [1.0, 2.0])], distribution="rademacher",
                             rule="gsq", beta=0.9, h_min=1e-6, stochastic_rounding=True)

    first = cache.get(prog(1), cpu)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors(), prog(1).tensors()))
    assert first.rule == prog(1).rule and first.beta == prog(1).beta and len(cache._data) == 1
    cache.get(prog(1), cpu)
    assert len(cache._data) == 1  # same content: served from the cache
    cache.get(prog(2), cpu)
    assert len(cache._data) == 2
    loose = dataclasses.replace(prog(3), seeds=prog(3).seeds.clone())  # separate tensors, as a direct op call
    assert all(torch.equal(a, b) for a, b in zip(cache.get(loose, cpu).tensors(), prog(3).tensors()))
    assert len(cache._data) == 2


def test_torch_compile_of_a_mezo_step_matches_eager():
    """A MeZO step (perturb, loss, perturb back, loss, restore, update) compiled with torch.compile."""
    torch.manual_seed(0)
    data = torch.randn(16, 8)
    target = torch.randn(16, 1)

    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(8, 1)

    def step(model, seed: int):
        params = list(model.parameters())
        with torch.no_grad():
            hk.perturb_(params, seed, 1e-3)
            lp = torch.nn.functional.mse_loss(model(data), target)
            hk.perturb_(params, seed, -2e-3)
            lm = torch.nn.functional.mse_loss(model(data), target)
            hk.perturb_(params, seed, 1e-3)
        return (lp - lm) / 2e-3

    eager, compiled = make(), make()
    c_eager = step(eager, 7)
    c_comp = torch.compile(step, backend="aot_eager")(compiled, 7)
    assert torch.allclose(c_eager, c_comp)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert_bitwise_equal(a.detach(), b.detach())
    hk.zo_update_(list(eager.parameters()), 7, 0, [0.1 * float(c_eager)])
    assert not torch.equal(next(iter(eager.parameters())), next(iter(compiled.parameters())))


def test_torch_compile_of_a_hiso_round_matches_eager():
    def rnd(params, hessian):
        with torch.no_grad():
            hk.hiso_round_(params, hessian, [3, 3], [0, 1], [0.1, -0.1], [0.5, 0.25], beta=0.9)
            return params[0].sum()

    a_p, a_h = _state()
    b_p, b_h = _state()
    rnd(a_p, a_h)
    torch.compile(rnd, backend="aot_eager")(b_p, b_h)
    for x, y in zip(a_p + a_h, b_p + b_h):
        assert_bitwise_equal(x, y)


def test_directions_under_compile_uses_fake_kernel():
    fn = torch.compile(lambda: hk.directions(3, 10) * 2, backend="aot_eager", fullgraph=True)
    assert_bitwise_equal(fn(), hk.directions(3, 10) * 2)
