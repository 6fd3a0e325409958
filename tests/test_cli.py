"""The ``hiso`` command line: every bad input is one line on stderr, exit code 2 and no output folder (checked
before any model or data loads); ``--help``/``--version``/``python -m hiso``; packaged configs; short real jobs
(Fashion-MNIST; BoolQ, WiC, COPA on the SuperGLUE-layout fixtures with a tiny saved model; a user's own task spec)
with a progress bar from the first round, strict-JSON metrics and a 2 x 2 plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hiso import __version__
from hiso.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data" / "superglue"
FASHION = Path(os.environ.get("HISO_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(), reason="no Fashion-MNIST")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("models") / "tiny")


def _bad_cases(tmp: Path, tiny: Path) -> list[tuple[list[str], str]]:
    spec = tmp / "bad.toml"
    spec.write_text('name = "x"\n[labels]\nvalues = [1]\n')
    cfg = tmp / "bad_config.toml"
    cfg.write_text("[train]\nrounds = 3\nwarp = 9\n")
    data = ["--data-dir", str(FIXTURES)]
    return [
        (["--rounds", "abc"], "argument --rounds: invalid value 'abc': expected an integer"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--mu", "nan"], "--mu must be a finite number"),
        (["--beta", "2"], "--beta must be in [0, 1]"),
        (["--task", "mnli"], "unknown task 'mnli'; available: boolq, cb, copa, fashion_mnist, multirc"),
        (["--task", "boolq", "--data-dir", str(tmp / "missing")], "data folder not found"),
        (["--task", "boolq", "--data-dir", str(tmp)], "no boolq data in"),
        (["--device", "cuda"] if not _cuda() else ["--device", "cuda:99"], "--device cuda"),
        (["--device", "toaster"], "--device: invalid device 'toaster'"),
        (["--config", "no_such_config"], "config not found: 'no_such_config' is neither a file nor a packaged config"),
        (["--config", str(cfg)], "unknown setting(s) ['warp']"),
        (["--task", "fashion_mnist", "--model", "gpt2"], "--model does not apply to task 'fashion_mnist'"),
        (["--task", "boolq", *data, "--template", "gpt9"], "--template: 'gpt9' is not a template of boolq"),
        (["--task", "boolq", *data, "--model", str(tmp / "nomodel")], "--model: no model file or folder"),
        (["--task", "boolq", *data, "--model", str(tiny), "--n-clients", "50", "--clients-per-round", "2"],
         "--n-clients 50 exceeds the 12 training examples of boolq"),
        (["--split", "random"], "--split: invalid value 'random'; choose from: iid, dirichlet"),
        (["--aggregation", "max"], "--aggregation: invalid value 'max'; choose from: mean, median, trimmed_mean"),
        (["--curvature-rule", "exact"], "choose from: gsq, stein, scalar, absdelta, absdelta-lagged, stein-tensor"),
        (["--h-init", "zeros"], "--h-init: invalid value 'zeros'; choose from: ones, first-round"),
        (["--curvature-rule", "absdelta", "--difference", "forward"], "the 'absdelta' curvature rule needs central"),
        (["--beta", "1.5"], "--beta must be in [0, 1]"),
        (["--methods", "sgd"], "argument --methods: invalid choice: 'sgd'"),
        (["--clients-per-round", "20"], "clients_per_round cannot exceed n_clients"),
        (["--curvature-rule", "stein", "--difference", "forward"], "the 'stein' curvature rule needs central"),
        (["--task-spec", str(spec)], "--task-spec: "),
        (["--task-spec", str(tmp / "none.toml")], "--task-spec: task spec file not found"),
        (["--backend", "warp"], "--backend: invalid value 'warp'; choose from: reference, cpu, triton, cuda, torch"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bad_inputs_are_one_line_exit_2_and_leave_no_folder(capsys, tmp_path, tiny_lm):
    for argv, expected in _bad_cases(tmp_path, tiny_lm):
        out_dir = tmp_path / "out"
        code, out, err = run_cli(capsys, "train", *argv, "--out", str(out_dir))
        lines = err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("hiso: error: "), (argv, err)
        assert expected in lines[0], (argv, lines[0])
        assert not out_dir.exists(), argv
        assert out == ""


def test_help_lists_tasks_methods_aggregations_and_rules(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in ("boolq", "copa", "multirc", "wic", "wsc", "sst2", "fashion_mnist", "trimmed_mean", "stein",
                 "fedavg", "--task-spec", "--template", "--max-length", "packaged configs: fashion_mnist"):
        assert word in text, word
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "train" in capsys.readouterr().out


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"hiso {__version__}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, "-m", "hiso", "train", "--rounds", "0"], capture_output=True, text=True,
                         env=env, cwd=REPO.parent)
    assert res.returncode == 2 and res.stderr.strip() == "hiso: error: --rounds must be >= 1, got 0"


def test_tasks_command_lists_specs_and_checks_a_file(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "tasks")
    assert code == 0
    assert "copa: COPA" in out and "scoring multiple_choice" in out and "template mezo (default)" in out
    assert "'{passage} {question|question}\\n' -> 'No' | 'Yes'" in out
    bad = tmp_path / "t.toml"
    bad.write_text('name = "t"\n[fields]\na = "a"\n[labels]\nvalues = [1, 2]\n[templates.x]\nprompt = "{b}"\n'
                   'verbalizer = ["p", "q"]\n')
    code, _, err = run_cli(capsys, "tasks", str(bad))
    assert code == 2 and "uses fields ['b'] that the task lacks" in err


def _check_outputs(out: Path, methods: list[str], rounds: int) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()

    def no_constants(name):
        raise AssertionError(f"non-strict JSON constant {name}")

    rows = [json.loads(line, parse_constant=no_constants) for line in lines]
    assert [r["method"] for r in rows if r["round"] == rounds] == methods
    assert all(r["eval_loss"] is None or math.isfinite(r["eval_loss"]) for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert [c["method"] for c in config] == methods
    assert (out / "summary.md").read_text().startswith("| method |")
    assert (out / "curves.png").stat().st_size > 10_000
    return rows


@needs_fashion
def test_fashion_mnist_job_with_the_packaged_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the config comes from the package
    out = tmp_path / "fm"
    code, _, stderr = run_cli(capsys, "train", "--config", "fashion_mnist", "--rounds", "2", "--eval-every", "2",
                                   "--num-train", "300", "--num-eval", "100", "--methods", "hiso", "mezo",
                                   "--out", str(out))
    assert code == 0, stderr
    rows = _check_outputs(out, ["hiso", "mezo"], 2)
    assert rows[0]["lr"] == 3e-3  # the packaged config's [methods.hiso] learning rate
    # the bar shows round 1 of 2 with its loss and a rate before the evaluation at round 2
    first = stderr.index("1/2")
    assert "loss=" in stderr[first:first + 200] and "round" in stderr[first:first + 200]
    assert first < stderr.index("hiso round     2/2")


def test_strict_json_and_plot_panels(tmp_path):
    from hiso.reporting import json_line, plot

    line = json_line({"a": float("nan"), "b": [1.0, float("inf")], "c": 2})
    assert json.loads(line) == {"a": None, "b": [1.0, None], "c": 2}
    rows = [dict(round=r, method=m, accuracy=0.5 + r / 10, eval_loss=None if r == 1 else 1.0 - r / 10,
                 train_loss=0.7, bytes_up=100 * r, bytes_down=0) for m in ("hiso", "decomfl") for r in range(3)]
    panels = plot(rows, tmp_path / "c.png", title="t")
    assert panels == [("round", "eval accuracy", "linear"), ("bytes sent by clients (all, cumulative)",
                                                             "eval accuracy", "log"),
                      ("round", "eval loss", "linear"), ("bytes sent by clients (all, cumulative)", "eval loss",
                                                         "log")]


@pytest.mark.parametrize("task", ["boolq", "wic", "copa"])
def test_superglue_jobs_with_a_saved_model(capsys, tmp_path, tiny_lm, task):
    out = tmp_path / task
    code, _, stderr = run_cli(capsys, "train", "--task", task, "--data-dir", str(FIXTURES), "--model", str(tiny_lm),
                              "--rounds", "2", "--n-clients", "2", "--clients-per-round", "2",
                              "--num-directions", "2", "--batch-size", "4", "--eval-every", "1", "--out", str(out),
                              "--no-plot")
    assert code == 0, stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["method"] == "hiso"] == [0, 1, 2]
    assert rows[-1]["bytes_up"] > 0 and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert json.loads((out / "config.json").read_text())[0]["model"] == str(tiny_lm)


def test_user_task_spec_with_string_labels_and_tensorboard(capsys, tmp_path, tiny_lm):
    pytest.importorskip("tensorboard")
    data = tmp_path / "reviews"
    data.mkdir()
    rows = [("a great movie .", "pos"), ("a terrible movie .", "neg"), ("great fun .", "pos"), ("dull .", "neg")]
    for name in ("train.jsonl", "val.jsonl"):
        (data / name).write_text("".join(json.dumps({"review": {"body": t}, "stars": s}) + "\n" for t, s in rows))
    spec = tmp_path / "reviews.toml"
    spec.write_text('name = "reviews"\ndescription = "my reviews"\n[data]\ndir = "reviews"\n'
                    '[fields]\nbody = "review.body"\n[labels]\nfield = "stars"\nvalues = ["neg", "pos"]\n'
                    '[templates.plain]\nprompt = "{body} It was"\nverbalizer = [" terrible", " great"]\n')
    out = tmp_path / "run"
    code, _, stderr = run_cli(capsys, "train", "--task-spec", str(spec), "--model", str(tiny_lm), "--rounds", "2",
                              "--n-clients", "2", "--clients-per-round", "1", "--num-directions", "1",
                              "--methods", "decomfl", "--out", str(out), "--tensorboard", "--max-length", "16")
    assert code == 0, stderr
    _check_outputs(out, ["decomfl"], 2)
    config = json.loads((out / "config.json").read_text())[0]
    assert config["task"] == str(spec) and config["max_length"] == 16
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_a_run_that_fails_to_start_leaves_no_folder(capsys, tmp_path, monkeypatch):
    import hiso.fl.simulation as simulation

    def broken(config):
        raise OSError("disk on fire")

    monkeypatch.setattr(simulation, "build", broken)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "train", "--task", "fashion_mnist", "--rounds", "1", "--out", str(out))
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        assert code == 2  # no data here: caught by the checks instead
    else:
        assert code == 1 and err.strip() == "hiso: error: could not set up hiso: disk on fire"
    assert not out.exists()
