"""The operations are torch.library custom ops with their mutated arguments declared, usable from torch.compile."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_bitwise_equal

import hiso_kernels as hk


@pytest.mark.parametrize(
    "name,mutated",
    [("perturb_", {"params"}), ("replay_", {"params", "hessian"}), ("directions", set())],
)
def test_registered_with_mutation_annotations(name, mutated):
    schema = getattr(torch.ops.hiso, name).default._schema
    got = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert got == mutated


def test_ops_callable_through_torch_ops():
    x = [torch.zeros(9)]
    torch.ops.hiso.perturb_(x, [], 5, 0.5, 0, 0, "gaussian", False, None, True)
    assert_bitwise_equal(x[0], 0.5 * hk.directions(5, 9))


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
    assert not torch.equal(list(eager.parameters())[0], list(compiled.parameters())[0])


def test_directions_under_compile_uses_fake_kernel():
    fn = torch.compile(lambda: hk.directions(3, 10) * 2, backend="aot_eager", fullgraph=True)
    assert_bitwise_equal(fn(), hk.directions(3, 10) * 2)
