"""Similarity matching's training loss against the formula of models.md in float64.

The loss of a forward's output (no graph) runs as ``2·⟨M, G⟩ − 4·⟨y, Wx⟩``
with ``G = Σ y yᵀ``; these tests hold it to the written-out formula, value and
gradients, across layouts, dtypes and the cases that keep the formula.
"""

import copy

import pytest
import torch
from torch import nn

from torchiter.models import SimilarityMatching, SupervisedSimilarityMatching, _SimilarityFit


def mix(M, y):
    return torch.einsum("ij,bj...->bi...", M, y)


def formula(M, Wx, y, params, C, whiten=()):
    """models.md's loss in float64 (encoder weights "weight", the ``whiten`` outputs "whiten")."""
    loss = (2 * (y * mix(M, y)).sum() - 4 * (y * Wx).sum()) / y.numel() - (M**2).sum() / C
    loss = loss + sum((p**2).sum() for p in params) * 2 / C
    for w in whiten:
        loss = loss + 2 * (w**2).mean()
    return loss


def graph_names(t):
    names, seen, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and id(fn) not in seen:
            seen.add(id(fn))
            names.add(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


class Lift(nn.Module):
    """(B, F) -> (B, C, *spatial): a linear map per position of a fixed random pattern."""

    def __init__(self, features, C, spatial, dtype):
        super().__init__()
        self.lin = nn.Linear(features, C, dtype=dtype)
        self.register_buffer("pattern", torch.rand(spatial, dtype=dtype))

    def forward(self, x):
        out = self.lin(x)
        return out.reshape(out.shape + (1,) * self.pattern.dim()) * self.pattern


def make(C, spatial, dtype, seed):
    torch.manual_seed(seed)
    enc = Lift(4, C, spatial, dtype) if spatial else nn.Linear(4, C, dtype=dtype)
    model = SimilarityMatching(enc, C, tau=0.25, max_iterations=30, iteration_lr=0.1,
                               iteration_projection=nn.ReLU()).to(dtype)
    with torch.no_grad():
        P = 0.1 * torch.randn(C, C, dtype=dtype)
        model.competitor.weight.add_(P + P.T)
    return model, enc


# (batch, C, spatial): no spatial dims, fewer positions than channels, more positions than channels
CASES = [(37, 5, ()), (13, 7, (3,)), (6, 5, (9, 11)), (3, 17, (1,)), (1, 3, (40,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,C,spatial", CASES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_view"])
def test_loss_and_gradients_match_the_formula(dtype, B, C, spatial, layout):
    model, enc = make(C, spatial, dtype, seed=B * 100 + C)
    x = torch.randn(B, 4, dtype=dtype)
    y = model(x)
    if layout == "channels_last_view":
        # Same values, another memory order: dims permuted to the back and viewed back.
        y = y.movedim(1, -1).contiguous().movedim(-1, 1)
    assert (y > 0).any()
    loss = model.loss(x, y)
    assert "_SimilarityFitBackward" in graph_names(loss)
    model.zero_grad()
    loss.backward()

    M64 = model.competitor.weight.detach().double().requires_grad_(True)
    enc64 = copy.deepcopy(enc).double()
    ref = formula(M64, enc64(x.double()), y.double(), list(enc64.parameters()), C)
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.double(), ref.detach(), **tol)
    torch.testing.assert_close(model.competitor.weight.grad.double(), M64.grad * (-1 / 0.25), **tol)
    for p, q in zip(enc.parameters(), enc64.parameters()):
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad.double(), q.grad, **tol)


def test_gradcheck_in_float64():
    model, _ = make(4, (3, 2), torch.float64, seed=3)
    x = torch.randn(5, 4, dtype=torch.float64)
    y = model(x)
    M = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    Wx = torch.randn_like(y, requires_grad=True)
    fit = lambda M, y, Wx: _SimilarityFit.apply(M, y, Wx)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fit, (M, y, Wx))
    assert torch.autograd.gradgradcheck(fit, (M, y, Wx))


def test_torch_func_transforms_take_the_fit():
    # torch.func.grad and vmap (per-sample gradients of M) give the formula's gradients.
    torch.manual_seed(8)
    y = torch.rand(5, 4, 3, dtype=torch.float64).clamp(min=0.3) - 0.3
    Wx = torch.randn_like(y)
    Ms = torch.randn(6, 4, 4, dtype=torch.float64)
    fit = lambda M, y, Wx: _SimilarityFit.apply(M, y, Wx)[0]  # noqa: E731
    plain = lambda M, y, Wx: 2 * (y * mix(M, y)).sum() - 4 * (y * Wx).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.grad(fit)(Ms[0], y, Wx), torch.func.grad(plain)(Ms[0], y, Wx))
    ours = torch.func.vmap(torch.func.grad(fit), in_dims=(0, None, None))(Ms, y, Wx)
    theirs = torch.func.vmap(torch.func.grad(plain), in_dims=(0, None, None))(Ms, y, Wx)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.func.grad(fit, argnums=2)(Ms[0], y, Wx), -4 * y)


def test_output_with_a_graph_keeps_the_formula_and_its_gradient_in_y():
    model, enc = make(6, (5,), torch.float64, seed=4)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = model(x).clone().requires_grad_(True)
    loss = model.loss(x, y)
    assert "_SimilarityFitBackward" not in graph_names(loss)
    loss.backward()
    y_ref = y.detach().clone().requires_grad_(True)
    M = model.competitor.weight.detach()
    formula(M, enc(x).detach(), y_ref, [], 6).backward()
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_formula(dtype):
    model, enc = make(6, (5,), dtype, seed=5)
    x = torch.randn(7, 4, dtype=dtype)
    y = model(x)
    loss = model.loss(x, y)
    assert "_SimilarityFitBackward" not in graph_names(loss)
    M = model.competitor.weight
    Wx = enc(x)
    plain = (2 * (y * mix(M, y)).sum() - 4 * (y * Wx).sum()) / y.numel() - (M**2).sum() / 6
    for p in enc.parameters():
        plain = plain + (p**2).sum() * (2.0 / 6)
    assert torch.equal(loss, plain)


@pytest.mark.parametrize("given", ["both", "images", "labels"])
def test_supervised_loss_with_whitened_labels(given):
    torch.manual_seed(6)
    enc = nn.Conv2d(1, 5, 3, bias=False, dtype=torch.float64)
    model = SupervisedSimilarityMatching(enc, 4, 5, max_iterations=20, iteration_lr=0.1,
                                         iteration_projection=nn.ReLU()).double()
    x = torch.rand(6, 1, 7, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 1, 2, 0])
    inputs = {"both": (x, labels), "images": (x, None), "labels": (None, labels)}[given]
    y = model(*inputs)
    loss = model.loss(*inputs, y)
    model.zero_grad()
    loss.backward()

    M = model.competitor.weight.detach().clone().requires_grad_(True)
    conv, lab = copy.deepcopy(model.encoders[0]), copy.deepcopy(model.encoders[1])
    Wc = conv(x) if inputs[0] is not None else None
    Wl = lab(nn.functional.one_hot(labels, 4).double()) if inputs[1] is not None else None
    if Wc is not None and Wl is not None:
        Wl = Wl[:, :, None, None].expand(Wc.shape)  # the label code at every position
    Wx = sum(w for w in (Wc, Wl) if w is not None)
    ref = formula(M, Wx, y, list(conv.parameters()), 5, whiten=[Wl] if Wl is not None else [])
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.competitor.weight.grad, M.grad * (-1 / 0.1), rtol=1e-12, atol=1e-12)
    for mine, theirs in ((model.encoders[0], conv), (model.encoders[1], lab)):
        for p, q in zip(mine.parameters(), theirs.parameters()):
            if q.grad is None:
                assert p.grad is None or not p.grad.any()
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("supervised", [False, True])
def test_reference_loss_of_the_benchmarks_matches_the_model(supervised):
    # torchiter.reference.original_nsm_loss, the notebooks' baseline: the formula through einsum.
    from torchiter.reference import original_nsm_loss

    torch.manual_seed(7)
    enc = nn.Conv2d(1, 6, 3, bias=False, dtype=torch.float64)
    kw = dict(max_iterations=15, iteration_lr=0.2, iteration_projection=nn.ReLU())
    model = (SupervisedSimilarityMatching(enc, 3, 6, **kw) if supervised else SimilarityMatching(enc, 6, **kw)).double()
    perturb = 0.05 * torch.randn(6, 6, dtype=torch.float64)
    with torch.no_grad():
        model.competitor.weight.add_(perturb + perturb.T)
    x = torch.rand(4, 1, 9, 7, dtype=torch.float64)
    inputs = (x, torch.tensor([2, 0, 1, 2])) if supervised else (x,)
    y = model(*inputs)
    twin = copy.deepcopy(model)
    theirs = original_nsm_loss(twin, *inputs, y)
    assert "_SimilarityFitBackward" not in graph_names(theirs)
    ours = model.loss(*inputs, y)
    torch.testing.assert_close(theirs, ours, rtol=1e-12, atol=1e-12)
    theirs.backward()
    ours.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)
