"""Optimizer checkpoints are complete: the state dict holds the history and the hyper-parameters, loads with
``torch.load(weights_only=True)``, resumes bit for bit with the whole history replayable, and refuses (changing
nothing) a checkpoint made with other settings; history files in JSON and torch format."""

from __future__ import annotations

import io
import json

import pytest
import torch
from test_optim import flat, loss_of, make_model

from helpers import assert_bitwise_equal
from hiso.optim import ZOSGD, HiSo
from hiso.optim import history as hist


def roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


RESUMES = [(ZOSGD, torch.float32, dict(num_directions=2, weight_decay=0.01)),
           (HiSo, torch.float32, dict(curvature_rule="stein")),
           (HiSo, torch.bfloat16, dict(stochastic_rounding=True, mu=1e-2, exact_restore=True))]


@pytest.mark.parametrize("cls,dtype,kw", RESUMES)
def test_resume_with_history(cls, dtype, kw):
    """Stop after 4 steps, resume from a weights-only checkpoint: the same bits as not stopping, and the resumed
    optimizer's history replays the whole run (HiSo's fp32 H survives bf16 parameters)."""
    model = make_model(dtype)
    opt = cls(model.parameters(), lr=0.05, seed=3, **kw)
    for _ in range(4):
        opt.step(loss_of(model))
    saved_model, saved_opt = roundtrip(model.state_dict()), roundtrip(opt.state_dict())
    for _ in range(3):
        opt.step(loss_of(model))

    other = make_model(dtype)
    other.load_state_dict(saved_model)
    opt2 = cls(other.parameters(), lr=0.05, seed=99, **kw)  # the checkpoint's seed stream wins
    opt2.load_state_dict(saved_opt)
    assert opt2.steps_taken == 4 and opt2.history_start == 0 and len(opt2.history) == 4
    for _ in range(3):
        opt2.step(loss_of(other))
    assert_bitwise_equal(flat(other), flat(model))
    assert opt2.history == opt.history
    if cls is HiSo:
        for a, b in zip(model.parameters(), other.parameters()):
            assert opt2.state[b]["hessian"].dtype == torch.float32
            assert_bitwise_equal(opt2.state[b]["hessian"], opt.state[a]["hessian"])

    fresh = make_model(dtype)
    cls(fresh.parameters(), lr=0.05, **kw).replay(opt2.history)
    assert_bitwise_equal(flat(fresh), flat(model))


MISMATCHES = [
    (ZOSGD, dict(mu=2e-3), "mu"),
    (ZOSGD, dict(num_directions=3), "num_directions"),
    (ZOSGD, dict(difference="forward"), "difference"),
    (ZOSGD, dict(distribution="rademacher"), "distribution"),
    (ZOSGD, dict(stochastic_rounding=True), "stochastic_rounding"),
    (HiSo, dict(), "ZOSGD optimizer"),
]


@pytest.mark.parametrize("cls,kw,match", MISMATCHES)
def test_mismatched_checkpoint_raises_and_changes_nothing(cls, kw, match):
    model = make_model()
    opt = ZOSGD(model.parameters(), lr=0.05, seed=3)
    for _ in range(2):
        opt.step(loss_of(model))
    sd = roundtrip(opt.state_dict())
    other = cls(make_model().parameters(), lr=0.07, seed=5, **kw)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(sd)
    assert other.steps_taken == 0 and other.base_seed == 5 and not other.history
    assert other.param_groups[0]["lr"] == 0.07


@pytest.mark.parametrize("kw,match", [(dict(curvature_rule="stein"), "curvature_rule"), (dict(beta=0.9), "beta"),
                                      (dict(h_min=1e-3), "h_min")])
def test_hiso_settings_must_match(kw, match):
    model = make_model()
    opt = HiSo(model.parameters(), lr=0.05, seed=3)
    opt.step(loss_of(model))
    other = HiSo(make_model().parameters(), lr=0.05, **kw)
    with pytest.raises(ValueError, match=match):
        other.load_state_dict(opt.state_dict())
    assert not other.state  # no H was loaded


def test_parameter_count_must_match():
    """Same number of tensors (torch's own check passes), another number of elements: refused."""
    model = make_model()
    opt = ZOSGD(model.parameters(), lr=0.05)
    opt.step(loss_of(model))
    wider = torch.nn.Sequential(torch.nn.Linear(12, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2))
    with pytest.raises(ValueError, match="trainable elements"):
        ZOSGD(wider.parameters(), lr=0.05).load_state_dict(opt.state_dict())


def test_old_checkpoint_without_history_loads_with_a_warning():
    model = make_model()
    opt = ZOSGD(model.parameters(), lr=0.05, seed=3)
    for _ in range(2):
        opt.step(loss_of(model))
    sd = opt.state_dict()
    sd["zo"] = dict(base_seed=3, steps_taken=2, mu=opt.mu, num_directions=1, difference="central",
                    distribution="gaussian")  # what hiso 0.1 wrote
    other = ZOSGD(make_model().parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="no step history"):
        other.load_state_dict(sd)
    assert other.steps_taken == 2 and other.history_start == 2 and other.next_seed() == opt.next_seed()
    with pytest.raises(ValueError, match="no 'zo' entry"):
        other.load_state_dict({k: v for k, v in sd.items() if k != "zo"})


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_history_files(tmp_path, suffix):
    model = make_model()
    opt = HiSo([{"params": [model[0].weight, model[2].weight], "weight_decay": 0.01},
                {"params": [model[0].bias, model[2].bias], "lr": 0.02}], lr=0.05, curvature_rule="stein", seed=2**62)
    for _ in range(5):
        opt.step(loss_of(model))
    path = tmp_path / f"history{suffix}"
    opt.save_history(path)
    if suffix == ".json":
        doc = json.loads(path.read_text())  # any JSON tool reads it; seeds are strings (they exceed 2^53)
        assert doc["format"] == "hiso.zo_history" and doc["version"] == hist.VERSION and doc["method"] == "HiSo"
        assert [int(s) for s in doc["seeds"]] == [r.seed for r in opt.history]
        assert len(doc["scalars"]) == 5 and len(doc["lrs"][0]) == 2 and doc["hyper"]["curvature_rule"] == "stein"
    else:
        doc = torch.load(path, weights_only=True)
        assert doc["seeds"].dtype == torch.int64 and doc["scalars"].dtype == torch.float64
    replica = make_model()
    rep = HiSo([{"params": [replica[0].weight, replica[2].weight], "weight_decay": 0.01},
                {"params": [replica[0].bias, replica[2].bias], "lr": 0.02}], lr=0.05, curvature_rule="stein")
    records = rep.load_history(path)
    assert records == opt.history
    rep.replay(records)
    assert_bitwise_equal(flat(replica), flat(model))
    with pytest.raises(ValueError, match="curvature_rule"):
        HiSo(make_model().parameters(), lr=0.05).load_history(path)
    with pytest.raises(ValueError, match="ZOSGD"):
        ZOSGD(make_model().parameters(), lr=0.05).load_history(path)


def test_history_encoding_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="same numbers"):
        hist.encode([hist.ZOStep(1, (0.1,), None, (0.1,), (0.0,)), hist.ZOStep(2, (0.1, 0.2), None, (0.1,), (0.0,))])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a hiso step history"):
        hist.read(bad)
    assert hist.decode(hist.encode([])) == []
