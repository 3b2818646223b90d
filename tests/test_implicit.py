"""Gradients of iteration modules' fixed points (torchiter.implicit)."""

import pytest
import torch
from torch import nn

import torchiter
from torchiter.implicit import FixedPointGradient
from torchiter.models import SimilarityMatching, SparseCoding
from torchiter.reference import project

F64 = torch.float64


class Ridge(torchiter.IterationLossModule):
    """z* = argmin ½‖W z − x‖² + ½ lam ‖z‖² (optionally z >= 0), by projected SGD."""

    def __init__(self, n_in=7, n_out=5, lam=0.5, **kwargs):
        kwargs.setdefault("iteration_lr", 0.1)
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(0)
        self.W = nn.Parameter(torch.randn(n_in, n_out, dtype=F64, generator=g) / n_in**0.5)
        self.lam = lam
        self.register_buffer("z", torch.zeros(0, dtype=F64))

    def pre_iteration(self, x):
        self.z = torch.zeros(x.shape[0], self.W.shape[1], dtype=F64)
        super().pre_iteration(x)

    def iteration_parameters(self):
        return [self.z]

    def iteration_loss(self, x):
        return 0.5 * ((self.z @ self.W.T - x) ** 2).sum() + 0.5 * self.lam * (self.z**2).sum()

    def post_iteration(self, x):
        super().post_iteration(x)
        return self.z.detach()


def _closed_form(W, x, lam, active=None):
    """The fixed point in closed form (on a given active set), differentiable."""
    H = W.T @ W + lam * torch.eye(W.shape[1], dtype=F64)
    rhs = x @ W
    if active is None:
        return torch.linalg.solve(H, rhs.T).T
    rows = []
    for i in range(x.shape[0]):
        m = active[i]
        zi = torch.zeros(W.shape[1], dtype=F64)
        zi = zi.index_put((m.nonzero()[:, 0],), torch.linalg.solve(H[m][:, m], rhs[i][m]))
        rows.append(zi)
    return torch.stack(rows)


def _assert_same_gradients(out, ref, inputs, tol):
    """Gradients of ``out`` and ``ref`` under one random upstream gradient agree."""
    w = torch.randn_like(out)
    g = torch.autograd.grad((out * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    assert max(float(t.abs().max()) for t in g_ref) > 0.01  # gradients that can disagree
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def _x(n=6, n_in=7, seed=1):
    return torch.randn(n, n_in, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_implicit_mode_matches_closed_form(relu):
    model = Ridge(max_iterations=2000, fixed_point_gradient=FixedPointGradient("implicit"),
                  iteration_projection=nn.ReLU() if relu else None)
    x = _x().requires_grad_(True)
    z = model(x)
    assert z.requires_grad
    active = (z > 0) if relu else None
    if relu:
        assert (~active).any() and active.any()
    ref = _closed_form(model.W, x, model.lam, active)
    torch.testing.assert_close(z.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    _assert_same_gradients(z, ref, (model.W, x), 1e-8)
    # the module's own state is untouched and detached
    assert not model.z.requires_grad


def _manual_unrolled(model, x, k, relu):
    """The last k SGD steps of the loop, recorded by autograd."""
    plain = Ridge(max_iterations=model.max_iterations - k, iteration_lr=model.it_optim_kwargs["lr"],
                  iteration_projection=nn.ReLU() if relu else None)
    plain.W = model.W
    z = plain(x.detach())
    for _ in range(k):
        loss_grad = z @ model.W.T @ model.W - x @ model.W + model.lam * z
        z = z - 0.1 * loss_grad
        z = torch.relu(z) if relu else z
    return z


@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_unrolled_mode_differentiates_the_last_k_steps(relu):
    k, n = 5, 30
    model = Ridge(max_iterations=n, fixed_point_gradient=FixedPointGradient("unrolled", unroll=k),
                  iteration_projection=nn.ReLU() if relu else None)
    x = _x().requires_grad_(True)
    z = model(x)
    # the value is that of the ordinary forward with the same budget
    plain = Ridge(max_iterations=n, iteration_projection=nn.ReLU() if relu else None)
    torch.testing.assert_close(z.detach(), plain(x.detach()), rtol=1e-12, atol=1e-12)
    ref = _manual_unrolled(model, x, k, relu)
    _assert_same_gradients(z, ref, (model.W, x), 1e-10)


def test_unrolled_converges_to_implicit_as_k_grows():
    x = _x()
    grads = {}
    for name, cfg in [("implicit", FixedPointGradient("implicit")), ("k5", FixedPointGradient("unrolled", unroll=5)),
                      ("k400", FixedPointGradient("unrolled", unroll=400))]:
        model = Ridge(max_iterations=2000, fixed_point_gradient=cfg)
        (grads[name],) = torch.autograd.grad(model(x).sum(), model.W)
    err = {k: float((grads[k] - grads["implicit"]).abs().max()) for k in ("k5", "k400")}
    assert err["k400"] < 1e-8 < err["k5"]


def test_conjugate_gradient_budget_too_small_warns():
    model = Ridge(max_iterations=2000, fixed_point_gradient=FixedPointGradient(cg_max_iterations=1))
    z = model(_x())
    with pytest.warns(RuntimeWarning, match=r"conjugate gradient stopped after 1 iterations"):
        torch.autograd.grad(z.sum(), model.W)


def test_no_gradient_without_the_option_or_under_no_grad():
    assert not Ridge(max_iterations=5)(_x()).requires_grad
    model = SparseCoding(6, 8, max_iterations=5, iteration_lr=0.3, fixed_point_gradient=FixedPointGradient())
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert not model(x).requires_grad
    assert model(x).requires_grad


def test_forward_not_returning_the_state_is_an_error():
    class Summed(Ridge):
        def post_iteration(self, x):
            return super().post_iteration(x).sum(dim=1)

    with pytest.raises(RuntimeError, match="returned none of the iteration parameters"):
        Summed(max_iterations=5, fixed_point_gradient=FixedPointGradient())(_x())


def test_unrolled_needs_plain_sgd():
    model = Ridge(max_iterations=5, fixed_point_gradient=FixedPointGradient("unrolled", unroll=2),
                  it_optim_kwargs={"momentum": 0.9})
    with pytest.raises(ValueError, match="SGD without momentum"):
        model(_x())
    assert model.W.requires_grad  # flags restored after the failure


@pytest.mark.parametrize("bad, match", [(dict(mode="phantom"), "mode"), (dict(unroll=0), "unroll")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        FixedPointGradient(**bad)


# ---------------------------------------------------------------- models


def _sparse_coding(cfg, hook=False, **kw):
    torch.manual_seed(0)
    model = SparseCoding(6, 8, sparsity=0.05, max_iterations=3000, iteration_lr=0.3, fixed_point_gradient=cfg, **kw).double()
    if hook:  # forces the per-iteration path
        model.register_iteration_hook("iteration", lambda m: False)
    return model


def _ista_reference(model, x, iters, lo=None):
    D = model.dictionary
    y = torch.zeros(x.shape[0], D.shape[1], dtype=F64)
    A, b = D.T @ D, x @ D
    for _ in range(iters):
        y = project(y - 0.3 * (y @ A.T - b), 0.3 * 0.05, lo, None)
    return y


@pytest.mark.parametrize("hook", [False, True], ids=["fused", "per_iteration"])
@pytest.mark.parametrize("nonneg", [False, True], ids=["signed", "nonneg"])
def test_sparse_coding_implicit_matches_unrolled_reference(hook, nonneg):
    model = _sparse_coding(FixedPointGradient("implicit"), hook=hook, nonnegative=nonneg)
    x = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    codes = model(x)
    ref = _ista_reference(model, x, 3000, 0.0 if nonneg else None)
    torch.testing.assert_close(codes.detach(), ref.detach(), rtol=1e-9, atol=1e-9)
    assert (codes == 0).any()
    _assert_same_gradients(codes, ref, (model.dictionary, x), 1e-7)


def test_sparse_coding_unrolled_matches_manual_steps():
    k = 4
    model = _sparse_coding(FixedPointGradient("unrolled", unroll=k))
    model.max_iterations = 50
    x = torch.randn(5, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    codes = model(x)
    start = _ista_reference(model, x, 50 - k).detach()
    D = model.dictionary
    y = start
    for _ in range(k):
        y = project(y - 0.3 * (y @ (D.T @ D).T - x @ D), 0.3 * 0.05)
    torch.testing.assert_close(codes.detach(), y.detach(), rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(codes.sum(), D)
    (g_ref,) = torch.autograd.grad(y.sum(), D)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_similarity_matching_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model = SimilarityMatching(nn.Linear(6, 4, bias=False), 4, max_iterations=400, iteration_lr=0.2,
                               iteration_projection=nn.ReLU(), fixed_point_gradient=FixedPointGradient()).double()
    x = torch.randn(9, 6, dtype=F64)
    y = model(x)
    W = model.encoders[0].weight
    M = model.competitor.weight
    yr = torch.zeros(9, 4, dtype=F64)
    for _ in range(400):
        yr = torch.relu(yr - 0.2 * (yr @ M.T - x @ W.T))
    torch.testing.assert_close(y.detach(), yr.detach(), rtol=1e-9, atol=1e-9)
    (g,) = torch.autograd.grad(y.sum(), W)
    (g_ref,) = torch.autograd.grad(yr.sum(), W)
    assert g.abs().max() > 0.01
    torch.testing.assert_close(g, g_ref, rtol=1e-7, atol=1e-7)
