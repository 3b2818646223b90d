"""Private PyTorch internals torchiter relies on, each behind one named helper.

Every use of a private torch API lives here, with a test in
``tests/test_internals.py`` pinning the behaviour relied on, so that a torch
upgrade that changes one of them is a change to this file alone.
"""

from typing import Optional

import torch


def active_ddp_module() -> Optional[torch.nn.Module]:
    """The ``DistributedDataParallel`` module whose forward is running, or None.

    DDP records itself in a class attribute for the duration of its forward
    (for TorchDynamo); torchiter's models read it to tell a loss computed
    inside the wrapped forward from one computed outside it.
    """
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return getattr(DistributedDataParallel, "_active_ddp_module", None)
