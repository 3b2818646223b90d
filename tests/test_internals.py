"""Pins the private PyTorch behaviour that torchiter._internals relies on."""

import pytest
import torch

from torchiter import _internals


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is needed")
def test_ddp_records_the_module_running_its_forward():
    from torch.nn.parallel import DistributedDataParallel

    assert _internals.active_ddp_module() is None
    # The attribute DDP sets around its forward (read here, set by DDP's
    # _inside_ddp_forward context manager).
    assert "_active_ddp_module" in vars(DistributedDataParallel)
    sentinel = object()
    ctx = DistributedDataParallel._inside_ddp_forward(sentinel)  # type: ignore[arg-type]
    with ctx:
        assert _internals.active_ddp_module() is sentinel
    assert _internals.active_ddp_module() is None
