"""Tests of torchiter.IterationModule, IterationLossModule, projections and optim.

Each behaviour of docs/iteration-modules.md has a test that fails without it; the fused
and the generic path are compared with each other and with float64 references.
"""

import copy
import math
import warnings
from typing import Any, Callable, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchiter
from torchiter import Clamp, IterationLossModule, IterationModule, Projection, SoftThreshold
from torchiter.optim import SGD, fused_sgd_step, sgd as functional_sgd
from torchiter.projections import fused_projection_args, project_

DTYPES = [torch.float32, torch.float64]


def tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- helpers


class Recorder(IterationModule):
    """Logs every call so the order of forward's steps can be checked."""

    def __init__(self, stop_at: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log: List[Any] = []
        self.stop_at = stop_at

    def pre_iteration(self, *args: Any, **kwargs: Any) -> None:
        self.log.append(("pre_iteration", self.iteration_idx, args, kwargs))

    def iteration(self, *args: Any, **kwargs: Any) -> None:
        self.log.append(("iteration", self.iteration_idx, args, kwargs))

    def converged(self, *args: Any, **kwargs: Any) -> bool:
        self.log.append(("converged", self.iteration_idx, args, kwargs))
        return self.stop_at is not None and self.iteration_idx >= self.stop_at

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        self.log.append(("post_iteration", self.iteration_idx, args, kwargs))
        return "result"


class Quadratic(IterationLossModule):
    """Two iteration buffers with known gradients.

    loss = ½ y1ᵀ A y1 − bᵀ y1 + ½ ‖y2 − c‖², so ∇y1 = A y1 − b and ∇y2 = y2 − c.
    Has a Linear layer whose parameters an outer optimizer would train.
    """

    def __init__(self, n: int = 8, dtype: torch.dtype = torch.float64, use_y2: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(1)
        a = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.register_buffer("A", (a @ a.T / n + torch.eye(n, dtype=torch.float64)).to(dtype))
        self.register_buffer("b", torch.randn(n, generator=g, dtype=torch.float64).to(dtype))
        self.register_buffer("c", torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype))
        self.register_buffer("y1", (0.1 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype))
        self.register_buffer("y2", torch.randn(3, 4, generator=g, dtype=torch.float64).to(dtype))
        self.use_y2 = use_y2
        self.lin = nn.Linear(2, 2)
        self.losses: List[float] = []

    def iteration_parameters(self) -> List[torch.Tensor]:
        return [self.y1, self.y2]

    def iteration_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        loss = 0.5 * self.y1 @ self.A @ self.y1 - self.b @ self.y1
        if self.use_y2:
            loss = loss + 0.5 * ((self.y2 - self.c) ** 2).sum()
        return loss

    def post_iteration(self, *args: Any, **kwargs: Any) -> Any:
        super().post_iteration(*args, **kwargs)
        return self.y1.clone(), self.y2.clone()


def reference_run(
    m: Quadratic,
    steps: int,
    lrs: List[float],
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    proj: Optional[Callable] = None,
):
    """Projected SGD in float64, written out from torch.optim.SGD's documentation."""
    A, b, c = m.A.double(), m.b.double(), m.c.double()
    ps = [m.y1.double().clone(), m.y2.double().clone()]
    bufs: List[Optional[torch.Tensor]] = [None, None]
    for k in range(steps):
        grads = [A @ ps[0] - b, ps[1] - c if m.use_y2 else None]
        for i, g in enumerate(grads):
            if g is not None:
                g = -g if maximize else g
                g = g + weight_decay * ps[i]
                if momentum != 0:
                    bufs[i] = g.clone() if bufs[i] is None else momentum * bufs[i] + (1 - dampening) * g
                    g = g + momentum * bufs[i] if nesterov else bufs[i]
                ps[i] = ps[i] - lrs[k] * g
            if proj is not None:
                ps[i] = proj(ps[i])
        del grads
    return ps


class Spy:
    """Stands in for torch.ops.torchiter.sgd_step_ (and its direct binding) and counts calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = torch.ops.torchiter.sgd_step_
        self.default = self._counting(real.default)
        self.tensor_lr = self._counting(real.tensor_lr)
        self._packet = self._counting(real)
        monkeypatch.setattr(torch.ops.torchiter, "sgd_step_", self)
        # The hot loop's direct binding of the same op.
        monkeypatch.setattr(torchiter._C, "_sgd_step_no_momentum",
                            self._counting(torchiter._C._sgd_step_no_momentum))

    def _counting(self, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> None:
            self.calls += 1
            fn(*args, **kwargs)

        return call

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self._packet(*args, **kwargs)


class PlainSGD(torch.optim.SGD):
    """Same step as torch.optim.SGD; a different type, so the generic path runs."""


# --------------------------------------------------------------------------- IterationModule


def test_forward_order_and_arguments():
    m = Recorder(max_iterations=3)
    events: List[Any] = []
    m.register_iteration_hook("pre", lambda mod: events.append(("pre", mod.iteration_idx, len(mod.log))))
    m.register_iteration_hook("iteration", lambda mod: events.append(("it", mod.iteration_idx)))
    m.register_iteration_hook("post", lambda mod: events.append(("post", mod.iteration_idx, len(mod.log))))
    m.iteration_idx = 99
    assert m(1, k=2) == "result"
    # The pre hook runs with iteration_idx reset to -1, before pre_iteration.
    assert events[0] == ("pre", -1, 0)
    assert events[1:4] == [("it", 0), ("it", 1), ("it", 2)]
    assert events[4] == ("post", 2, len(m.log))
    names = [(e[0], e[1]) for e in m.log]
    assert names == [
        ("pre_iteration", -1),
        ("iteration", 0), ("converged", 0),
        ("iteration", 1), ("converged", 1),
        ("iteration", 2), ("converged", 2),
        ("post_iteration", 2),
    ]
    assert all(e[2] == (1,) and e[3] == {"k": 2} for e in m.log)


def test_converged_ends_loop():
    m = Recorder(stop_at=1, max_iterations=10)
    m()
    assert [e[0] for e in m.log].count("iteration") == 2
    assert m.iteration_idx == 1


def test_first_truthy_iteration_hook_ends_loop_and_skips_later_hooks():
    m = Recorder(max_iterations=10)
    calls: List[Any] = []
    m.register_iteration_hook("iteration", lambda mod: calls.append(("a", mod.iteration_idx)) or mod.iteration_idx == 2)
    m.register_iteration_hook("iteration", lambda mod: calls.append(("b", mod.iteration_idx)))
    m()
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    # converged() is not consulted in the round a hook ended.
    assert [e[:2] for e in m.log if e[0] == "converged"] == [("converged", 0), ("converged", 1)]


def test_defaults_and_abstract_iteration():
    class Bare(IterationModule):
        pass

    m = Bare(max_iterations=2)
    assert m.converged() is False
    assert m.pre_iteration() is None
    assert m.post_iteration() is None
    with pytest.raises(NotImplementedError, match=r"Bare.*iteration"):
        m()
    assert IterationModule().max_iterations == 1000


def test_register_hook_unknown_kind_and_multiple_and_remove():
    m = Recorder(max_iterations=2)
    with pytest.raises(ValueError, match="bogus"):
        m.register_iteration_hook("bogus", lambda mod: None)
    calls: List[str] = []
    h1 = m.register_iteration_hook("pre", lambda mod: calls.append("p1"))
    m.register_iteration_hook("pre", lambda mod: calls.append("p2"))
    h3 = m.register_iteration_hook("post", lambda mod: calls.append("q"))
    m()
    assert calls == ["p1", "p2", "q"]
    h1.remove()
    h3.remove()
    h3.remove()  # a second remove is harmless
    calls.clear()
    m()
    assert calls == ["p2"]
    assert len(m.hooks["pre"]) == 1 and len(m.hooks["post"]) == 0


def test_hook_may_remove_itself_while_running():
    m = Recorder(max_iterations=4)
    seen: List[int] = []
    handle = None

    def once(mod: IterationModule) -> None:
        seen.append(mod.iteration_idx)
        handle.remove()

    handle = m.register_iteration_hook("iteration", once)
    m()
    assert seen == [0]


def test_max_iterations_zero_and_negative():
    m = Recorder(max_iterations=0)
    assert m() == "result"
    assert [e[0] for e in m.log] == ["pre_iteration", "post_iteration"]
    with pytest.raises(ValueError, match="max_iterations"):
        Recorder(max_iterations=-1)


# --------------------------------------------------------------------------- IterationLossModule basics


def test_abstract_loss_and_parameters_name_class_and_method():
    class Empty(IterationLossModule):
        pass

    m = Empty(max_iterations=1)
    with pytest.raises(NotImplementedError, match=r"Empty.*iteration_parameters"):
        m.iteration_parameters()
    with pytest.raises(NotImplementedError, match=r"Empty.*iteration_loss"):
        m.iteration_loss()


def test_requires_grad_flags_during_and_after():
    m = Quadratic(max_iterations=2, iteration_lr=0.1)
    m.lin.bias.requires_grad_(False)
    seen = []

    def spy_loss(*a: Any, **k: Any) -> torch.Tensor:
        seen.append((m.y1.requires_grad, m.y2.requires_grad, m.lin.weight.requires_grad, m.lin.bias.requires_grad))
        return Quadratic.iteration_loss(m)

    m.iteration_loss = spy_loss
    m()
    assert seen == [(True, True, False, False)] * 2
    assert (m.y1.requires_grad, m.y2.requires_grad) == (False, False)
    assert (m.lin.weight.requires_grad, m.lin.bias.requires_grad) == (True, False)
    assert m._pre_requires_grad_state == [True, False]


def test_optimizer_and_scheduler_built_from_kwargs_and_exposed():
    built = {}

    def opt_factory(params, **kw):
        built["opt"] = (list(params), kw)
        return torch.optim.SGD(params, **kw)

    def sched_factory(opt, **kw):
        built["sched"] = (opt, kw)
        return torch.optim.lr_scheduler.StepLR(opt, **kw)

    m = Quadratic(
        max_iterations=1,
        iteration_optimizer=opt_factory,
        iteration_scheduler=sched_factory,
        it_optim_kwargs={"momentum": 0.5},
        it_sched_kwargs={"step_size": 3},
    )
    m()
    params, kw = built["opt"]
    assert params[0] is m.y1 and params[1] is m.y2
    assert kw == {"momentum": 0.5, "lr": 1.0}
    assert built["sched"] == (m.iteration_optimizer, {"step_size": 3})
    assert isinstance(m.iteration_scheduler, torch.optim.lr_scheduler.StepLR)
    assert m.it_construct_optim is opt_factory and m.it_construct_sched is sched_factory


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, 1.0),
        ({"it_optim_kwargs": {"lr": 0.3}}, 0.3),
        ({"iteration_lr": 0.2}, 0.2),
        ({"iteration_lr": 0.2, "it_optim_kwargs": {"lr": 0.3}}, 0.2),
        # Explicit 1.0 still wins: it is told apart from the default.
        ({"iteration_lr": 1.0, "it_optim_kwargs": {"lr": 0.3}}, 1.0),
    ],
)
def test_learning_rate_precedence(kwargs, expected):
    m = Quadratic(**kwargs)
    assert m.it_optim_kwargs["lr"] == expected
    assert type(m.it_optim_kwargs["lr"]) in (int, float)
    m.max_iterations = 1
    m()
    assert m.iteration_optimizer.param_groups[0]["lr"] == expected


def test_caller_dicts_not_mutated():
    optim_kwargs = {"momentum": 0.9}
    sched_kwargs = {"step_size": 2}
    m = Quadratic(
        max_iterations=3,
        iteration_lr=0.1,
        it_optim_kwargs=optim_kwargs,
        iteration_scheduler=torch.optim.lr_scheduler.StepLR,
        it_sched_kwargs=sched_kwargs,
    )
    m()
    assert optim_kwargs == {"momentum": 0.9}
    assert sched_kwargs == {"step_size": 2}
    assert m.it_optim_kwargs is not optim_kwargs and m.it_sched_kwargs is not sched_kwargs


class MockOptimizer:
    """Duck-typed optimizer: records calls, steps by a fixed rule."""

    def __init__(self, params, lr):
        self.params = list(params)
        self.lr = lr
        self.calls: List[str] = []

    def zero_grad(self):
        self.calls.append("zero_grad")
        for p in self.params:
            p.grad = None

    def step(self):
        self.calls.append("step")
        with torch.no_grad():
            for p in self.params:
                p.sub_(self.lr * p.grad.sign())


def test_mock_optimizer_and_custom_projection_generic_path(monkeypatch):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=3, iteration_optimizer=MockOptimizer, iteration_lr=0.01,
                  iteration_projection=lambda x: x.clamp(-0.05, 0.05))
    y1_before = m.y1.clone()
    ptr = m.y1.data_ptr()
    m()
    assert m.iteration_optimizer.calls == ["zero_grad", "step"] * 3
    assert spy.calls == 0
    assert m.y1.data_ptr() == ptr  # projected in place
    assert m.y1.abs().max() <= 0.05
    expected = y1_before.clone()
    for _ in range(3):
        expected = (expected - 0.01 * (m.A @ expected - m.b).sign()).clamp(-0.05, 0.05)
    torch.testing.assert_close(m.y1, expected)


def test_adam_takes_generic_path(monkeypatch):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=5, iteration_optimizer=torch.optim.Adam, iteration_lr=0.01,
                  iteration_projection=nn.ReLU())
    m()
    assert spy.calls == 0
    assert m.iteration_stats.path == "generic" and "Adam" in m.iteration_stats.path_reason
    assert (m.y1 >= 0).all() and (m.y2 >= 0).all()


def test_overridden_set_gradients_is_used():
    class Manual(Quadratic):
        def iteration_set_gradients(self, *args, **kwargs):
            self.y1.grad = torch.ones_like(self.y1)
            self.y2.grad = None

    m = Manual(max_iterations=4, iteration_lr=0.5)
    y1, y2 = m.y1.clone(), m.y2.clone()
    m()
    torch.testing.assert_close(m.y1, y1 - 2.0)
    torch.testing.assert_close(m.y2, y2)
    assert m.last_iteration_loss is None


# --------------------------------------------------------------------------- last_iteration_loss


def test_last_iteration_loss_is_float_and_loop_never_syncs(monkeypatch):
    m = Quadratic(max_iterations=5, iteration_lr=0.1)
    assert m.last_iteration_loss is None

    def no_item(self):
        raise AssertionError("item() called inside the loop")

    # A loss recorded with .item() (the reference's way) would trip this.
    with monkeypatch.context() as mp:
        mp.setattr(torch.Tensor, "item", no_item)
        m()
    loss = m.last_iteration_loss
    assert isinstance(loss, float)
    # The loss is the one of the last iteration, i.e. before the last step.
    m2 = Quadratic(max_iterations=4, iteration_lr=0.1)
    m2()
    assert loss == pytest.approx(Quadratic.iteration_loss(m2).item(), rel=1e-12)


def test_last_iteration_loss_assignable():
    m = Quadratic()
    m.last_iteration_loss = 2.5
    assert m.last_iteration_loss == 2.5
    m.last_iteration_loss = torch.tensor(1.5, requires_grad=True) * 2
    assert m.last_iteration_loss == 3.0 and isinstance(m.last_iteration_loss, float)
    m.last_iteration_loss = None
    assert m.last_iteration_loss is None


def test_reference_style_subclass_runs_unchanged():
    """A subclass written for the original library, using its attribute names."""

    class Old(IterationLossModule):
        def __init__(self):
            super().__init__(max_iterations=20, iteration_lr=0.1, iteration_projection=F.relu)
            self.register_buffer("y", torch.zeros(4, dtype=torch.float64))
            self.target = torch.tensor([1.0, -1.0, 2.0, 0.5], dtype=torch.float64)

        def iteration_parameters(self):
            return [self.y]

        def iteration_set_gradients(self):
            self.iteration_optimizer.zero_grad()
            loss = ((self.y - self.target) ** 2).sum()
            loss.backward()
            self.last_iteration_loss = loss.item()

        def post_iteration(self):
            super().post_iteration()
            return self.y.clone(), self.iteration_idx, self.hooks, self.it_optim_kwargs

    m = Old()
    y, idx, hooks, kw = m()
    assert idx == 19 and isinstance(hooks, dict) and kw == {"lr": 0.1}
    expected = torch.zeros(4, dtype=torch.float64)
    for _ in range(20):
        expected = torch.relu(expected - 0.1 * 2 * (expected - m.target))
    torch.testing.assert_close(y, expected)
    assert isinstance(m.last_iteration_loss, float)
    assert "y" in m.state_dict()


# --------------------------------------------------------------------------- errors


def test_non_floating_iteration_parameter_is_an_error():
    class IntParam(Quadratic):
        def iteration_parameters(self):
            return [self.y1, torch.zeros(3, dtype=torch.int64)]

    m = IntParam(max_iterations=2)
    with pytest.raises(TypeError, match=r"iteration_parameters\(\)\[1\].*int64.*floating"):
        m()
    assert not m.y1.requires_grad and m.lin.weight.requires_grad


def test_trainable_module_parameter_as_iteration_parameter_is_an_error():
    class Shared(Quadratic):
        def iteration_parameters(self):
            return [self.y1, self.lin.weight]

    m = Shared(max_iterations=2)
    with pytest.raises(ValueError, match=r"iteration_parameters\(\)\[1\].*trainable"):
        m()
    assert m.lin.weight.requires_grad and not m.y1.requires_grad


def test_frozen_module_parameter_may_be_iterated():
    class Frozen(Quadratic):
        def iteration_parameters(self):
            return [self.lin.bias]

        def iteration_loss(self):
            return ((self.lin.bias - 1.0) ** 2).sum()

    m = Frozen(max_iterations=30, iteration_lr=0.25)
    m.lin.bias.requires_grad_(False)
    m()
    torch.testing.assert_close(m.lin.bias.detach(), torch.ones(2))
    assert not m.lin.bias.requires_grad and m.lin.weight.requires_grad


@pytest.mark.parametrize("bad", [lambda x: x.reshape(-1), lambda x: x.double() if x.dtype == torch.float32 else x.float()])
def test_projection_changing_shape_or_dtype_is_an_error(bad):
    m = Quadratic(max_iterations=3, iteration_lr=0.1, iteration_projection=bad)
    with pytest.raises(ValueError, match="projection .* must keep shape, dtype"):
        m()
    assert not m.y1.requires_grad and not m.y2.requires_grad
    assert m.lin.weight.requires_grad


def test_failure_inside_iteration_restores_flags():
    class Fails(Quadratic):
        def iteration_loss(self):
            if self.iteration_idx == 2:
                raise RuntimeError("boom")
            return super().iteration_loss()

    m = Fails(max_iterations=5, iteration_lr=0.1)
    m.lin.bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="boom"):
        m()
    assert (m.y1.requires_grad, m.y2.requires_grad) == (False, False)
    assert (m.lin.weight.requires_grad, m.lin.bias.requires_grad) == (True, False)
    # And the module works afterwards.
    m.iteration_idx = 0
    Fails.iteration_loss = Quadratic.iteration_loss
    m()


def test_failure_building_optimizer_restores_flags():
    def broken(params, **kw):
        raise RuntimeError("no optimizer")

    m = Quadratic(max_iterations=2, iteration_optimizer=broken)
    with pytest.raises(RuntimeError, match="no optimizer"):
        m()
    assert not m.y1.requires_grad and m.lin.weight.requires_grad


# --------------------------------------------------------------------------- fused vs generic


SGD_OPTIONS = [
    dict(),
    dict(momentum=0.9),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.8, dampening=0.3, weight_decay=0.05),
    dict(momentum=0.5, weight_decay=0.1, nesterov=True, maximize=True),
    dict(weight_decay=0.2, maximize=True),
]

PROJECTIONS = {
    "relu_module": (nn.ReLU, torch.relu),
    "relu_inplace": (lambda: nn.ReLU(inplace=True), torch.relu),
    "F.relu": (lambda: F.relu, torch.relu),
    "torch.relu": (lambda: torch.relu, torch.relu),
    "clamp": (lambda: Clamp(-0.3, 0.4), lambda x: x.clamp(-0.3, 0.4)),
    "soft": (lambda: SoftThreshold(0.05), lambda x: torch.sign(x) * (x.abs() - 0.05).clamp_min(0)),
    "soft_nonneg": (lambda: SoftThreshold(0.05, min=0.0), lambda x: (x - 0.05).clamp_min(0)),
    "none": (lambda: None, None),
}


def run_both(dtype, options, proj_name, steps=12, scheduler=True, maximize_guard=True):
    make_proj, ref_proj = PROJECTIONS[proj_name]
    options = dict(options)
    lr = 0.02 if options.get("maximize") else 0.1
    sched = dict(iteration_scheduler=torch.optim.lr_scheduler.StepLR,
                 it_sched_kwargs=dict(step_size=4, gamma=0.5)) if scheduler else {}
    results = {}
    for path in ("fast", "split", "generic"):
        proj = make_proj()
        if path == "split" and proj is not None:
            inner = proj
            # A user's callable: the step is fused, the projection runs after it.
            proj = lambda x, inner=inner: inner(x)
        kwargs = dict(max_iterations=steps, iteration_lr=lr, it_optim_kwargs=options,
                      iteration_projection=proj, dtype=dtype, **sched)
        if path == "generic":
            kwargs["iteration_optimizer"] = PlainSGD  # an SGD subclass: never fused
        m = Quadratic(**kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. the scheduler's order warning
            results[path] = (m(), m)
    lrs = [lr * 0.5 ** (k // 4) if scheduler else lr for k in range(steps)]
    ref = reference_run(Quadratic(dtype=dtype), steps, lrs, proj=ref_proj, **options)
    return results, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_fast_equals_generic_over_sgd_options(dtype, options):
    results, ref = run_both(dtype, options, "relu_module")
    (fast, mf), (split, ms), (gen, mg) = results["fast"], results["split"], results["generic"]
    # fast: step and projection fused; split: the step fused, the projection as written.
    assert (mf.iteration_stats.path, mf.iteration_stats.path_reason) == ("fused_step", None)
    assert ms.iteration_stats.path == "fused_step" and "projection" in ms.iteration_stats.path_reason
    assert mg.iteration_stats.path == "generic"
    for a, b, c, r in zip(fast, gen, split, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
        torch.testing.assert_close(c, b, **tol(dtype))
        torch.testing.assert_close(a.double(), r, **tol(dtype))
    # Momentum state is SGD's, on both paths.
    for p_f, p_g in zip(mf.iteration_parameters(), mg.iteration_parameters()):
        if options.get("momentum"):
            torch.testing.assert_close(mf.iteration_optimizer.state[p_f]["momentum_buffer"],
                                       mg.iteration_optimizer.state[p_g]["momentum_buffer"], **tol(dtype))
        else:
            assert "momentum_buffer" not in mf.iteration_optimizer.state.get(p_f, {})
    assert mf.last_iteration_loss == pytest.approx(mg.last_iteration_loss, rel=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("proj_name", sorted(PROJECTIONS))
def test_fast_equals_generic_over_projections(dtype, proj_name):
    results, ref = run_both(dtype, dict(momentum=0.9, weight_decay=0.01), proj_name)
    (fast, mf), (split, _), (gen, mg) = results["fast"], results["split"], results["generic"]
    assert mf.iteration_stats.path == "fused_step" and mg.iteration_stats.path == "generic"
    for a, b, c, r in zip(fast, gen, split, ref):
        torch.testing.assert_close(a, b, **tol(dtype))
        torch.testing.assert_close(c, b, **tol(dtype))
        torch.testing.assert_close(a.double(), r, **tol(dtype))


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_scheduler_lr_honoured_at_every_step(path):
    """With gradient 1 and no momentum, y_{k+1} = y_k − lr_k exactly; read lr_k back."""

    class Linear(IterationLossModule):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.register_buffer("y", torch.zeros(1, dtype=torch.float64))
            self.trace: List[float] = []

        def iteration_parameters(self):
            return [self.y]

        def iteration_loss(self):
            return self.y.sum()

    m = Linear(max_iterations=9, iteration_lr=0.5,
               iteration_optimizer=torch.optim.SGD if path == "fast" else PlainSGD,
               iteration_scheduler=torch.optim.lr_scheduler.MultiStepLR,
               it_sched_kwargs=dict(milestones=[2, 5], gamma=0.1))
    m.register_iteration_hook("iteration", lambda mod: mod.trace.append(mod.y.item()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m()
    steps = [-(b - a) for a, b in zip([0.0] + m.trace, m.trace)]
    expected = [0.5, 0.5, 0.05, 0.05, 0.05, 0.005, 0.005, 0.005, 0.005]
    assert steps == pytest.approx(expected, rel=1e-12)
    assert m.iteration_stats.path == ("fused_step" if path == "fast" else "generic")


def test_fast_path_is_taken(monkeypatch):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=7, iteration_lr=0.1, iteration_projection=nn.ReLU(),
                  it_optim_kwargs=dict(momentum=0.9))
    m()
    # Momentum: the first step allocates buffers (first_step), later ones reuse them.
    assert spy.calls == 7
    assert (m.iteration_stats.path, m.iteration_stats.path_reason) == ("fused_step", None)


@pytest.mark.parametrize(
    "factory, projection",
    [
        (torch.optim.Adam, None),
        (PlainSGD, nn.ReLU()),
    ],
    ids=["adam", "sgd-subclass"],
)
def test_generic_path_taken_otherwise(monkeypatch, factory, projection):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=3, iteration_lr=0.01, iteration_optimizer=factory,
                  iteration_projection=projection)
    m()
    assert spy.calls == 0


@pytest.mark.parametrize("projection", [lambda x: x.clamp_min(0), nn.LeakyReLU()], ids=["lambda", "leaky"])
def test_user_projection_runs_after_the_fused_step(monkeypatch, projection):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=3, iteration_lr=0.01, iteration_projection=projection)
    out = m()
    assert spy.calls == 3 and m.iteration_stats.path == "fused_step"
    assert "not one the kernels express" in m.iteration_stats.path_reason
    ref = Quadratic(max_iterations=3, iteration_lr=0.01, iteration_projection=projection,
                    iteration_optimizer=PlainSGD)()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_relu_with_forward_hook_is_not_fused(monkeypatch):
    # The step is fused, but the hooked module runs as a projection of its own.
    spy = Spy(monkeypatch)
    relu = nn.ReLU()
    seen: List[int] = []
    relu.register_forward_hook(lambda mod, inp, out: seen.append(1))
    Quadratic(max_iterations=2, iteration_lr=0.1, iteration_projection=relu)()
    assert spy.calls == 2 and len(seen) == 4


def test_optimizer_step_hook_forces_generic_step(monkeypatch):
    spy = Spy(monkeypatch)
    seen: List[int] = []

    class Hooked(Quadratic):
        def pre_iteration(self):
            super().pre_iteration()
            self.iteration_optimizer.register_step_post_hook(lambda *a: seen.append(1))

    Hooked(max_iterations=3, iteration_lr=0.1, iteration_projection=F.relu)()
    assert seen == [1, 1, 1] and spy.calls == 0


def test_tensor_lr_is_fused(monkeypatch):
    spy = Spy(monkeypatch)
    kw = dict(max_iterations=5, it_optim_kwargs=dict(lr=torch.tensor(0.1, dtype=torch.float64), momentum=0.9))
    fast = Quadratic(iteration_projection=F.relu, **kw)()
    assert spy.calls == 5
    gen = Quadratic(iteration_projection=lambda x: F.relu(x), **kw)()
    for a, b in zip(fast, gen):
        torch.testing.assert_close(a, b)


def test_params_without_grad_skipped_but_projected():
    """y2 gets no gradient: SGD skips it (no decay, no momentum) but it is still projected."""
    out = {}
    for path, proj in (("fast", Clamp(-0.5, 0.5)), ("generic", lambda x: x.clamp(-0.5, 0.5))):
        m = Quadratic(max_iterations=6, iteration_lr=0.1, use_y2=False, iteration_projection=proj,
                      it_optim_kwargs=dict(momentum=0.9, weight_decay=0.1))
        y2 = m.y2.clone()
        out[path] = m()
        torch.testing.assert_close(out[path][1], y2.clamp(-0.5, 0.5))
        assert "momentum_buffer" not in m.iteration_optimizer.state.get(m.y2, {})
    for a, b in zip(out["fast"], out["generic"]):
        torch.testing.assert_close(a, b)


def test_switching_paths_mid_forward_is_consistent():
    """Projection swapped for a user lambda after 4 fused steps: the generic
    step continues from the fused momentum state."""
    kw = dict(max_iterations=10, iteration_lr=0.1, it_optim_kwargs=dict(momentum=0.9, nesterov=True))
    m = Quadratic(iteration_projection=F.relu, **kw)
    lam = lambda x: torch.relu(x)  # noqa: E731

    def swap(mod):
        if mod.iteration_idx == 3:
            mod.iteration_projection = lam

    m.register_iteration_hook("iteration", swap)
    mixed = m()
    ref = Quadratic(iteration_projection=lam, **kw)()
    for a, b in zip(mixed, ref):
        torch.testing.assert_close(a, b)


def test_multiple_param_groups_fused(monkeypatch):
    def groups(params, lr, **kw):
        return torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": lr / 2, "momentum": 0.5}],
                               lr=lr, **kw)

    def groups_generic(params, lr, **kw):
        return PlainSGD([{"params": [params[0]]}, {"params": [params[1]], "lr": lr / 2, "momentum": 0.5}],
                        lr=lr, **kw)

    spy = Spy(monkeypatch)
    kw = dict(max_iterations=6, iteration_lr=0.2, iteration_projection=F.relu, it_optim_kwargs=dict(momentum=0.9))
    fast = Quadratic(iteration_optimizer=groups, **kw)()
    assert spy.calls > 0
    gen = Quadratic(iteration_optimizer=groups_generic, **kw)()
    for a, b in zip(fast, gen):
        torch.testing.assert_close(a, b)


def test_optimizer_over_other_tensors_is_not_fused(monkeypatch):
    spy = Spy(monkeypatch)
    m = Quadratic(max_iterations=2, iteration_lr=0.1, iteration_projection=F.relu,
                  iteration_optimizer=lambda params, **kw: torch.optim.SGD(params[:1], **kw))
    y2 = m.y2.clone()
    m()
    assert spy.calls == 0
    torch.testing.assert_close(m.y2, torch.relu(y2))  # projected though not optimised


def test_fast_step_bumps_version_counter():
    m = Quadratic(max_iterations=3, iteration_lr=0.1, iteration_projection=F.relu)
    v = m.y1._version
    m()
    assert m.y1._version > v


# --------------------------------------------------------------------------- projections


def test_projection_objects_math_and_validation():
    x = torch.tensor([-2.0, -0.05, 0.0, 0.05, 0.3, 2.0], dtype=torch.float64)
    torch.testing.assert_close(Clamp(min=0.0)(x), torch.relu(x))
    torch.testing.assert_close(Clamp(-1.0, 1.0)(x), x.clamp(-1, 1))
    torch.testing.assert_close(SoftThreshold(0.1)(x), F.softshrink(x, 0.1))
    torch.testing.assert_close(SoftThreshold(0.1, min=0.0)(x), F.relu(F.softshrink(x, 0.1)))
    torch.testing.assert_close(Projection()(x), x)
    with pytest.raises(ValueError, match="at least one"):
        Clamp()
    with pytest.raises(ValueError, match="min must be <= max"):
        Clamp(1.0, 0.0)
    with pytest.raises(ValueError, match="shrink"):
        SoftThreshold(-0.1)
    with pytest.raises(ValueError, match="NaN"):
        Clamp(min=math.nan)
    c = Clamp(0.0, 1.0)
    with pytest.raises(AttributeError):
        c.min = 3.0
    assert c == Clamp(0.0, 1.0) and c != Projection(0.0, 0.0, 1.0) and len({c, Clamp(0.0, 1.0)}) == 1
    assert "Clamp" in repr(c) and copy.deepcopy(c) == c


def test_fused_projection_args_recognition():
    assert fused_projection_args(None) == (0.0, None, None)
    assert fused_projection_args(nn.ReLU()) == (0.0, 0.0, None)
    assert fused_projection_args(nn.ReLU(inplace=True)) == (0.0, 0.0, None)
    assert fused_projection_args(F.relu) == (0.0, 0.0, None)
    assert fused_projection_args(torch.relu) == (0.0, 0.0, None)
    assert fused_projection_args(torch.nn.functional.relu) == (0.0, 0.0, None)
    assert fused_projection_args(nn.ReLU6()) == (0.0, 0.0, 6.0)
    assert fused_projection_args(Clamp(-1, 2)) == (0.0, -1.0, 2.0)
    assert fused_projection_args(SoftThreshold(0.5)) == (0.5, None, None)

    class MyClamp(Clamp):
        def __call__(self, x):
            return x

    for other in (MyClamp(0.0), lambda x: torch.relu(x), nn.LeakyReLU(), nn.Sigmoid(), torch.sigmoid):
        assert fused_projection_args(other) is None


def test_project_in_place_and_checks():
    p = torch.randn(3, 3)
    ptr = p.data_ptr()
    project_([p], lambda x: x.mT)  # aliases p; still copied correctly
    assert p.data_ptr() == ptr
    with pytest.raises(TypeError, match="tensor is expected"):
        project_([p], lambda x: 1.0)
    with pytest.raises(ValueError, match="must keep"):
        project_([p], lambda x: x[:2])


# --------------------------------------------------------------------------- optim


@pytest.mark.parametrize("dtype", DTYPES)
def test_torchiter_sgd_equals_torch_sgd_plus_projection(dtype):
    g = torch.Generator().manual_seed(3)
    p0 = [torch.randn(17, generator=g, dtype=dtype), torch.randn(4, 5, generator=g, dtype=dtype)]
    grads = [[torch.randn(p.shape, generator=g, dtype=dtype) for p in p0] for _ in range(5)]
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    a = [p.clone() for p in p0]
    b = [p.clone() for p in p0]
    opt_a = SGD(a, projection=SoftThreshold(0.02), **kw)
    opt_b = torch.optim.SGD(b, **kw)
    for gs in grads:
        for p, q, gr in zip(a, b, gs):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
        project_(b, SoftThreshold(0.02))
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **tol(dtype))
        torch.testing.assert_close(opt_a.state[p]["momentum_buffer"], opt_b.state[q]["momentum_buffer"], **tol(dtype))


def test_torchiter_sgd_runs_hooks_once_and_falls_back():
    p = torch.ones(4)
    opt = SGD([p], lr=0.5, projection=lambda x: x.clamp_min(0.25))
    seen: List[int] = []
    opt.register_step_post_hook(lambda *a: seen.append(1))
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p, torch.full((4,), 0.5))
    opt.step()
    torch.testing.assert_close(p, torch.full((4,), 0.25))
    assert seen == [1, 1]


def test_torchiter_sgd_in_module_is_fused(monkeypatch):
    spy = Spy(monkeypatch)
    factory = lambda params, **kw: SGD(params, projection=Clamp(min=0.0), **kw)  # noqa: E731
    fast = Quadratic(max_iterations=4, iteration_lr=0.1, iteration_optimizer=factory)()
    assert spy.calls == 4
    gen = Quadratic(max_iterations=4, iteration_lr=0.1, iteration_projection=lambda x: x.clamp_min(0))()
    for a, b in zip(fast, gen):
        torch.testing.assert_close(a, b)


def test_fused_sgd_step_after_generic_steps_continues_momentum():
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(6)]
    a = torch.zeros(6, dtype=torch.float64)
    b = torch.zeros(6, dtype=torch.float64)
    opt_a = torch.optim.SGD([a], lr=0.1, momentum=0.9, dampening=0.1)
    opt_b = torch.optim.SGD([b], lr=0.1, momentum=0.9, dampening=0.1)
    for k, gr in enumerate(grads):
        a.grad, b.grad = gr.clone(), gr.clone()
        if k < 3:
            opt_a.step()
        else:
            assert fused_sgd_step(opt_a)
        opt_b.step()
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("nesterov", [False, True])
def test_functional_sgd_equals_torch_functional_sgd(nesterov):
    """torchiter.optim.sgd against torch.optim.sgd.sgd, momentum buffers
    included: two steps, the first starting the buffers (first_step) on
    odd-sized and non-contiguous params."""
    import torch.optim.sgd as torch_sgd

    g = torch.Generator().manual_seed(11)
    shapes = [(7,), (3, 5)]
    ps = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    ps.append(torch.randn(6, 4, generator=g, dtype=torch.float64).t())
    refs = [p.clone() for p in ps]
    opts = dict(lr=0.05, momentum=0.9, dampening=0.0 if nesterov else 0.2, weight_decay=0.01,
                nesterov=nesterov, maximize=False)
    bufs = [torch.full_like(p, float("nan")) for p in ps]
    ref_bufs = [None] * len(ps)
    for step in range(2):
        grads = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in ps]
        functional_sgd(ps, grads, bufs, first_step=step == 0, **opts)
        torch_sgd.sgd(refs, grads, ref_bufs, **opts)
        for p, r in zip(ps, refs):
            torch.testing.assert_close(p, r, rtol=1e-12, atol=1e-12)
        for b, r in zip(bufs, ref_bufs):
            torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-12)


def test_fused_sgd_step_declines_unsupported_groups():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    assert fused_sgd_step(torch.optim.SGD([p], lr=0.1, differentiable=True)) is False
    assert fused_sgd_step(torch.optim.SGD([p], lr=torch.tensor([0.1]))) is False
    assert fused_sgd_step(torch.optim.SGD([p], lr=0.1), nn.Sigmoid()) is False
    torch.testing.assert_close(p.detach(), torch.zeros(3))


def test_fused_sgd_step_declines_sparse_grads():
    p = torch.zeros(5, 2)
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.ones(5, 2).to_sparse()
    assert fused_sgd_step(opt) is False
    torch.testing.assert_close(p, torch.zeros(5, 2))


def test_package_exports():
    for name in ("IterationModule", "IterationLossModule", "Projection", "Clamp", "SoftThreshold", "optim", "projections", "ops"):
        assert hasattr(torchiter, name)
    assert torchiter.optim.SGD is SGD


def test_mock_object_as_optimizer():
    # A MagicMock has zero_grad and step on the instance only.
    from unittest import mock

    opt = mock.MagicMock()
    m = Quadratic(max_iterations=2, iteration_optimizer=lambda params, **kw: opt)
    m()
    assert opt.step.call_count == 2 and opt.zero_grad.call_count == 2


def test_last_iteration_loss_is_the_loss_before_the_step_even_for_a_view():
    class View(IterationLossModule):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.register_buffer("y", torch.ones(1, dtype=torch.float64))

        def iteration_parameters(self) -> List[torch.Tensor]:
            return [self.y]

        def iteration_loss(self) -> torch.Tensor:
            return self.y[0]  # shares memory with the state the step changes

    m = View(max_iterations=1, iteration_lr=0.5)
    m()
    assert m.last_iteration_loss == 1.0 and m.y.item() == 0.5
