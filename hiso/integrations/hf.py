"""Hugging Face ``Trainer`` with a zeroth-order step.

:class:`ZOTrainer` overrides a few hooks of ``transformers.Trainer``: ``create_optimizer`` builds a
:class:`hiso.optim.ZOSGD` or :class:`hiso.optim.HiSo` from the training arguments (learning rate, weight decay with the
Trainer's own no-decay rule for biases and norms, seed), and ``training_step`` runs the ZO step (perturb, forward
passes, restore, fused update) instead of forward + backward. Everything else (data loading, scheduling, logging,
evaluation, checkpointing, callbacks) is the Trainer's own loop. Like MeZO, the forward passes run in ``eval`` mode
(no dropout), so that both see the same network.

* **Gradient accumulation** (``gradient_accumulation_steps = n``): one ZO step per optimizer step, whose loss is the
  mean of the n micro-batch losses (every perturbation is evaluated on all n micro-batches), so the learning rate,
  the scheduler and the step count mean what they mean for first-order training.
* **Several processes** (``torchrun``, ``accelerate launch``): the optimizer combines the ranks' micro-batch losses
  (:mod:`hiso.optim.distributed`), so W ranks with n micro-batches each give the bits of one process with W n. The
  model is *not* wrapped in DistributedDataParallel: there is no backward, and DDP's gradient buckets would cost a
  copy of the trainable parameters. The model is still placed and given mixed precision by ``accelerate``.
* **No gradients**: ``max_grad_norm`` is left as set (it does not apply; noted once in the log) and no ``grad_norm``
  is logged. A micro-batch's loss is computed with ``num_items_in_batch=None`` (its own mean).
"""

from __future__ import annotations

import logging

import torch

from ..optim import ZOSGD, HiSo

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("hiso.integrations.hf needs transformers: pip install transformers") from exc

OPTIMIZERS = {"zosgd": ZOSGD, "mezo": ZOSGD, "hiso": HiSo}
log = logging.getLogger("hiso.integrations.hf")
_noted_grad_norm = False  # the max_grad_norm note is logged once per process

try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # pragma: no cover - torch without distributed
    _FSDPModule = None


class ZOTrainer(Trainer):
    """``transformers.Trainer`` whose training step is zeroth-order.

    Args (beyond Trainer's): ``zo_method`` ("hiso", "zosgd" / "mezo"), ``zo_kwargs`` passed to the optimizer
    (mu, num_directions, difference, beta, curvature_rule, stochastic_rounding, backend, process_group, ...).
    """

    def __init__(self, *args, zo_method: str = "hiso", zo_kwargs: dict | None = None, **kwargs):
        if zo_method not in OPTIMIZERS:
            raise ValueError(f"zo_method must be one of {sorted(OPTIMIZERS)}, got {zo_method!r}")
        self.zo_method = zo_method
        self.zo_kwargs = dict(zo_kwargs or {})
        self._zo_group: list = []  # the micro-batches of the current optimizer step
        self._zo_share: torch.Tensor | None = None  # each micro-batch's share of the step's loss, for logging
        super().__init__(*args, **kwargs)
        global _noted_grad_norm
        if self.args.max_grad_norm and self.args.max_grad_norm > 0 and not _noted_grad_norm:
            _noted_grad_norm = True
            log.warning("ZOTrainer: max_grad_norm=%s does not apply to zeroth-order steps (there are no gradients); "
                        "it is left as set and ignored", self.args.max_grad_norm)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = model if model is not None else self.model
            decay = set(self.get_decay_parameter_names(model))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
            ]
            groups = [g for g in groups if g["params"]]
            kwargs = dict(seed=self.args.seed, **self.zo_kwargs)
            self.optimizer = OPTIMIZERS[self.zo_method](groups, lr=self.args.learning_rate, **kwargs)
            self.optimizer.allow_noop_step = True
            if _FSDPModule is not None and any(isinstance(m, _FSDPModule) for m in model.modules()):
                self.optimizer.set_fsdp_modules(model.modules())  # FSDP2: reshard after every forward
        return self.optimizer

    def _wrap_model(self, model, training=True, dataloader=None):
        """Prepare the model for training without DistributedDataParallel (device placement and mixed precision
        only): ``accelerate`` then leaves an already prepared model as it is. With accelerate's FSDP plugin the
        Trainer's own wrapping runs (the optimizer then works on the DTensor shards)."""
        if (training and self.accelerator.num_processes > 1 and not getattr(self, "is_fsdp_enabled", False)
                and not getattr(model, "_is_accelerate_prepared", False)):
            return self.accelerator.prepare_model(model, evaluation_mode=True)
        return super()._wrap_model(model, training, dataloader)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._zo_group = list(batch_samples)
        self._zo_share = None
        return batch_samples, num_items

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The first micro-batch of an optimizer step runs the ZO step over all of them; every micro-batch returns
        its share of the step's loss (the Trainer sums them, as it sums scaled first-order losses)."""
        group = self._zo_group
        if group and inputs is not group[0] and any(inputs is b for b in group):
            if self._zo_share is None:
                raise RuntimeError("ZOTrainer: a later micro-batch arrived before the first of its step")
            return self._zo_share
        if not (group and inputs is group[0]):
            if not group and self.args.gradient_accumulation_steps > 1:
                raise RuntimeError("ZOTrainer needs the Trainer to collect each step's micro-batches "
                                   "(get_batch_samples) for gradient accumulation; this transformers does not")
            group = [inputs]  # called outside the Trainer's loop: one micro-batch, one step
        prepared = [self._prepare_inputs(b) for b in group]
        was_training = model.training
        model.eval()

        def closure():
            with self.compute_loss_context_manager():
                return [self.compute_loss(model, b) for b in prepared]

        try:
            loss = self.zo_optimizer.step(closure)
        finally:
            model.train(was_training)
        self._zo_share = torch.tensor(loss / len(group), device=self.args.device)
        return self._zo_share

    def _clip_grad_norm(self, model):
        return None  # no gradients to clip

    def _get_grad_norm(self, model, grad_norm=None):
        return None  # nothing to log: a ZO step has no gradient norm

    @property
    def zo_optimizer(self):
        """The underlying ZO optimizer (the Trainer may have wrapped it for accelerate)."""
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)
