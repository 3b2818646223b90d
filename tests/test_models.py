"""torchiter.models against a plain float64 implementation of models.md."""

import copy

import pytest
import torch
from torch import nn

import torchiter
from torchiter.models import MultiSimilarityMatching, SimilarityMatching, SparseCoding, SupervisedSimilarityMatching


def mix(M, y):
    return torch.einsum("ij,bj...->bi...", M, y)


def plain_nsm_forward(M, Wx, lr, iterations, tol, relu):
    """The inner loop of models.md written out: gradient M·y − Wx, step, projection."""
    y = torch.zeros_like(Wx)
    n = 0
    for k in range(iterations):
        new = y - lr * (mix(M, y) - Wx)
        if relu:
            new = new.clamp(min=0)
        done = tol > 0 and k >= 1 and bool((new - y).abs().max() < tol)
        y, n = new, k + 1
        if done:
            break
    return y, n


def plain_nsm_loss(M, Wx_list, encoders, regs, y, C):
    Wx = sum(w for w in Wx_list if w is not None)
    loss = (2 * (y * mix(M, y)).sum() - 4 * (y * Wx).sum()) / y.numel() - (M**2).sum() / C
    for enc, reg, w in zip(encoders, regs, Wx_list):
        if reg == "weight":
            loss = loss + sum((p**2).sum() for p in enc.parameters() if p.requires_grad) * 2 / C
        elif reg == "whiten" and w is not None:
            loss = loss + 2 * (w**2).mean()
    return loss


def perturb_competitor(model, scale=0.05):
    with torch.no_grad():
        P = scale * torch.randn_like(model.competitor.weight)
        model.competitor.weight.add_(P + P.T)


def force_generic(model):
    """An iteration hook that never stops the loop: forbids the whole-loop op."""
    return model.register_iteration_hook("iteration", lambda m: False)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_similarity_matching_forward_and_loss(relu, tol):
    enc = nn.Linear(7, 5, dtype=torch.float64)
    model = SimilarityMatching(
        enc, 5, tau=0.3, tol=tol, max_iterations=300, iteration_lr=0.2,
        iteration_projection=nn.ReLU() if relu else None,
    ).double()
    perturb_competitor(model)
    x = torch.randn(31, 7, dtype=torch.float64)
    y = model(x)
    M = model.competitor.weight.detach()
    ref, n = plain_nsm_forward(M, enc(x).detach(), 0.2, 300, tol, relu)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert model.iteration_idx + 1 == n
    if tol > 0:
        assert n < 300
    assert not y.requires_grad

    # loss and its gradients, including the -1/tau scaling of M's gradient
    loss = model.loss(x, y)
    model.zero_grad()
    loss.backward()
    M_ref = M.clone().requires_grad_(True)
    enc_ref = copy.deepcopy(enc)
    ref_loss = plain_nsm_loss(M_ref, [enc_ref(x)], [enc_ref], ["weight"], y, 5)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(model.competitor.weight.grad, M_ref.grad * (-1 / 0.3))
    for p, q in zip(enc.parameters(), enc_ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_multi_encoders_with_none_inputs_and_regularizations():
    encs = [nn.Linear(4, 6, dtype=torch.float64), nn.Linear(3, 6, bias=False, dtype=torch.float64), nn.Linear(2, 6, dtype=torch.float64)]
    regs = ["weight", "whiten", "none"]
    model = MultiSimilarityMatching(encs, 6, tau=0.5, max_iterations=50, iteration_lr=0.3,
                                    regularization=regs, iteration_projection=nn.ReLU()).double()
    perturb_competitor(model)
    xs = [torch.randn(9, 4, dtype=torch.float64), None, torch.randn(9, 2, dtype=torch.float64)]
    y = model(*xs)
    M = model.competitor.weight.detach()
    Wx = encs[0](xs[0]) + encs[2](xs[2])
    ref, _ = plain_nsm_forward(M, Wx.detach(), 0.3, 50, 0.0, True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # fewer inputs than encoders: the missing ones count as None
    y2 = model(xs[0])
    ref2, _ = plain_nsm_forward(M, encs[0](xs[0]).detach(), 0.3, 50, 0.0, True)
    torch.testing.assert_close(y2, ref2, rtol=1e-10, atol=1e-10)

    loss = model.loss(*xs, y)
    Wx_list = [encs[0](xs[0]), None, encs[2](xs[2])]
    torch.testing.assert_close(loss, plain_nsm_loss(M, Wx_list, encs, regs, y, 6))
    # "whiten" of an encoder whose input is present
    xs_b = [None, torch.randn(9, 3, dtype=torch.float64), None]
    yb = model(*xs_b)
    lb = model.loss(*xs_b, yb)
    torch.testing.assert_close(lb, plain_nsm_loss(M, [None, encs[1](xs_b[1]), None], encs, regs, yb, 6))


def test_supervised_labels_broadcast_over_space():
    conv = nn.Conv2d(1, 4, 3, dtype=torch.float64)
    model = SupervisedSimilarityMatching(conv, 3, 4, max_iterations=30, iteration_lr=0.5,
                                         iteration_projection=nn.ReLU()).double()
    assert model.regularization == ["weight", "whiten"]
    perturb_competitor(model)
    x = torch.randn(5, 1, 6, 6, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    onehot = nn.functional.one_hot(labels, 3).double()
    y = model(x, onehot)
    assert torch.equal(y, model(x, labels)), "integer labels are one-hot encoded"
    lab_enc = model.encoders[1]
    Wl = lab_enc(onehot)[:, :, None, None].expand(5, 4, 4, 4)
    Wx = conv(x) + Wl
    ref, _ = plain_nsm_forward(model.competitor.weight.detach(), Wx.detach(), 0.5, 30, 0.0, True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    loss = model.loss(x, onehot, y)
    ref_loss = plain_nsm_loss(model.competitor.weight, [conv(x), Wl], [conv, lab_enc], ["weight", "whiten"], y, 4)
    torch.testing.assert_close(loss, ref_loss)
    # without labels only the image encoder is used
    y0 = model(x)
    ref0, _ = plain_nsm_forward(model.competitor.weight.detach(), conv(x).detach(), 0.5, 30, 0.0, True)
    torch.testing.assert_close(y0, ref0, rtol=1e-10, atol=1e-10)


def test_unknown_regularization_is_an_error():
    with pytest.raises(ValueError, match="unknown regularization 'l2'"):
        SimilarityMatching(nn.Linear(2, 2), 2, regularization="l2")


def _train(model, x_args, steps, lr=0.01):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for _ in range(steps):
        y = model(*x_args)
        outs.append(y)
        opt.zero_grad()
        model.loss(*x_args, y).backward()
        opt.step()
    return outs


CASES = {
    "pca": lambda: (SimilarityMatching(nn.Linear(10, 3, bias=False), 3, tau=0.5, max_iterations=100, iteration_lr=0.1, tol=1e-5),
                    (torch.randn(200, 10),)),
    "clustering": lambda: (SimilarityMatching(nn.Linear(2, 10), 10, tau=0.5, max_iterations=200, iteration_lr=0.05, tol=1e-4,
                                              iteration_projection=nn.ReLU()), (torch.randn(100, 2),)),
    "conv": lambda: (SimilarityMatching(nn.Conv2d(1, 8, 3, bias=False), 8, max_iterations=20, iteration_lr=0.5,
                                        iteration_projection=torchiter.Clamp(min=0.0)), (torch.randn(6, 1, 9, 9),)),
    "supervised": lambda: (SupervisedSimilarityMatching(nn.Conv2d(1, 6, 3), 4, 6, max_iterations=20, iteration_lr=0.5,
                                                        iteration_projection=nn.ReLU()),
                           (torch.randn(6, 1, 7, 7), nn.functional.one_hot(torch.arange(6) % 4, 4).float())),
    "sparse_coding": lambda: (SparseCoding(12, 6, sparsity=0.1, nonnegative=True, max_iterations=50, iteration_lr=0.1,
                                           tol=1e-6), (torch.randn(20, 6),)),
    "scheduler_wd": lambda: (SimilarityMatching(nn.Linear(5, 4), 4, max_iterations=40, iteration_lr=0.3,
                                                iteration_projection=nn.ReLU(), iteration_scheduler=torch.optim.lr_scheduler.StepLR,
                                                it_sched_kwargs=dict(step_size=7, gamma=0.7), it_optim_kwargs=dict(weight_decay=0.05)),
                             (torch.randn(20, 5),)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_both_paths_agree_through_training(case, dtype):
    torch.manual_seed(3)
    fast, args = CASES[case]()
    fast = fast.to(dtype)
    args = tuple(a.to(dtype) for a in args)
    generic = copy.deepcopy(fast)
    force_generic(generic)
    y_fast = _train(fast, args, 4)
    y_gen = _train(generic, args, 4)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    for a, b in zip(y_fast, y_gen):
        torch.testing.assert_close(a, b, **tol)
    assert fast.iteration_idx == generic.iteration_idx
    for p, q in zip(fast.parameters(), generic.parameters()):
        torch.testing.assert_close(p, q, **tol)


def test_fast_path_is_taken_only_when_allowed(monkeypatch):
    calls = []
    real = torch.ops.torchiter.quadratic_descent_ex

    class Spy:
        def __call__(self, *a, **k):
            calls.append(1)
            return real(*a, **k)

    monkeypatch.setattr(torch.ops.torchiter, "quadratic_descent_ex", Spy())
    x = torch.randn(8, 3)

    def make(**kw):
        return SimilarityMatching(nn.Linear(3, 2), 2, max_iterations=5, **kw)

    make(iteration_projection=nn.ReLU())(x)
    assert len(calls) == 1
    for kw in [
        dict(iteration_projection=lambda t: t.clamp(min=0)),  # a user's own projection
        dict(it_optim_kwargs=dict(momentum=0.9)),
        dict(iteration_optimizer=torch.optim.Adam),
        dict(iteration_scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau),
    ]:
        m = make(**kw)
        if "iteration_scheduler" in kw:
            continue  # ReduceLROnPlateau needs a metric; only the plan matters
        m(x)
        assert len(calls) == 1, kw
    m = make()
    h = force_generic(m)
    m(x)
    assert len(calls) == 1
    h.remove()
    m(x)
    assert len(calls) == 2

    class Custom(SimilarityMatching):
        def converged(self, *xs):
            return self.iteration_idx >= 2

    c = Custom(nn.Linear(3, 2), 2, max_iterations=5)
    c(x)
    assert len(calls) == 2 and c.iteration_idx == 2


def test_pre_and_post_hooks_run_on_the_fast_path():
    events = []
    m = SimilarityMatching(nn.Linear(3, 2), 2, max_iterations=7)
    m.register_iteration_hook("pre", lambda mod: events.append(("pre", mod.iteration_idx)))
    m.register_iteration_hook("post", lambda mod: events.append(("post", mod.iteration_idx)))
    m(torch.randn(4, 3))
    assert events == [("pre", -1), ("post", 6)]
    assert all(p.requires_grad for p in m.parameters())
    assert not m.y.requires_grad


def plain_ista(D, x, lr, sparsity, iterations, nonneg):
    a = torch.zeros(x.shape[0], D.shape[1], dtype=x.dtype)
    for _ in range(iterations):
        v = a - lr * (a @ D.T @ D - x @ D)
        v = torch.sign(v) * (v.abs() - lr * sparsity).clamp(min=0)
        if nonneg:
            v = v.clamp(min=0)
        a = v
    return a


@pytest.mark.parametrize("nonneg", [False, True])
def test_sparse_coding(nonneg):
    model = SparseCoding(12, 6, sparsity=0.2, nonnegative=nonneg, max_iterations=60, iteration_lr=0.1).double()
    x = torch.randn(17, 6, dtype=torch.float64)
    a = model(x)
    D = model.dictionary.detach()
    ref = plain_ista(D, x, 0.1, 0.2, 60, nonneg)
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-10)
    assert (a == 0).any(), "the L1 penalty must produce exact zeros"
    if nonneg:
        assert (a >= 0).all()
    generic = copy.deepcopy(model)
    force_generic(generic)
    torch.testing.assert_close(generic(x), a, rtol=1e-10, atol=1e-10)
    loss = model.loss(x, a)
    ref_loss = (0.5 * ((x - a @ D.T) ** 2).sum(1) + 0.2 * a.abs().sum(1)).mean()
    torch.testing.assert_close(loss, ref_loss)
    loss.backward()
    assert model.dictionary.grad is not None and model.dictionary.grad.abs().sum() > 0


def test_scheduler_state_after_an_early_stop_matches_the_per_iteration_path():
    def make():
        torch.manual_seed(5)
        return SimilarityMatching(nn.Linear(10, 3, bias=False), 3, max_iterations=100, iteration_lr=0.1, tol=1e-3,
                                  iteration_scheduler=torch.optim.lr_scheduler.StepLR,
                                  it_sched_kwargs=dict(step_size=10, gamma=0.9))

    x = torch.randn(50, 10)
    fast, generic = make(), make()
    force_generic(generic)
    torch.testing.assert_close(fast(x), generic(x))
    assert fast.iteration_idx == generic.iteration_idx < 99
    assert fast.iteration_scheduler.last_epoch == generic.iteration_scheduler.last_epoch
    assert fast.iteration_optimizer.param_groups[0]["lr"] == pytest.approx(generic.iteration_optimizer.param_groups[0]["lr"])


def test_tau_is_read_when_the_gradient_is_scaled():
    model = SimilarityMatching(nn.Linear(3, 2), 2, tau=0.5)
    x = torch.randn(6, 3)
    y = model(x)
    model.loss(x, y).backward()
    g_half = model.competitor.weight.grad.clone()
    model.zero_grad()
    model.tau = 0.1
    model.loss(x, y).backward()
    torch.testing.assert_close(model.competitor.weight.grad, g_half * 5)


def test_more_inputs_than_encoders_is_an_error():
    with pytest.raises(ValueError, match="got 2 inputs for 1 encoders"):
        MultiSimilarityMatching([nn.Linear(3, 2)], 2)(torch.randn(2, 3), torch.randn(2, 3))
