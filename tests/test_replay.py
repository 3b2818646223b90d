"""A model's later forwards replay the loop its first forward decided.

Each replayed forward must leave the model exactly as a forward that decides
again (the general path, forced here by a no-op "pre" hook, which changes no
result) would: output, state, statistics, optimizer, counters.
"""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import torchiter
from torchiter.models import MultiSimilarityMatching, SimilarityMatching, SparseCoding, SupervisedSimilarityMatching
from torchiter.stats import DivergenceError, DivergenceWarning


def sm(**kw):
    torch.manual_seed(0)
    kw.setdefault("max_iterations", 30)
    return SimilarityMatching(nn.Linear(7, 5), 5, **kw), (torch.randn(13, 7),)


def conv(**kw):
    torch.manual_seed(1)
    return SimilarityMatching(nn.Conv2d(1, 4, 3, bias=False), 4, max_iterations=20,
                              iteration_projection=nn.ReLU(), **kw), (torch.randn(3, 1, 7, 6),)


def multi(**kw):
    torch.manual_seed(2)
    return MultiSimilarityMatching([nn.Linear(4, 3), nn.Linear(2, 3, bias=False)], 3, max_iterations=25,
                                   **kw), (torch.randn(9, 4), torch.randn(9, 2))


def supervised(**kw):
    torch.manual_seed(3)
    return SupervisedSimilarityMatching(nn.Linear(6, 4), 3, 4, max_iterations=25, **kw), (
        torch.randn(8, 6), torch.eye(3)[torch.randint(0, 3, (8,))])


def sparse(**kw):
    torch.manual_seed(4)
    return SparseCoding(6, 5, max_iterations=40, **kw), (torch.randn(11, 5),)


CASES = {
    "plain": (sm, {}),
    "relu tol": (sm, dict(iteration_projection=nn.ReLU(), tol=1e-4)),
    "per-sample": (sm, dict(tol=1e-3, per_sample_stopping=True)),
    "trace float64": (sm, dict(stats_trace=True, tol=1e-6)),
    "weight decay": (sm, dict(it_optim_kwargs=dict(lr=0.05, weight_decay=0.1))),
    "maximize": (sm, dict(it_optim_kwargs=dict(lr=0.01, maximize=True), max_iterations=5, divergence="ignore")),
    "hardtanh ignore": (sm, dict(iteration_projection=nn.Hardtanh(-0.2, 0.3), divergence="ignore")),
    "torchiter SGD": (sm, dict(iteration_optimizer=torchiter.optim.SGD, iteration_lr=0.2)),
    "conv": (conv, {}),
    "multi": (multi, dict(tol=1e-5)),
    "supervised": (supervised, {}),
    "sparse": (sparse, dict(tol=1e-5, iteration_lr=0.3)),
}


def values(module):
    """What a user can read after a forward."""
    stats = module.iteration_stats
    opt = module.iteration_optimizer
    state = module._state()
    return dict(
        stats=stats.to_dict(),
        noise=stats.noise.item(),
        state=state.clone(),
        state_flags=(state.requires_grad, state.grad_fn is None, state.is_leaf),
        iteration_idx=module.iteration_idx,
        optimizer=(type(opt), [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]),
        optimizer_holds_state=[p is state for p in opt.param_groups[0]["params"]],
        scheduler=module.iteration_scheduler,
        loss=module.last_iteration_loss,
        flags=[p.requires_grad for p in module.parameters()],
    )


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_forwards_equal_deciding_ones(name):
    make, kw = CASES[name]
    replayed, args = make(**kw)
    if name == "trace float64":
        replayed.double()
        args = tuple(a.double() for a in args)
    deciding = copy.deepcopy(replayed)
    deciding.register_iteration_hook("pre", lambda m: None)
    for step in range(4):
        # Inputs and weights change between forwards, as in training.
        xs = tuple(a + 0.1 * step for a in args)
        out_r, out_d = replayed(*xs), deciding(*xs)
        assert replayed.iteration_stats.path == "quadratic_descent"
        assert replayed.iteration_stats.path_reason is None
        assert torch.equal(out_r, out_d) and not out_r.requires_grad
        assert_same(values(replayed), values(deciding))
        with torch.no_grad():
            for m in (replayed, deciding):
                for p in m.parameters():
                    p.mul_(0.97)
    assert replayed.__dict__["_it_plan"] is not None
    assert deciding.__dict__.get("_it_plan") is None


def test_a_replay_under_no_grad_and_inference_mode_gives_the_same_output():
    m, (x,) = sm(tol=1e-4)
    ref = m(x)
    with torch.no_grad():
        assert torch.equal(m(x), ref)
    with torch.inference_mode():
        assert torch.equal(m(x), ref)
    assert torch.is_grad_enabled()
    assert torch.equal(m(x), ref)


def test_changes_between_forwards_are_decided_again():
    m, (x,) = sm(tol=0.0, max_iterations=10)
    ref = copy.deepcopy(m)
    m(x)
    m(x)  # replayed

    # Learning rate through the optimizer's options.
    m.it_optim_kwargs["lr"] = 0.3
    ref.it_optim_kwargs["lr"] = 0.3
    ref.register_iteration_hook("pre", lambda mod: None)
    assert torch.equal(m(x), ref(x))
    assert m.iteration_optimizer.param_groups[0]["lr"] == 0.3

    # Another optimizer class: the generic loop, with its reason.
    m.it_construct_optim = torch.optim.Adam
    m(x)
    assert m.iteration_stats.path == "generic" and "Adam" in m.iteration_stats.path_reason
    m.it_construct_optim = torch.optim.SGD
    m(x)
    assert m.iteration_stats.path == "quadratic_descent"

    # An iteration hook: the per-iteration loop, and back once it is removed.
    calls = []
    handle = m.register_iteration_hook("iteration", lambda mod: calls.append(mod.iteration_idx))
    m(x)
    assert m.iteration_stats.path == "fused_step" and calls == list(range(10))
    handle.remove()
    m(x)
    m(x)
    assert m.iteration_stats.path == "quadratic_descent" and len(calls) == 10

    # A projection the op cannot express, set on the instance.
    m.iteration_projection = torch.tanh
    m(x)
    assert m.iteration_stats.path == "fused_step" and "torch.tanh" in m.iteration_stats.path_reason
    m.iteration_projection = nn.ReLU()
    m(x)
    m(x)
    assert m.iteration_stats.path == "quadratic_descent"
    assert (m.y >= 0).all()

    # Another dtype.
    m.double()
    out = m(x.double())
    assert out.dtype == torch.float64 and m.iteration_stats.path == "quadratic_descent"
    assert m.iteration_stats.change.dtype == torch.float64


def test_a_tensor_learning_rate_changed_in_place_is_followed():
    lr = torch.tensor(0.1)
    m, (x,) = sm(iteration_optimizer=torch.optim.SGD, it_optim_kwargs=dict(lr=lr), max_iterations=8)
    ref = copy.deepcopy(m)
    ref.register_iteration_hook("pre", lambda mod: None)
    ref_lr = ref.it_optim_kwargs["lr"]
    for value in (0.1, 0.1, 0.3, 0.05):
        lr.fill_(value)
        ref_lr.fill_(value)
        assert torch.equal(m(x), ref(x))


def test_method_overrides_on_the_instance_or_a_subclass_are_honoured():
    m, (x,) = sm(max_iterations=6, iteration_lr=0.1)
    m(x)
    m(x)
    seen = []
    original = m.iteration_set_gradients

    def spy(*a):
        seen.append(1)
        original(*a)

    m.iteration_set_gradients = spy
    m(x)
    assert len(seen) == 6 and m.iteration_stats.path != "quadratic_descent"
    assert "replaced on this SimilarityMatching instance" in m.iteration_stats.path_reason
    del m.iteration_set_gradients
    m(x)
    m(x)
    assert len(seen) == 6 and m.iteration_stats.path == "quadratic_descent"

    class Logged(SimilarityMatching):
        def post_iteration(self, *xs):
            seen.append("post")
            return super().post_iteration(*xs)

    torch.manual_seed(0)
    s = Logged(nn.Linear(7, 5), 5, max_iterations=6)
    for _ in range(3):
        s(x)
    assert seen.count("post") == 3 and s.__dict__.get("_it_plan") is None


def test_the_optimizer_of_a_replayed_forward_is_built_when_read(monkeypatch):
    m, (x,) = sm(iteration_lr=0.25)
    m(x)
    built = []
    init = torch.optim.SGD.__init__

    def counting_init(self, *a, **k):
        built.append(1)
        init(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "__init__", counting_init)
    m(x)
    assert built == []  # not built by the forward
    opt = m.iteration_optimizer
    assert built == [1]
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.25
    assert opt.param_groups[0]["params"][0] is m.y
    assert m.iteration_optimizer is opt and built == [1]  # built once
    m.iteration_optimizer = "mine"
    assert m.iteration_optimizer == "mine"


def test_copies_of_a_replaying_model_replay_alike():
    m, (x,) = sm(tol=1e-5)
    m(x)
    m(x)
    for copy_of in (copy.deepcopy, lambda mod: pickle.loads(pickle.dumps(mod))):
        c = copy_of(m)
        assert "_it_plan" not in c.__dict__ or c.__dict__["_it_plan"] is None
        assert type(c.iteration_optimizer) is torch.optim.SGD
        for _ in range(2):
            assert torch.equal(c(x), m(x))
            assert_same(values(c), values(m))


def test_a_replayed_forward_reports_divergence():
    m, (x,) = sm(iteration_lr=0.1, max_iterations=50)
    m(x)
    m(x)
    with torch.no_grad():
        m.competitor.weight.mul_(100.0)  # lr 0.1 is now far above 2/L
    with pytest.warns(DivergenceWarning, match="2/L"):
        m(x)
    assert m.iteration_stats.diverging.item()
    m.divergence = "error"
    with pytest.raises(DivergenceError):
        m(x)
    m.divergence = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)
    m.divergence = "bogus"
    with pytest.raises(ValueError, match="divergence"):
        m(x)


def test_a_failed_replay_leaves_grad_mode_and_the_module_usable():
    m, (x,) = sm()
    m(x)
    m(x)
    with pytest.raises(RuntimeError):
        m(torch.randn(4, 3))  # the encoder's shape error
    assert torch.is_grad_enabled()
    assert "_it_running" not in m.__dict__
    assert all(p.requires_grad for p in m.parameters())
    assert m(x).shape == (13, 5)


def test_the_training_loss_after_a_replayed_forward_has_gradients():
    m, (x,) = sm(iteration_projection=nn.ReLU())
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    for _ in range(3):
        y = m(x)
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
