"""HiSo in a plain PyTorch loop: a small CNN on Fashion-MNIST, no backward pass anywhere.

    python examples/plain_loop.py --steps 300

Two lines differ from first-order training: the optimizer, and ``opt.step(closure)`` where the closure only
computes the loss. The run is replayable: ``opt.history`` (seed and scalars per step) brings a second copy of the
initial model to the same bits (checked at the end).
"""

from __future__ import annotations

import argparse

import torch

from hiso.optim import HiSo
from hiso.tasks import SmallCNN, get_task


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()

    task = get_task("fashion_mnist", num_train=10000, num_eval=2000)
    torch.manual_seed(0)
    model = SmallCNN().eval()  # eval(): both perturbed forward passes see the same network
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = HiSo(model.parameters(), lr=args.lr, mu=1e-3, num_directions=4, seed=0)
    eval_batches = task.make_batches(task.eval_examples, 500)
    print(f"step    0  eval acc {task.accuracy(model, eval_batches):.3f}")
    batches = task.make_batches(task.train_examples, args.batch_size, shuffle=True, seed=0)
    for step in range(1, args.steps + 1):
        batch = batches[step % len(batches)]
        # perturb, 2 forwards per direction, fused update (batch=batch binds this step's batch)
        loss = opt.step(lambda batch=batch: task.loss(model, batch))
        if step % 50 == 0:
            print(f"step {step:4d}  train loss {loss:.4f}  eval acc {task.accuracy(model, eval_batches):.3f}")

    replica = SmallCNN()
    replica.load_state_dict(initial)
    HiSo(replica.parameters(), lr=args.lr, mu=1e-3, num_directions=4, seed=0).replay(opt.history)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), replica.parameters()))
    print(f"replaying {len(opt.history)} steps on a fresh copy gives the same bits: {same}")


if __name__ == "__main__":
    main()
