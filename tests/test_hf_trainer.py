"""ZOTrainer, honestly: gradient accumulation is one ZO step per optimizer step on the mean of the micro-batch losses
(the same bits as a plain loop doing that), max_grad_norm is left as set, no grad_norm is logged, and a resumed run
is bit-identical with its whole history in the optimizer checkpoint. (Several processes: test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import TrainingArguments

from hiso.integrations.hf import ZOTrainer
from hiso.optim import ZOSGD, HiSo

B, N = 4, 48  # batch size, examples


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, labels=None):
        logits = self.head(self.norm(torch.tanh(self.body(x))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(N, 6, generator=g), torch.randint(3, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class SequentialTrainer(ZOTrainer):
    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def make_trainer(tmp_path, model, method="zosgd", **kw):
    kw = dict(dict(save_strategy="no"), **kw)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=B, learning_rate=0.05,
                             weight_decay=0.01, lr_scheduler_type="linear", logging_steps=1, report_to=[],
                             use_cpu=True, seed=5, disable_tqdm=True, **kw)
    return SequentialTrainer(model=model, args=args, train_dataset=Data(), zo_method=method,
                             zo_kwargs=dict(num_directions=2))


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_gradient_accumulation_is_one_step_per_optimizer_step(tmp_path):
    model = Model()
    trainer = make_trainer(tmp_path, model, gradient_accumulation_steps=2, max_steps=3)
    trainer.train()
    opt = trainer.zo_optimizer
    assert opt.steps_taken == 3  # not 6
    assert [rec.lrs[0] for rec in opt.history] == pytest.approx([0.05, 0.05 * 2 / 3, 0.05 / 3])  # 3 scheduler steps
    assert trainer.args.max_grad_norm == 1.0  # left as the user set it
    assert not any("grad_norm" in log for log in trainer.state.log_history)

    # the same run as a plain loop: each step's closure returns the losses of its two micro-batches
    ref = Model().eval()
    decay = set(trainer.get_decay_parameter_names(ref))
    named = list(ref.named_parameters())
    ref_opt = ZOSGD([{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
                     {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
                    lr=0.05, num_directions=2, seed=5)
    data = Data()
    for t in range(3):
        for g in ref_opt.param_groups:
            g["lr"] = opt.history[t].lrs[0]
        parts = [slice((2 * t + j) * B, (2 * t + j + 1) * B) for j in range(2)]
        loss = ref_opt.step(lambda: [ref(data.x[s], data.y[s])["loss"] for s in parts])  # noqa: B023
        assert [log["loss"] for log in trainer.state.log_history if "loss" in log][t] == pytest.approx(loss)
    assert torch.equal(flat(ref), flat(model))


def test_resume_keeps_the_whole_history(tmp_path):
    """Stop at step 2 (the Trainer's own checkpoint, loaded with weights_only=True), resume, finish at 4: the bits
    of an uninterrupted run, and the optimizer's history covers all 4 steps."""
    whole = Model()
    make_trainer(tmp_path / "a", whole, method="hiso", max_steps=4).train()

    first = make_trainer(tmp_path / "b", Model(), method="hiso", max_steps=4, save_strategy="steps", save_steps=2)
    first.train()
    resumed_model = Model()
    resumed = make_trainer(tmp_path / "b", resumed_model, method="hiso", max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert torch.equal(flat(resumed_model), flat(whole))
    opt = resumed.zo_optimizer
    assert opt.steps_taken == 4 and opt.history_start == 0 and len(opt.history) == 4

    replica = Model()
    decay = set(resumed.get_decay_parameter_names(replica))
    named = list(replica.named_parameters())
    rep = HiSo([{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}],
               lr=0.05, num_directions=2)
    rep.replay(opt.history)
    assert torch.equal(flat(replica), flat(whole))


def test_training_step_outside_the_loop_is_one_step(tmp_path):
    model = Model()
    trainer = make_trainer(tmp_path, model, max_steps=1)
    trainer.create_optimizer()
    before = flat(model).clone()
    loss = trainer.training_step(model, {"x": Data().x[:B], "labels": Data().y[:B]})
    assert trainer.zo_optimizer.steps_taken == 1 and torch.isfinite(loss)
    assert not torch.equal(flat(model), before)
