"""Similarity matching trained with DistributedDataParallel on several CPU processes.

Each process runs the inner loops of its own shard of every batch; DDP averages
the gradients of the training loss, which the wrapped module's forward returns
(the supported pattern: see the README's "Distributed training"). At the end
the script checks that every process holds the same parameters and prints the
loss of the whole data set.

Run (scikit-learn needed for the digits data)::

    torchrun --nproc_per_node=2 examples/ddp_similarity_matching.py
    torchrun --nproc_per_node=2 examples/ddp_similarity_matching.py --epochs 2
"""

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torchiter.models import SimilarityMatching, TrainingLoss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split over the processes")
    p.add_argument("--components", type=int, default=8)
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun provides rank, world size and rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits

    x_all = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    x_all = x_all - x_all.mean(0)
    torch.manual_seed(0)  # the same initial model and batch order on every process
    model = SimilarityMatching(nn.Linear(64, args.components, bias=False), args.components,
                               iteration_lr=0.1, iteration_projection=nn.ReLU(), max_iterations=50)
    ddp = DDP(TrainingLoss(model))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.02)
    per_rank = args.batch_size // world
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_all))
        for start in range(0, len(x_all) - args.batch_size + 1, args.batch_size):
            batch = x_all[order[start : start + args.batch_size]]
            opt.zero_grad()
            ddp(batch[rank * per_rank : (rank + 1) * per_rank]).backward()
            opt.step()
        with torch.no_grad():
            loss = model.loss(x_all, model(x_all)).item()
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: loss on all {len(x_all)} digits {loss:.5f}")
    # Every replica must hold the same parameters.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    lowest = flat.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"{world} processes, largest parameter difference between them: {(spread - lowest).max().item():.3g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
