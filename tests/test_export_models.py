"""torchiter.models under torch.export with a dynamic batch dimension, default settings.

The exported program must keep the batch symbolic (no guard on its size from the models' Python
code or the ops' Meta kernels) and give the eager model's outputs at other batch sizes. The
AOTInductor package of such a program is built by the AOTInductor block of docs/deployment.md
(tests/test_docs.py, ``aoti`` marker).
"""

import pytest
import torch
from torch import nn

import torchiter  # noqa: F401  (registers torch.ops.torchiter.*)
from torchiter.models import SimilarityMatching, SparseCoding, SupervisedSimilarityMatching

pytestmark = [
    pytest.mark.filterwarnings("error"),
    # torch.export's deep copy of the graph warns about torch's own pytree API in torch 2.13.
    pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    # The models keep their state in a plain attribute that the forward replaces; the exported
    # program returns the state instead (see docs/deployment.md's torch.export section).
    pytest.mark.filterwarnings(r"ignore:The tensor attribute self\.(y|codes) was assigned during export:UserWarning"),
]


def _conv_nsm():
    model = SimilarityMatching(nn.Conv2d(1, 50, 6, bias=False), 50, iteration_projection=nn.ReLU())
    return model, lambda n: (torch.randn(n, 1, 28, 28),)


def _supervised():
    model = SupervisedSimilarityMatching(nn.Conv2d(1, 6, 3), 10, 6, iteration_projection=nn.ReLU())
    return model, lambda n: (torch.randn(n, 1, 8, 8), torch.randint(10, (n,)))


def _sparse_coding():
    model = SparseCoding(32, 64, sparsity=0.1, iteration_lr=0.2)
    return model, lambda n: (torch.randn(n, 64),)


@pytest.mark.parametrize("make", [_conv_nsm, _supervised, _sparse_coding], ids=["conv_nsm", "supervised", "sparse_coding"])
def test_model_exports_with_dynamic_batch(make):
    torch.manual_seed(0)
    model, inputs = make()
    example = inputs(100)  # the conv layer's state is above the size where the models change how they keep it
    batch = torch.export.Dim("batch")
    ep = torch.export.export(model, example, dynamic_shapes={"args": tuple({0: batch} for _ in example)})
    (symbol,) = {s for s in ep.range_constraints}
    assert ep.range_constraints[symbol].upper > 2**30, f"the batch was bounded: {ep.range_constraints}"
    for n in (1, 3, 257):
        xs = inputs(n)
        assert torch.allclose(ep.module()(*xs), model(*xs), atol=1e-5)


class _PerSample(nn.Module):
    def forward(self, y0, A, b):
        r = torch.ops.torchiter.quadratic_descent_ex(y0, A, b, 0.5, 50, 1e-6, 1, None, 0.0, None, None, True, True)
        return r[0], r[1], r[3]


def test_meta_kernel_keeps_per_sample_statistics_symbolic():
    batch = torch.export.Dim("batch")
    A = torch.eye(3) + 0.1
    args = (torch.zeros(5, 3, 2), A, torch.randn(5, 3, 2))
    ep = torch.export.export(_PerSample(), args, dynamic_shapes=({0: batch}, None, {0: batch}))
    b = torch.randn(9, 3, 2)
    y, iterations, change = ep.module()(torch.zeros(9, 3, 2), A, b)
    assert y.shape == (9, 3, 2) and iterations.shape == (9,) and change.shape == (9,)
    want = torchiter.ops.quadratic_descent_ex(torch.zeros(9, 3, 2), A, b, 0.5, 50, 1e-6, per_sample=True)
    assert torch.equal(y, want.y) and torch.equal(iterations, want.iterations)
