"""torchiter.models under DistributedDataParallel (gloo, two CPU processes).

The supported pattern: DDP wraps a module whose forward runs the model and
returns the training loss. Two processes, each on half of the batch, must
train to the parameters one process reaches on the whole batch.
"""

import gc
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from torchiter.models import SimilarityMatching, SparseCoding, TrainingLoss

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is needed"
)

WORLD = 2
STEPS = 4


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "nsm":
        m = SimilarityMatching(nn.Linear(8, 5), 5, iteration_lr=0.1, iteration_projection=nn.ReLU(), max_iterations=25)
    else:
        m = SparseCoding(6, 8, sparsity=0.05, iteration_lr=0.2, max_iterations=25)
    return m.double()


def _data() -> torch.Tensor:
    return torch.randn(12, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _train(module: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    for _ in range(STEPS):
        opt.zero_grad()
        module(x).backward()
        opt.step()


def _quiesce() -> None:
    # Gloo can abort a process ("terminate called without an active exception") when one rank
    # tears its process group down while the other still has work or a DDP reducer bound to it:
    # callers drop their DDP module first, and both ranks meet here before destroy_process_group.
    gc.collect()
    dist.barrier()


def _worker(rank: int, init_file: str, kind: str, broadcast_buffers: bool, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model(kind)
        ddp = DDP(TrainingLoss(model), broadcast_buffers=broadcast_buffers)
        _train(ddp, _data().chunk(WORLD)[rank])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
        del ddp
        _quiesce()
    finally:
        dist.destroy_process_group()


def _worker_loss_outside(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model("nsm")
        ddp = DDP(model, static_graph=True)
        x = _data().chunk(WORLD)[rank]
        try:
            y = ddp(x)
            model.loss(x, y).backward()
            message = "no error"
        except RuntimeError as e:
            message = str(e)
        if rank == 0:
            with open(out, "w") as f:
                f.write(message)
        del ddp
        _quiesce()
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args) -> None:
    mp.start_processes(fn, args=args, nprocs=WORLD, join=True, start_method="spawn")


@pytest.mark.parametrize("kind", ["nsm", "sparse"])
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_training_matches_one_process_on_the_whole_batch(tmp_path, kind, broadcast_buffers):
    out = str(tmp_path / "rank0.pt")
    _spawn(_worker, str(tmp_path / "init"), kind, broadcast_buffers, out)
    distributed = torch.load(out)

    model = _model(kind)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _train(TrainingLoss(model), _data())
    single = model.state_dict()
    for name, value in single.items():
        assert not torch.equal(value, start[name]) or name.endswith("bias"), f"{name} did not train"
        torch.testing.assert_close(distributed[name], value, rtol=1e-10, atol=1e-12, msg=name)


def test_loss_outside_the_ddp_forward_fails_loudly(tmp_path):
    out = tmp_path / "message.txt"
    _spawn(_worker_loss_outside, str(tmp_path / "init"), str(out))
    message = out.read_text()
    assert "outside the forward of the DistributedDataParallel" in message, message
