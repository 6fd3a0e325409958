"""The output folder of ``hiso train``: per-method journals (the round log), weights, fingerprints, resume, export.

    DIR/config.json                the settings of every method (what ``--resume DIR`` runs again)
    DIR/metrics.jsonl ...          evaluation rows (rewritten on resume to the rows the journals back)
    DIR/<method>/journal.hsj       the round log of a scalar-only method (:mod:`hiso.fl.journal`): the model
    DIR/<method>/model/            the trained weights, in the model's own format (see :func:`save_weights`)
    DIR/fingerprints.json          method -> SHA-256 (hex) of its final parameters

A method with a fingerprint is finished. ``hiso train --resume DIR`` skips finished methods, continues a scalar-only
method from its journal (same seeds, same clients, same data order: the same final bits as an uninterrupted run) and
runs a baseline without a journal (MeZO, FedAvg) again from the start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil

import torch

from .journal import Journal, atomic_write
from .simulation import SimulationConfig, params_sha256

JOURNAL_NAME = "journal.hsj"
FINGERPRINTS = "fingerprints.json"
CNN_WEIGHTS = "model.pt"

#: how to load the weights (README and ``model/README.txt``)
LOAD_CNN = ("import torch; from hiso.tasks import SmallCNN; model = SmallCNN(); "
            "model.load_state_dict(torch.load('FOLDER/model.pt'))")
LOAD_HF = ("from transformers import AutoModelForCausalLM, AutoTokenizer; "
           "model = AutoModelForCausalLM.from_pretrained('FOLDER'); "
           "tokenizer = AutoTokenizer.from_pretrained('FOLDER')")


def save_weights(model: torch.nn.Module, tokenizer, folder: str) -> None:
    """Write the weights in the model's own format, replacing ``folder`` as a whole: a Hugging Face model with
    ``save_pretrained`` (safetensors) and its tokenizer; any other module as a state dict (``model.pt``)."""
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_pretrained = getattr(model, "save_pretrained", None)
    if callable(save_pretrained):
        save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        how = LOAD_HF
    else:
        torch.save(model.state_dict(), os.path.join(tmp, CNN_WEIGHTS))
        how = LOAD_CNN
    with open(os.path.join(tmp, "README.txt"), "w") as fh:
        fh.write(f"Weights written by hiso. To load them (FOLDER: this folder):\n    {how}\n")
    for name in os.listdir(tmp):
        with open(os.path.join(tmp, name), "rb") as fh:
            os.fsync(fh.fileno())
    old = folder + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


class RunFolder:
    """The output folder of one ``hiso train`` invocation (see the module doc)."""

    def __init__(self, out: str):
        self.out = out

    def journal(self, method: str) -> str:
        return os.path.join(self.out, method, JOURNAL_NAME)

    def model_dir(self, method: str) -> str:
        return os.path.join(self.out, method, "model")

    def fingerprints(self) -> dict:
        path = os.path.join(self.out, FINGERPRINTS)
        if not os.path.exists(path):
            return {}
        with open(path) as fh:
            return json.load(fh)

    def finish(self, method: str, model: torch.nn.Module, tokenizer) -> str:
        """Save the final weights and record the method's fingerprint (the mark of a finished method)."""
        save_weights(model, tokenizer, self.model_dir(method))
        sha = params_sha256(model.parameters())
        prints = {**self.fingerprints(), method: sha}
        atomic_write(os.path.join(self.out, FINGERPRINTS), (json.dumps(prints, indent=1) + "\n").encode())
        return sha

    def saver(self, config: SimulationConfig, model: torch.nn.Module, tokenizer):
        """``after_round`` callback writing the weights every ``config.save_every`` rounds (None if 0)."""
        if not config.save_every:
            return None

        def after_round(rnd: int) -> None:
            if rnd % config.save_every == 0:
                save_weights(model, tokenizer, self.model_dir(config.method))
        return after_round

    def prepare(self, method: str) -> str | None:
        """Make the method's folder; its journal path for scalar-only methods (None for the baselines)."""
        os.makedirs(os.path.join(self.out, method), exist_ok=True)
        return self.journal(method) if method in ("hiso", "decomfl") else None

    # ------------------------------------------------------------------ resume
    def load_configs(self) -> list[SimulationConfig]:
        path = os.path.join(self.out, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: {self.out} is not a hiso train output folder")
        with open(path) as fh:
            return [SimulationConfig(**c) for c in json.load(fh)]

    def resume_plan(self, configs: list[SimulationConfig]) -> tuple[list[dict], dict[str, dict]]:
        """The metrics rows to keep, and per unfinished method: {"resume": bool, "evaluated": rounds with rows,
        "elapsed": seconds so far}. Rows beyond a journal's head (a crash between them) are dropped; the file is
        rewritten with the kept rows."""
        rows: list[dict] = []
        metrics = os.path.join(self.out, "metrics.jsonl")
        if os.path.exists(metrics):
            with open(metrics) as fh:
                for line in fh:
                    with contextlib.suppress(json.JSONDecodeError):  # a line cut by the crash
                        rows.append(json.loads(line))
        done = self.fingerprints()
        kept: list[dict] = []
        plan: dict[str, dict] = {}
        for cfg in configs:
            mine = [r for r in rows if r.get("method") == cfg.method]
            if cfg.method in done:
                kept += mine
                continue
            journal = self.journal(cfg.method)
            head = len(Journal.open(journal).entries) if os.path.exists(journal) else None
            if head is None:  # never started, or a baseline: from the start
                plan[cfg.method] = {"resume": False, "evaluated": set(), "elapsed": 0.0}
                continue
            mine = [r for r in mine if r["round"] <= head]
            kept += mine
            plan[cfg.method] = {"resume": True, "evaluated": {r["round"] for r in mine},
                                "elapsed": max([r.get("seconds", 0.0) for r in mine], default=0.0)}
        atomic_write(metrics, "".join(json.dumps(r) + "\n" for r in kept).encode())
        return kept, plan


def export(log: str, out: str, model: str | None = None) -> str:
    """Rebuild the trained weights from a journal alone (initial weights + records) into ``out``; returns the
    SHA-256 of the parameters (equal to the run's ``fingerprints.json`` entry). ``model`` overrides the journal's
    model name or folder (a causal LM stored elsewhere); the initial weights must match the journal's digest."""
    from .experiment import build_model
    from .protocol import Replica
    from .server import Server

    journal = Journal.open(log)
    settings = journal.header.get("simulation")
    if not isinstance(settings, dict):
        raise ValueError(f"{log} has no experiment settings (written by hiso train or the hiso Flower App?)")
    config = SimulationConfig(**settings)
    if model is not None:
        if config.task == "fashion_mnist":
            raise ValueError("the Fashion-MNIST CNN is built from the journal's seed; --model is for causal LMs")
        config = dataclasses.replace(config, model=model)
    net, tokenizer = build_model(config)
    replica = Replica(net.parameters(), config.fl_config())
    if params_sha256(replica.params) != journal.header.get("initial_sha256"):
        raise ValueError("the model's initial weights differ from the journal's (another model, seed or version?)")
    server = Server.resume(journal, replica)
    journal.close()
    save_weights(net, tokenizer, out)
    print(f"rebuilt {len(server.records)} rounds from {log} into {out}")
    return params_sha256(net.parameters())
