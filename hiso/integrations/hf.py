"""Hugging Face ``Trainer`` with a zeroth-order step.

:class:`ZOTrainer` overrides exactly two hooks of ``transformers.Trainer``: ``create_optimizer`` builds a
:class:`hiso.optim.ZOSGD` or :class:`hiso.optim.HiSo` from the training arguments (learning rate, weight decay with the
Trainer's own no-decay rule for biases and norms, seed), and ``training_step`` runs the ZO step (perturb, two
forward passes, restore, fused update) instead of forward + backward. Everything else (data loading, scheduling,
logging, evaluation, checkpointing, callbacks) is the Trainer's own loop. Gradient clipping has no gradients to clip
and is switched off; the Trainer's later ``optimizer.step()`` call is a no-op because the step already happened.

Like MeZO, the two forward passes run in ``eval`` mode (no dropout), so that both see the same network.
"""

from __future__ import annotations

import torch

from ..optim import ZOSGD, HiSo

try:
    from transformers import Trainer
except ImportError as exc:  # pragma: no cover - optional dependency
    raise ImportError("hiso.integrations.hf needs transformers: pip install transformers") from exc

OPTIMIZERS = {"zosgd": ZOSGD, "mezo": ZOSGD, "hiso": HiSo}


class ZOTrainer(Trainer):
    """``transformers.Trainer`` whose training step is zeroth-order.

    Args (beyond Trainer's): ``zo_method`` ("hiso", "zosgd" / "mezo"), ``zo_kwargs`` passed to the optimizer
    (mu, num_directions, difference, beta, curvature, stochastic_rounding, backend, ...).
    """

    def __init__(self, *args, zo_method: str = "hiso", zo_kwargs: dict | None = None, **kwargs):
        if zo_method not in OPTIMIZERS:
            raise ValueError(f"zo_method must be one of {sorted(OPTIMIZERS)}, got {zo_method!r}")
        self.zo_method = zo_method
        self.zo_kwargs = dict(zo_kwargs or {})
        super().__init__(*args, **kwargs)
        self.args.max_grad_norm = 0.0  # no gradients exist; clipping would only walk the parameters

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
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        was_training = model.training
        model.eval()

        def closure():
            with self.compute_loss_context_manager():
                return self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

        try:
            loss = self.zo_optimizer.step(closure)
        finally:
            model.train(was_training)
        return torch.tensor(loss, device=self.args.device)

    @property
    def zo_optimizer(self):
        """The underlying ZO optimizer (the Trainer may have wrapped it for accelerate)."""
        opt = self.optimizer
        return getattr(opt, "optimizer", opt)
