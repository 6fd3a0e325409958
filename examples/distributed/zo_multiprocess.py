"""ZO fine-tuning on several processes: data parallel (replicated model) or sharded with FSDP2, in a plain loop.

    torchrun --nproc_per_node 2 examples/distributed/zo_multiprocess.py                 # data parallel, SmallCNN
    torchrun --nproc_per_node 2 examples/distributed/zo_multiprocess.py --fsdp          # FSDP2 shards
    torchrun --nproc_per_node 2 examples/distributed/zo_multiprocess.py --model smollm2-135m --steps 4

Nothing hiso-specific is needed for data parallelism: once ``torch.distributed`` is initialised, the optimizer
exchanges the ranks' losses (a few dozen bytes per step) and every rank applies the same update. Do not wrap the
model in DistributedDataParallel: there is no backward, and DDP's gradient buckets would cost a copy of the
parameters. Every rank must build the same model (same seed or the same checkpoint); the first step checks it.

The script prints, on rank 0, the median step time, the median time in the loss exchange (the two all_gather calls,
including waiting for the slowest rank), the bytes each rank sends per step, and whether all ranks end with the same
weights (replicated) or the same digest of the gathered weights (FSDP2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from hiso.optim import ZOSGD, HiSo
from hiso.optim.distributed import LossExchange, weights_digest


def build(args, rank, world):
    """Model, loss closure factory (step -> closure over this rank's batch), and the FSDP2 blocks to shard."""
    if args.model == "cnn":
        from hiso.tasks import SmallCNN, get_task

        task = get_task("fashion_mnist", num_train=4096, num_eval=64)
        torch.manual_seed(0)
        model = SmallCNN()
        batches = task.make_batches(task.train_examples, args.batch_size, shuffle=True, seed=0)
        blocks = [m for m in model.children() if any(p.requires_grad for p in m.parameters())]
    else:
        from hiso.models import load_causal_lm
        from hiso.tasks import get_task

        model, tokenizer = load_causal_lm(args.model)
        task = get_task("sst2", args.data_dir, tokenizer=tokenizer, num_train=512, num_eval=8, max_length=64)
        batches = task.make_batches(task.train_examples, args.batch_size)
        blocks = list(model.model.layers)

    def closure(step):
        batch = batches[(step * world + rank) % len(batches)]  # each rank its own shard of the global batch
        return lambda: task.loss(model, batch)

    return model.eval(), closure, blocks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cnn", help="cnn (SmallCNN on Fashion-MNIST) or smollm2-135m (SST-2)")
    p.add_argument("--method", default="zosgd", choices=["zosgd", "hiso"])
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2's fully_shard")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--num-directions", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    dist.init_process_group("gloo" if not torch.cuda.is_available() else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, closure, blocks = build(args, rank, world)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for block in blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # build the optimizer after this, before any forward
    cls = HiSo if args.method == "hiso" else ZOSGD
    opt = cls(model.parameters(), lr=args.lr, mu=1e-3, num_directions=args.num_directions, seed=0)

    step_times, exchange_times = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        loss = opt.step(closure(step))
        step_times.append(time.perf_counter() - start)
        exchange_times.append(opt.last_exchange_seconds)
        if rank == 0 and (step + 1) % max(1, args.steps // 5) == 0:
            print(f"step {step + 1:4d}  loss {loss:.4f}", flush=True)

    # the exchange alone: the same two all_gather calls, started together after a barrier
    evaluations = len(opt.history[-1].scalars) * (2 if opt.difference == "central" else 1) + opt._needs_f0()
    alone = []
    for i in range(200):
        dist.barrier()
        exchange = LossExchange(dist.group.WORLD, seed=i, step=i)
        exchange([[1.0]] * evaluations)
        alone.append(exchange.seconds)

    if args.fsdp:
        digest = weights_digest([q.full_tensor() for q in model.parameters()])
    else:
        digest = weights_digest(list(model.parameters()))
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        step_ms, exch_ms = 1e3 * statistics.median(step_times[1:]), 1e3 * statistics.median(exchange_times[1:])
        print(f"{world} processes, {'FSDP2' if args.fsdp else 'data parallel'}, {args.model}, "
              f"{sum(q.numel() for q in model.parameters()):,} parameters, P = {args.num_directions}")
        alone_ms = 1e3 * statistics.median(alone)
        print(f"median step {step_ms:.2f} ms; loss exchange in the step {exch_ms:.3f} ms "
              f"({100 * exch_ms / step_ms:.2f}%, includes waiting for the slowest rank); "
              f"the exchange alone {alone_ms:.3f} ms "
              f"({100 * alone_ms / step_ms:.3f}%); {opt.last_exchange_bytes} bytes sent per rank per step")
        print(f"identical weights on every rank: {len(set(digests)) == 1}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
