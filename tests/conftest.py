import pytest
import torch

import torchiter  # registers the ops


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.append("cuda")
    return devs


DEVICES = _devices()


# Test files whose tests lean on torch's own APIs that change between
# releases: custom-op registration and opcheck, meta and fake tensors,
# autograd, torch.compile, torch.export and AOTInductor, TorchScript, module
# copies and pickling, the CUDA tests' skips. CI runs them (-m torch_api) on
# the other supported torch versions; the numerics sweeps of the kernels,
# whose code does not change with torch, run on the main one.
TORCH_API_FILES = {
    "test_aoti.py", "test_compiled.py", "test_cuda.py", "test_cuda_numerics.py", "test_cuda_sync.py",
    "test_doc_names.py", "test_export_models.py", "test_graphs.py", "test_handling.py", "test_implicit.py",
    "test_internals.py", "test_loop_paths.py", "test_models.py", "test_models_stats.py", "test_modules.py",
    "test_no_silent_failures.py", "test_quadratic_descent.py", "test_quadratic_descent_grad.py",
    "test_replay.py", "test_sgd_step.py", "test_stats.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in TORCH_API_FILES:
            item.add_marker(pytest.mark.torch_api)


def pytest_report_header(config):
    return (
        f"torchiter CPU kernels: {torchiter.cpu_capability()} variant "
        f"(this CPU runs: {', '.join(torchiter._C._cpu_capabilities())}); "
        f"bfloat16 mixing on {torchiter.cpu_bfloat16_units()}; {torch.get_num_threads()} torch threads"
    )


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
