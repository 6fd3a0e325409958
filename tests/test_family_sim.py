"""The family simulation (benchmarks/curvature/family_sim.py, issue 15): the library's federated simulation with
DeComFL's step along a reduced-dimension direction family. With full directions it is the library's DeComFL bit for
bit (so the loop around the probes is the library's); Sparse-MeZO directions move only the masked matrix entries,
equal full directions at sparsity 0 to float32 rounding, and replay bit for bit; bad settings are errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "curvature"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
FIXTURES = Path(ROOT) / "tests" / "data" / "superglue"

pytest.importorskip("transformers")

import family_sim as fs  # noqa: E402
import fmnist_lab as lab  # noqa: E402

from hiso.fl.simulation import SimulationConfig, build, params_sha256, run  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("models") / "tiny")


def config(tiny_lm, **kw) -> SimulationConfig:
    base = dict(task="sst2", model=str(tiny_lm), data_dir=str(FIXTURES), method="decomfl", rounds=3, n_clients=3,
                clients_per_round=2, num_directions=2, batch_size=4, eval_every=1, lr=1e-2, seed=1,
                aggregation="mean")
    return SimulationConfig(**{**base, **kw})


def trained(cfg, family=None, **kw):
    setup = build(cfg)
    rows = run(cfg, setup=setup) if family is None else fs.run_family(cfg, family, setup=setup, **kw)
    return rows, [p.detach().clone() for p in setup.model.parameters()]


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("difference", ["central", "forward"])
def test_full_directions_are_the_library_decomfl_bit_for_bit(tiny_lm, difference):
    cfg = config(tiny_lm, difference=difference)
    rows_lib, params_lib = trained(cfg)
    rows_fam, params_fam = trained(cfg, "full")
    assert params_sha256(params_fam) == params_sha256(params_lib)
    assert comparable(rows_fam) == comparable(rows_lib)
    assert rows_fam[-1]["bytes_up"] > 0


def test_sparse_at_sparsity_zero_is_full_to_float32_rounding(tiny_lm):
    cfg = config(tiny_lm)
    rows_full, params_full = trained(cfg, "full")
    rows_sp, params_sp = trained(cfg, "sparse", sparsity=0.0)
    moved = max(float((a - b).abs().max()) for a, b in zip(params_full, trained(config(tiny_lm, rounds=1))[1]))
    assert moved > 1e-4  # the runs train
    for a, b in zip(params_sp, params_full):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert [r["bytes_up"] for r in rows_sp] == [r["bytes_up"] for r in rows_full]  # DeComFL's reply bytes
    assert rows_sp[1]["mask_fraction"] == 1.0


def test_sparse_moves_only_the_masked_entries_and_replays_bit_for_bit(tiny_lm):
    cfg = config(tiny_lm, rounds=1)
    setup = build(cfg)
    before = [p.detach().clone() for p in setup.model.parameters()]
    masks = lab.sparse_masks(before, 0.75)
    rows = fs.run_family(cfg, "sparse", setup=setup)
    after = [p.detach().clone() for p in setup.model.parameters()]
    for b, a, m in zip(before, after, masks):
        if m is None:
            assert not torch.equal(a, b)  # vectors keep the full direction
        else:
            assert torch.equal(a[m == 0], b[m == 0])  # outside the mask nothing moves
            assert not torch.equal(a[m == 1], b[m == 1])
    assert 0.24 < rows[1]["mask_fraction"] <= 0.26
    assert params_sha256(trained(cfg, "sparse")[1]) == params_sha256(after)


def test_bad_settings_are_errors(tiny_lm):
    cfg = config(tiny_lm, rounds=1)
    with pytest.raises(ValueError, match="method decomfl"):
        fs.run_family(config(tiny_lm, method="hiso"), "sparse")
    params = [torch.zeros(3, 3, requires_grad=True)]
    for kwargs, match in [(dict(family="nope"), "unknown direction family"), (dict(family="sparse", sparsity=1.0),
                                                                             "sparsity")]:
        with pytest.raises(ValueError, match=match):
            fs.FamilyReplica(params, cfg.fl_config(), **kwargs)
    with pytest.raises(ValueError, match="K = 1"):
        fs.FamilyReplica(params, config(tiny_lm, local_steps=2).fl_config(), "sparse")
    with pytest.raises(ValueError, match="weight decay"):
        fs.FamilyReplica(params, config(tiny_lm, weight_decay=0.1).fl_config(), "sparse")
    assert torch.equal(params[0], torch.zeros(3, 3))


def test_fl_claim_runs_and_reports_the_sparse_arm(tiny_lm, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "fl_claim.py"), "--out", str(out), "--task", "sst2",
           "--model", str(tiny_lm), "--data-dir", str(FIXTURES), "--target", "0.6", "--rounds", "2",
           "--eval-every", "1", "--n-clients", "2", "--clients-per-round", "1", "--num-directions", "1",
           "--batch-size", "4", "--num-train", "8", "--num-eval", "8", "--pilot", "--seeds", "0", "--no-extend",
           "--arms", "decomfl", "sparse-decomfl", "--lr-grid", "decomfl=1e-2", "sparse-decomfl=2e-2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads((out / "runs" / "sparse-decomfl-central" / "seed0-lr0.02.json").read_text())
    assert rec["family"] == "sparse" and 0.2 < rec["mask_fraction"] < 0.3 and rec["curvature_rule"] is None
    assert [c["round"] for c in rec["curve"]] == [0, 1, 2]
    report = (out / "report.md").read_text()
    assert "- sparse-decomfl-central vs decomfl-central" in report
