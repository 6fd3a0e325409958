"""The curvature rules with Python state (issue 15, hiso.optim.curvature): their formulas, bit-exact replay in the
optimizer and across checkpoints, bytes per reply, validation, and the claim statistics of the harness."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch

import hiso_kernels as hk
from helpers import assert_bitwise_equal
from hiso.fl import ClientReply, FLConfig, Replica, RoundRecord
from hiso.optim import HiSo
from hiso.optim import curvature as curv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "curvature"))
import claim_stats as cs  # noqa: E402

RULES = ["gsq", "scalar", "stein", "stein-tensor", "absdelta", "absdelta-lagged"]
X = torch.randn(24, 12, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(1))


def net(seed=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def loss_of(model):
    return lambda: torch.nn.functional.cross_entropy(model(X), Y)


def lr_of(rule):
    return 1e-3 if rule in ("absdelta", "absdelta-lagged", "stein-tensor") else 0.05


# ---------------------------------------------------------------- formulas
def test_absdelta_h_follows_its_definition():
    st = curv.CurvatureState("absdelta", [10, 6])
    assert st.h_init == "first-round" and st.beta == 0.9 and st.divisor() == 1.0 and st.round_kernel_rule() == "none"
    st.advance(5, [1.0, -2.0], [3.0, -5.0])  # first round: h = 2 mean |Delta| / d
    assert st.h == [2 * (3 + 5) / (2 * 16)] and st.divisor() == st.h[0]
    st.advance(6, [1.0, 1.0], [-1.0, 1.0])
    assert st.h[0] == pytest.approx(0.9 * 0.5 + 0.1 * 2 * 1 / 16)


def test_absdelta_divides_each_step_by_the_h_after_its_own_update_and_lagged_by_the_h_before():
    records = [(5, [1.0, -2.0], [3.0, -5.0]), (6, [1.0, 1.0], [-1.0, 1.0]), (7, [0.5, 0.5], [8.0, 2.0])]
    hs = []  # h after each record, the same for both orders
    ref = curv.CurvatureState("absdelta-lagged", [10, 6])
    for rec in records:
        ref.advance(*rec)
        hs.append(ref.h[0])
    for rule, expected in [("absdelta", hs), ("absdelta-lagged", [1.0, *hs[:-1]])]:
        st = curv.CurvatureState(rule, [10, 6])
        segments = curv.plan(st, records, lambda rec: rec)
        assert [(seg.kernel_rule, seg.fill) for seg in segments] == [("none", None)]  # one kernel call, no H
        assert [dv for _, dv in segments[0].items] == expected, rule
        assert st.h == [hs[-1]] and st.rounds == 3
    # gsq (its probes depend on H) keeps the lagged order: the first round runs with H = 1 and no kernel update
    segments = curv.plan(curv.CurvatureState("gsq", [10, 6], h_init="first-round"), records, lambda rec: rec)
    assert [seg.kernel_rule for seg in segments] == ["none", "gsq"] and segments[0].fill is not None


def test_a_local_step_divides_by_its_own_curvature_on_a_copy_only_with_curvature_first():
    first, lagged = curv.CurvatureState("absdelta", [10, 6]), curv.CurvatureState("absdelta-lagged", [10, 6])
    assert first.curvature_first and not lagged.curvature_first
    for st in (first, lagged):
        st.advance(5, [1.0, -2.0], [3.0, -5.0])
    h = first.h[0]
    local = copy.deepcopy(first)
    assert local.step_divisor(6, [1.0, 1.0], [-1.0, 1.0]) == pytest.approx(0.9 * h + 0.1 * 2 * 1 / 16)
    assert first.h == [h] and first.rounds == 1  # the shared state did not move
    local_lagged = copy.deepcopy(lagged)
    assert local_lagged.step_divisor(6, [1.0, 1.0], [-1.0, 1.0]) == h and local_lagged.rounds == 1


def test_a_clients_second_local_step_sees_the_first_divided_by_its_own_h():
    """K = 2 from round 0: the first local update divides by the h of the first step's own second differences
    (curvature first), which equals the lagged rule's update (divisor 1) at lr / h_0."""
    from hiso.fl.protocol import run_local_steps

    def local(rule, lr):
        model = net()
        config = FLConfig(method="hiso", lr=lr, local_steps=2, num_directions=3, curvature_rule=rule)
        return run_local_steps(Replica(model.parameters(), config), [11, 12], lambda: loss_of(model))

    first, lagged = local("absdelta", 1e-3), local("absdelta-lagged", 1e-3)
    assert first[0][0] == lagged[0][0] and first[0][1] != lagged[0][1]  # same first probes, other second ones
    state = curv.CurvatureState("absdelta", [p.numel() for p in net().parameters()])
    h0 = state.step_divisor(11, first[0][0], first[1][0])
    rescaled = local("absdelta-lagged", 1e-3 / h0)
    assert first[0][1] == pytest.approx(rescaled[0][1], rel=1e-4)


def test_the_first_absdelta_step_is_the_lagged_one_divided_by_the_first_rounds_h():
    moves = {}
    for rule in ("absdelta", "absdelta-lagged"):
        model = net()
        x0 = [p.detach().clone() for p in model.parameters()]
        opt = HiSo(model.parameters(), lr=1e-3, curvature_rule=rule, num_directions=3, seed=4)
        opt.step(loss_of(model))
        moves[rule] = torch.cat([(p.detach() - a).flatten() for p, a in zip(model.parameters(), x0)])
        h0 = opt.curvature_state().h[0]
    assert h0 != 1.0
    # each move is a difference of fp32 weights of magnitude < 1: rounded to about 6e-8 each
    torch.testing.assert_close(moves["absdelta"] * h0, moves["absdelta-lagged"], rtol=1e-3, atol=2e-7)
    assert moves["absdelta-lagged"].abs().max() > 1e-4


def test_scalar_rule_is_gsq_with_one_h():
    st = curv.CurvatureState("scalar", [10, 6], h_init="ones")
    fill = st.advance(1, [2.0, -4.0], None)
    v = ((2 / 2) ** 2 + (4 / 2) ** 2) / 1.0
    assert st.h == [pytest.approx(0.95 + 0.05 * v)] and fill == [st.h[0]] * 2 and st.divisor() == 1.0


def test_stein_tensor_energy_is_exact_and_the_update_matches_float64():
    st = curv.CurvatureState("stein-tensor", [300, 77], h_init="ones")
    u = hk.directions(11, 377, direction=1).double()
    for i, (off, n) in enumerate([(0, 300), (300, 77)]):
        ref = float((u[off:off + n] ** 2).sum()) - n
        assert st._energy_excess(11, 1, i) == pytest.approx(ref, abs=n * 2.0 ** -32)
    st.advance(11, [0.1, 0.2], [4.0, -1.0])
    u0 = hk.directions(11, 377, direction=0).double()
    excess = [[float((d[a:b] ** 2).sum()) - (b - a) for a, b in ((0, 300), (300, 377))] for d in (u0, u)]
    raw = [0.99 + 0.01 * (4.0 * excess[0][t] / n - 1.0 * excess[1][t] / n) / 2 for t, n in enumerate((300, 77))]
    hbar = (300 * raw[0] + 77 * raw[1]) / 377
    assert st.h == pytest.approx([max(r, 0.1 * hbar) for r in raw], rel=1e-9)


def test_first_round_init_sets_h_to_the_rounds_level():
    for rule, level in [("gsq", (3 / 2) ** 2 + (1 / 2) ** 2), ("stein", 2 * (2 + 6) / (2 * 16))]:
        st = curv.CurvatureState(rule, [10, 6], h_init="first-round")
        assert st.round_kernel_rule() == "none"
        fill = st.advance(1, [3.0, 1.0], [2.0, -6.0])
        assert fill == [level, level] and st.round_kernel_rule() == rule
        assert st.advance(2, [3.0, 1.0], [2.0, -6.0]) is None  # then the kernels update H


@pytest.mark.parametrize("bad", [dict(rule="nope"), dict(rule="absdelta", difference="forward"),
                                 dict(rule="stein-tensor", difference="forward"), dict(rule="gsq", h_init="zeros")])
def test_bad_rules_are_rejected(bad):
    with pytest.raises(ValueError):
        curv.check_rule(bad["rule"], bad.get("difference", "central"), bad.get("h_init"))
    with pytest.raises(ValueError):
        FLConfig(curvature_rule=bad["rule"], difference=bad.get("difference", "central"), h_init=bad.get("h_init"))


def test_load_dict_rejects_other_rules_and_leaves_state():
    st = curv.CurvatureState("absdelta", [4])
    st.advance(1, [1.0], [2.0])
    before = st.to_dict()
    for bad in [dict(rule="scalar", rounds=1, h=[1.0]), dict(rule="absdelta", rounds=1, h=[float("nan")])]:
        with pytest.raises(ValueError):
            st.load_dict(bad)
        assert st.to_dict() == before


# ---------------------------------------------------------------- the optimizer: replay and checkpoints
@pytest.mark.parametrize("rule", RULES)
def test_optimizer_replay_and_resume_are_bit_exact(rule):
    model = net()
    opt = HiSo(model.parameters(), lr=lr_of(rule), curvature_rule=rule, num_directions=3, seed=4)
    for _ in range(3):
        opt.step(loss_of(model))
    ckpt = copy.deepcopy(opt.state_dict())  # torch returns live state tensors
    for _ in range(3):
        opt.step(loss_of(model))
    # a replica replays the six records from the initial weights
    rep_model = net()
    rep = HiSo(rep_model.parameters(), lr=lr_of(rule), curvature_rule=rule, num_directions=3, seed=4)
    rep.replay(opt.history)
    for a, b in zip(rep_model.parameters(), model.parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), rule)
    assert rep.curvature_state().to_dict() == opt.curvature_state().to_dict()
    # resuming at step 3 from the checkpoint and the weights of then gives the same steps
    res_model = net()
    res = HiSo(res_model.parameters(), lr=lr_of(rule), curvature_rule=rule, num_directions=3, seed=4)
    res.replay(opt.history[:3])
    res2_model = net()
    res2 = HiSo(res2_model.parameters(), lr=lr_of(rule), curvature_rule=rule, num_directions=3, seed=4)
    with torch.no_grad():
        for a, b in zip(res2_model.parameters(), res_model.parameters()):
            a.copy_(b)
    res2.load_state_dict(ckpt)
    for _ in range(3):
        res2.step(loss_of(res2_model))
    for a, b in zip(res2_model.parameters(), model.parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), f"{rule} resumed")
    assert res2.curvature_state().to_dict() == opt.curvature_state().to_dict()
    if rule in curv.SCALAR_STATE_RULES:
        assert opt.curvature_state().h != [1.0] * len(opt.curvature_state().h)  # the state moved


def test_absdelta_has_no_h_tensor_and_other_rule_checkpoints_are_refused():
    model = net()
    opt = HiSo(model.parameters(), lr=1e-3, curvature_rule="absdelta")
    opt.step(loss_of(model))
    assert all("hessian" not in s for s in opt.state.values())
    other = HiSo(net().parameters(), lr=1e-3, curvature_rule="scalar")
    with pytest.raises(ValueError, match="curvature_rule"):
        other.load_state_dict(opt.state_dict())


# ---------------------------------------------------------------- the protocol
def test_bytes_per_reply_one_float32_per_direction_for_second_difference_rules():
    k, p = 2, 5
    plain = len(ClientReply(0, 1, ((0.5,) * p,) * k).encode())
    with_delta = len(ClientReply(0, 1, ((0.5,) * p,) * k, ((1.0,) * p,) * k).encode())
    assert with_delta - plain == 4 * k * p
    for rule, sends in [("gsq", False), ("scalar", False), ("stein", True), ("stein-tensor", True),
                        ("absdelta", True), ("absdelta-lagged", True)]:
        assert FLConfig(curvature_rule=rule).sends_second_differences is sends


def test_replica_curvature_state_reloads_from_a_snapshot_or_the_records():
    config = FLConfig(method="hiso", lr=1e-3, num_directions=2, curvature_rule="absdelta")
    records = [RoundRecord(r, (100 + r,), ((0.5, -0.25),), ((3.0, -1.0),)) for r in range(4)]
    a = Replica(net().parameters(), config)
    a.apply(records)
    b = Replica(net().parameters(), config)
    b.load_curvature(None, records)  # an old snapshot without the state: recomputed from the records
    assert b.curvature.to_dict() == a.curvature.to_dict()
    c = Replica(net().parameters(), config)
    c.load_curvature(a.curvature.to_dict(), [])
    assert c.curvature.to_dict() == a.curvature.to_dict()
    assert math.isclose(a.divisor(), a.curvature.h[0])


# ---------------------------------------------------------------- the harness's statistics
def test_claim_statistics():
    m = lambda r, auc: dict(rounds_to={"0.50": r}, auc=auc)  # noqa: E731
    by = {1e-3: [m(None, 0.2)] * 3, 2e-3: [m(100, 0.4)] * 3, 4e-3: [m(100, 0.45)] * 3}
    assert cs.best_lr(by, 0.5) == (4e-3, False, [1e-3, 2e-3, 4e-3])
    assert cs.next_lr(4e-3, [1e-3, 2e-3, 4e-3], 2.0) == 8e-3
    assert cs.next_lr(1e-3, [1e-3, 2e-3], 3.0) == float(f"{1e-3 / 3:.6g}")
    assert cs.halves([100, 110, 140], [230, None, None]) == dict(ratio=math.inf, median_halved=True,
                                                                 disjoint=True, passed=True)
    t = cs.halves([100, 110, 210], [200, 220, 250])
    assert t["ratio"] == 2.0 and t["median_halved"] and not t["disjoint"] and not t["passed"]
    assert cs.beats_by_spread([100, 110, 140], [160, 180, 210])["passed"]  # gap 70 > larger range 50
    assert not cs.beats_by_spread([100, 110, 200], [160, 180, 210])["passed"]  # gap 70 < range 100
    assert not cs.beats_by_spread([100, 110, 140], [160, 180, None])["passed"]  # an infinite range
    assert cs.fmt_spread([100, None, 140]) == "140 [100-not]"
    curve = cs.fill_after_divergence([dict(round=0, accuracy=0.3), dict(round=10, accuracy=0.4)], 30, 10, 0.1)
    assert [r["round"] for r in curve] == [0, 10, 20, 30] and curve[-1]["accuracy"] == 0.1
    assert cs.curve_metrics(curve, 30, [0.35])["rounds_to"] == {"0.35": 10}


def test_fl_claim_needs_three_seeds_and_a_target(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "fl_claim.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for extra in (["--seeds", "0", "1", "--target", "0.5"], ["--seeds", "0", "1", "2"],
                  ["--arms", "hiso-nope", "--target", "0.5"]):
        res = subprocess.run([sys.executable, script, "--out", str(tmp_path / "s"), *extra], capture_output=True,
                             text=True, env=env, timeout=300)
        assert res.returncode == 2, (extra, res.stderr)
    assert not (tmp_path / "s" / "runs").exists()


def test_claim_report_from_run_files(tmp_path):
    import json

    import claim_report

    def write(arm, seed, lr, rounds_to, auc):
        folder = tmp_path / "runs" / arm
        folder.mkdir(parents=True, exist_ok=True)
        curve = [dict(round=0, accuracy=0.1), dict(round=10, accuracy=0.5 if rounds_to else 0.3)]
        rec = dict(arm=arm.rsplit("-", 1)[0], seed=seed, lr=lr, date="2026-12-01", torch="x", threads=1, curve=curve,
                   metrics=dict(rounds_to={"0.50": rounds_to}, auc=auc, final=0.5))
        (folder / f"seed{seed}-lr{lr:.6g}.json").write_text(json.dumps(rec))

    for s in range(3):
        for lr, r in [(1e-3, None), (2e-3, 230 + 10 * s), (4e-3, None)]:
            write("decomfl-central", s, lr, r, 0.3)
        for lr, r in [(5e-5, 200), (1e-4, 100 + 10 * s), (2e-4, None)]:
            write("hiso-absdelta-central", s, lr, r, 0.45)
        for lr, r in [(3e-3, 300), (5e-3, 180 + 10 * s), (1e-2, None)]:
            write("hiso-scalar-central", s, lr, r, 0.35)
    write("hiso-scalar-central", 0, 2e-2, None, 0.1)  # an lr with one seed only: the arm is partial
    text = claim_report.report(str(tmp_path), dict(task="fashion_mnist", target=0.5))
    assert "| hiso-absdelta-central | 3 | 0.0001 | yes | 5e-05, 0.0001, 0.0002 | 110 [100-120] |" in text
    assert "| decomfl-central | 3 | 0.002 | yes |" in text and "complete |" in text
    assert "hiso-scalar-central | 3 | 0.005 | yes" in text and "| partial |" in text
    assert "hiso-absdelta-central vs decomfl-central: ratio of medians 2.18x" in text and "2x target met" in text
    assert "hiso-scalar-central vs decomfl-central" in text
    assert "2x target not testable yet (runs missing); so far not met" in text  # the partial arm decides nothing
    assert "hiso-absdelta-central vs its scalar ablation hiso-scalar-central: median gap 80 rounds" in text
    assert "1 threads, device cpu; runs dated" in text  # records from before --device count as CPU runs
    assert (tmp_path / "report.md").exists() and (tmp_path / "report.png").exists()
