import pytest
import torch

import torchiter  # registers the ops


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = _devices()


def pytest_report_header(config):
    return (
        f"torchiter CPU kernels: {torchiter.cpu_capability()} variant "
        f"(this CPU runs: {', '.join(torchiter._C._cpu_capabilities())}); {torch.get_num_threads()} torch threads"
    )


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
