"""Worker of tests/test_distributed.py, run under torchrun / accelerate launch, or alone for the one-process reference.

    python tests/dist_worker.py OUT MODE [MODE ...]

Every step uses the same S = 4 micro-batches of a tiny transformer classifier; with W ranks, rank r evaluates the
micro-batches j with j % W == r and the optimizer combines the losses over the ranks. The reference (no
torch.distributed at all) evaluates all S in one closure. The claim under test: both give the same bits.

Modes: ``ref`` (one process: plain loops and the Trainer with gradient accumulation S), ``dp`` (replicated model,
plain loop), ``fsdp`` (the model under FSDP2's ``fully_shard``), ``trainer`` (``ZOTrainer``, gradient accumulation
S / W), ``errors`` (ranks that disagree or fail). Each writes OUT/<mode>-rank<r>.pt.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import torch
import torch.distributed as dist

from hiso.optim import ZOSGD, HiSo

S, B, L, VOCAB, D, FF, CLASSES, STEPS = 4, 2, 5, 13, 12, 20, 3, 3

CONFIGS = {  # name: (class, kwargs)
    "zosgd": (ZOSGD, dict(lr=0.05, num_directions=2, seed=7)),
    "zosgd_forward": (ZOSGD, dict(lr=0.05, difference="forward", seed=8)),
    "hiso": (HiSo, dict(lr=0.02, num_directions=2, seed=9)),
    "hiso_stein": (HiSo, dict(lr=0.02, curvature_rule="stein", beta=0.9, h_min=1e-2, seed=10)),
}


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv, self.out = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
        self.ff1, self.ff2 = torch.nn.Linear(D, FF), torch.nn.Linear(FF, D)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).reshape(x.shape[0], L, 3, 2, D // 2).unbind(2)  # 2 heads
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // 2), dim=-1)
        x = x + self.out(torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(x.shape[0], L, D))
        return x + self.ff2(torch.tanh(self.ff1(self.ln2(x))))


class TinyTransformer(torch.nn.Module):
    """Embedding, two blocks, a head: uneven sizes, so 4-way FSDP shards are uneven and some are empty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, D)
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(D, CLASSES)

    def forward(self, input_ids, labels=None):
        x = self.emb(input_ids)
        for b in self.blocks:
            x = b(x)
        logits = self.head(x.mean(1))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def micro_batch(step: int, j: int):
    g = torch.Generator().manual_seed(1000 * step + j)
    return torch.randint(VOCAB, (B, L), generator=g), torch.randint(CLASSES, (B,), generator=g)


def groups(model):
    named = [(n, p) for n, p in model.named_parameters()]
    return [{"params": [p for n, p in named if n.endswith("weight") and "ln" not in n], "weight_decay": 0.01},
            {"params": [p for n, p in named if not (n.endswith("weight") and "ln" not in n)], "lr": 0.03}]


def closure_for(model, step, mine):
    def closure():
        losses = [model(*micro_batch(step, j))["loss"] for j in mine]
        return losses[0] if len(losses) == 1 else losses  # one value or the micro-batch list: both paths
    return closure


def train(model, name, mine, process_group="auto"):
    cls, kw = CONFIGS[name]
    model.eval()
    opt = cls(groups(model), process_group=process_group, **kw)
    losses = [opt.step(closure_for(model, t, mine)) for t in range(STEPS)]
    return opt, losses


def full_state(model, opt):
    """Unsharded parameters (and H) in optimizer order; collective when sharded."""
    from torch.distributed.tensor import DTensor

    params, hess = [], []
    for g in opt.param_groups:
        for p in g["params"]:
            if isinstance(p, DTensor):
                params.append(p.full_tensor().detach().clone())
                if "hessian" in opt.state[p]:
                    h = DTensor.from_local(opt.state[p]["hessian"], p.device_mesh, p.placements, shape=p.shape,
                                           stride=p.stride())
                    hess.append(h.full_tensor().clone())
            else:
                params.append(p.detach().clone())
                if "hessian" in opt.state[p]:
                    hess.append(opt.state[p]["hessian"].clone())
    return {"params": params, "hessian": hess, "history": [(s.seed, s.scalars) for s in opt.history]}


# ---------------------------------------------------------------------- modes
def mode_ref(out, rank, world):
    res = {}
    for name in CONFIGS:
        model = TinyTransformer()
        opt, losses = train(model, name, range(S), process_group=False)
        res[name] = dict(full_state(model, opt), losses=losses)
    res["trainer"] = run_trainer(gradient_accumulation=S)
    return res


def mode_dp(out, rank, world):
    res = {}
    for name in CONFIGS:
        model = TinyTransformer()
        opt, losses = train(model, name, [j for j in range(S) if j % world == rank])
        res[name] = dict(full_state(model, opt), losses=losses, exchange_bytes=opt.last_exchange_bytes)
    return res


def mode_fsdp(out, rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    res = {}
    for name in CONFIGS:
        model = TinyTransformer()
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root (emb, head) keeps its gathered parameters after forward by default
        with torch.no_grad():
            model(*micro_batch(99, 0))  # a forward before training (an evaluation) leaves the root gathered
        if name == "zosgd":  # an optimizer built now would get the root's gathered copies: refused
            try:
                train(model, name, [rank])
                res["gathered"] = "ok"
            except ValueError as exc:
                res["gathered"] = f"ValueError: {exc}"
        model.reshard()
        opt, losses = train(model, name, [j for j in range(S) if j % world == rank])
        res[name] = dict(full_state(model, opt), losses=losses,
                         local_numel=sum(p.to_local().numel() for p in model.parameters()))
    return res


def mode_errors(out, rank, world):
    res = {}

    def attempt(case, make, step_kw=None, closure=None):
        model = TinyTransformer()
        make_model = make.get("model")
        if make_model:
            make_model(model)
        opt = ZOSGD(groups(model), lr=0.05, seed=make.get("seed", 7))
        model.eval()
        if make.get("warm"):
            opt.step(closure_for(model, 0, [rank]))
        before = [p.detach().clone() for p in model.parameters()]
        try:
            opt.step(closure or closure_for(model, 1, [rank]), **(step_kw or {}))
            res[case] = "ok"
        except Exception as exc:
            res[case] = f"{type(exc).__name__}: {exc}"
        res[case + "_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    attempt("seed", {"seed": 7 + rank})
    attempt("weights", {"model": lambda m: m.head.bias.data.add_(rank * 1e-3)})
    attempt("step_seed", {"warm": True}, step_kw={"seed": 100 + rank})
    attempt("nan", {"warm": True}, closure=_failing(rank, 1, float("nan")))
    attempt("raises", {"warm": True}, closure=_failing(rank, 0, RuntimeError("boom")))
    return res


def _failing(rank, bad_rank, what):
    calls = []

    def closure():
        calls.append(1)
        if rank == bad_rank and len(calls) == 2:
            if isinstance(what, Exception):
                raise what
            return torch.tensor(what)
        return torch.tensor(1.0 + 0.1 * len(calls))
    return closure


def run_trainer(gradient_accumulation):
    from transformers import TrainingArguments

    from hiso.integrations.hf import ZOTrainer

    class Data(torch.utils.data.Dataset):  # the micro-batches of all steps, in order: step t, micro-batch j
        def __len__(self):
            return STEPS * S * B

        def __getitem__(self, i):
            t, rest = divmod(i, S * B)
            x, y = micro_batch(t, rest // B)
            return {"input_ids": x[rest % B], "labels": y[rest % B]}

    class SequentialTrainer(ZOTrainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    model = TinyTransformer()
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=B, max_steps=STEPS, learning_rate=0.05,
                                 gradient_accumulation_steps=gradient_accumulation, weight_decay=0.01,
                                 lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
                                 use_cpu=True, seed=11, disable_tqdm=True, dataloader_num_workers=0)
        trainer = SequentialTrainer(model=model, args=args, train_dataset=Data(), zo_method="zosgd",
                                    zo_kwargs=dict(num_directions=2))
        trainer.train()
    opt = trainer.zo_optimizer
    return dict(full_state(model, opt), steps_taken=opt.steps_taken, max_grad_norm=trainer.args.max_grad_norm,
                logs=trainer.state.log_history, wrapped=type(trainer.model_wrapped).__name__)


def mode_trainer(out, rank, world):
    return run_trainer(gradient_accumulation=S // world)


MODES = {"ref": mode_ref, "dp": mode_dp, "fsdp": mode_fsdp, "trainer": mode_trainer, "errors": mode_errors}


def main() -> None:
    out, modes = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)  # the same per-process arithmetic as torchrun's workers (OMP_NUM_THREADS=1)
    distributed = "WORLD_SIZE" in os.environ and modes != ["ref"]
    if distributed and not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    for mode in modes:
        torch.save(MODES[mode](out, rank, world), os.path.join(out, f"{mode}-rank{rank}.pt"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
