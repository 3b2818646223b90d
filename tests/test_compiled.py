"""torchiter.compile_iterations: same results as the eager loop, fallbacks, caching, hooks.

torch.compile takes tens of seconds per graph on a small machine, so the
compiled modules are built once per module (fixtures) and shared by the
tests that only read their results; each case compiles a short loop
(few iterations per call).
"""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import torchiter
from torchiter import compiled as compiled_mod

pytestmark = pytest.mark.filterwarnings(
    # torch.compile's imports touch TorchScript's deprecated decorators.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch.jit.script_method` is deprecated:UserWarning",
)


class Quadratic(torchiter.IterationLossModule):
    """A least-squares loss with an L1 term in one iteration parameter ``y`` (3, 5)."""

    def __init__(self, dtype=torch.float64, loss="plain", **kwargs):
        # These tests compare the compiled and eager paths on step sizes
        # chosen for that, some above 2/L: no divergence report.
        kwargs.setdefault("divergence", "ignore")
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(0)
        self.loss_kind = loss
        self.W = nn.Parameter(torch.randn(5, 7, generator=g, dtype=dtype))
        self.register_buffer("y", torch.zeros(3, 5, dtype=dtype))

    def iteration_parameters(self):
        return [self.y]

    def pre_iteration(self, x):
        super().pre_iteration(x)
        with torch.no_grad():
            self.y.fill_(0.5)
        self.alias = self.y

    def iteration_loss(self, x):
        y = self.alias if self.loss_kind == "alias" else self.y
        loss = ((y @ self.W - x) ** 2).sum() + 0.1 * y.abs().sum()
        if self.loss_kind == "item" and loss.item() > 1e9:
            loss = loss * 2
        if self.loss_kind == "negated":
            loss = -loss
        return loss

    def post_iteration(self, x):
        super().post_iteration(x)
        return self.y.detach().clone()


class PredictiveCoding(torchiter.IterationLossModule):
    """Two iteration parameters, tanh: the energy of a two-layer predictive-coding network."""

    def __init__(self, **kwargs):
        kwargs.setdefault("divergence", "ignore")  # as Quadratic
        super().__init__(**kwargs)
        g = torch.Generator().manual_seed(0)
        self.W1 = nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64))
        self.W2 = nn.Parameter(torch.randn(3, 6, generator=g, dtype=torch.float64))
        self.register_buffer("h1", torch.zeros(2, 6, dtype=torch.float64))
        self.register_buffer("h2", torch.zeros(2, 3, dtype=torch.float64))

    def iteration_parameters(self):
        return [self.h1, self.h2]

    def pre_iteration(self, x, t):
        super().pre_iteration(x, t)
        with torch.no_grad():
            self.h1.zero_()
            self.h2.zero_()

    def iteration_loss(self, x, t):
        e1 = self.h1 - torch.tanh(x) @ self.W1.T
        e2 = self.h2 - torch.tanh(self.h1) @ self.W2.T
        e3 = t - torch.tanh(self.h2).sum(1, keepdim=True)
        return 0.5 * ((e1**2).sum() + (e2**2).sum() + (e3**2).sum())

    def post_iteration(self, x, t):
        super().post_iteration(x, t)
        return torch.cat([self.h1.flatten(), self.h2.flatten()]).detach().clone()


X = torch.randn(3, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
PC_INPUTS = (
    torch.randn(2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
    torch.randn(2, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
)

# Every SGD option, a scheduler and a fused projection; 5 iterations in
# calls of 2 (a remainder of 1: two compiled variants).
MOMENTUM = dict(
    max_iterations=5,
    it_optim_kwargs=dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.1),
    iteration_scheduler=torch.optim.lr_scheduler.StepLR,
    it_sched_kwargs=dict(step_size=2, gamma=0.5),
    iteration_projection=torchiter.Clamp(min=0.0),
)
# torchiter.SGD with its own projection, dampening, maximize, and a user's
# lambda as the module's projection, float32.
OTHER = dict(
    dtype=torch.float32,
    loss="negated",
    max_iterations=4,
    iteration_optimizer=torchiter.SGD,
    it_optim_kwargs=dict(lr=0.01, momentum=0.5, dampening=0.3, maximize=True, projection=torchiter.SoftThreshold(0.01)),
    iteration_projection=lambda y: y.clamp(max=0.8),
)


def _pair(cls, k, inputs, **kwargs):
    eager = cls(**kwargs)
    comp = torchiter.compile_iterations(cls(**kwargs), iterations_per_call=k)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        out_c = comp(*inputs)
    out_e = eager(*inputs)
    return eager, comp, out_e, out_c


@pytest.fixture(scope="module")
def momentum_pair():
    return _pair(Quadratic, 2, (X,), **MOMENTUM)


@pytest.fixture(scope="module")
def other_pair():
    return _pair(Quadratic, 4, (X.float(),), **OTHER)


@pytest.fixture(scope="module")
def pc_pair():
    return _pair(PredictiveCoding, 3, PC_INPUTS, max_iterations=6, iteration_lr=0.2)


def _check_same(eager, comp, out_e, out_c, rtol, atol):
    torch.testing.assert_close(out_c, out_e, rtol=rtol, atol=atol)
    assert comp.iteration_idx == eager.iteration_idx
    assert comp.last_iteration_loss == pytest.approx(eager.last_iteration_loss, rel=rtol, abs=atol)
    for pe, pc in zip(eager.iteration_parameters(), comp.iteration_parameters()):
        assert not pc.requires_grad and not pe.requires_grad
        se = eager.iteration_optimizer.state.get(pe, {}).get("momentum_buffer")
        sc = comp.iteration_optimizer.state.get(pc, {}).get("momentum_buffer")
        assert (se is None) == (sc is None)
        if se is not None:
            torch.testing.assert_close(sc, se, rtol=rtol, atol=atol)
    for pe, pc in zip(eager.parameters(), comp.parameters()):
        assert pe.requires_grad == pc.requires_grad
    assert [g["lr"] for g in comp.iteration_optimizer.param_groups] == [
        g["lr"] for g in eager.iteration_optimizer.param_groups
    ]


def test_momentum_nesterov_weight_decay_scheduler_clamp_match_eager(momentum_pair):
    eager, comp, out_e, out_c = momentum_pair
    _check_same(eager, comp, out_e, out_c, rtol=1e-12, atol=1e-12)
    assert torchiter.compiled_iterations_info(comp).compilations == 2  # blocks of 2 and the remainder of 1
    assert eager.W.requires_grad and comp.W.requires_grad


def test_dampening_maximize_own_projection_lambda_float32_match_eager(other_pair):
    eager, comp, out_e, out_c = other_pair
    _check_same(eager, comp, out_e, out_c, rtol=1e-5, atol=1e-6)
    assert torchiter.compiled_iterations_info(comp).compilations == 1


def test_two_iteration_parameters_with_tanh_match_eager(pc_pair):
    eager, comp, out_e, out_c = pc_pair
    _check_same(eager, comp, out_e, out_c, rtol=1e-12, atol=1e-12)


def test_second_forward_and_new_learning_rate_reuse_compiled_code(momentum_pair):
    eager, comp, _, _ = momentum_pair
    before = torchiter.compiled_iterations_info(comp).compilations
    for m in (eager, comp):
        m.it_optim_kwargs["lr"] = 0.005
    try:
        out_c = comp(X)
        out_e = eager(X)
        # Under no_grad (evaluation code) the compiled loop runs too.
        with torch.no_grad():
            out_c2 = comp(X)
    finally:
        for m in (eager, comp):
            m.it_optim_kwargs["lr"] = MOMENTUM["it_optim_kwargs"]["lr"]
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_c2, out_e, rtol=1e-12, atol=1e-12)
    assert torchiter.compiled_iterations_info(comp).compilations == before
    assert torchiter.compiled_iterations_info(comp).fallbacks == 0


def test_remainder_that_cannot_compile_runs_eagerly(monkeypatch, momentum_pair):
    # Blocks of 2 ran compiled; the last iteration's variant is refused, so
    # that iteration runs on the eager loop from the state the blocks left.
    eager, comp, _, _ = momentum_pair
    state = comp._it_compiled
    saved = {key: state._cache.pop(key) for key in [key for key in state._cache if key[0] == 1]}
    monkeypatch.setattr(compiled_mod, "MAX_COMPILATIONS", len(state._cache))
    try:
        with pytest.warns(torchiter.CompiledIterationsWarning, match="compiled variants exist already"):
            out_c = comp(X)
    finally:
        state._cache.update(saved)
    out_e = eager(X)
    _check_same(eager, comp, out_e, out_c, rtol=1e-12, atol=1e-12)


def test_last_iteration_loss_is_lazy(pc_pair):
    _, comp, _, _ = pc_pair
    comp(*PC_INPUTS)
    assert isinstance(comp.__dict__["_last_iteration_loss"], torch.Tensor)
    assert isinstance(comp.last_iteration_loss, float)


def test_iteration_hooks_run_every_iteration_and_can_stop(pc_pair):
    eager, comp, _, _ = pc_pair
    seen = {id(eager): [], id(comp): []}

    def hook(m):
        seen[id(m)].append((m.iteration_idx, m.last_iteration_loss))
        return m.iteration_idx == 3

    handles = [m.register_iteration_hook("iteration", hook) for m in (eager, comp)]
    try:
        out_c = comp(*PC_INPUTS)
        out_e = eager(*PC_INPUTS)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    assert [i for i, _ in seen[id(comp)]] == [0, 1, 2, 3]
    assert [i for i, _ in seen[id(eager)]] == [0, 1, 2, 3]
    for (_, lc), (_, le) in zip(seen[id(comp)], seen[id(eager)]):
        assert lc == pytest.approx(le, rel=1e-12)
    assert torchiter.compiled_iterations_info(comp).fallbacks == 0


def test_untraceable_loss_falls_back_with_one_warning_naming_the_reason():
    eager = Quadratic(loss="item", max_iterations=3, iteration_lr=0.01)
    comp = torchiter.compile_iterations(Quadratic(loss="item", max_iterations=3, iteration_lr=0.01))
    with pytest.warns(torchiter.CompiledIterationsWarning, match="cannot trace"):
        out_c = comp(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        out_c2 = comp(X)  # the reason is known: no new attempt, no second warning
    out_e = eager(X)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    torch.testing.assert_close(out_c2, out_e, rtol=0, atol=0)
    assert torchiter.compiled_iterations_info(comp).compilations == 0 and torchiter.compiled_iterations_info(comp).fallbacks == 2


def test_loss_reading_a_second_alias_falls_back():
    # The gradient would miss the alias: compiling it would give a wrong result.
    comp = torchiter.compile_iterations(Quadratic(loss="alias", max_iterations=3, iteration_lr=0.01))
    eager = Quadratic(loss="alias", max_iterations=3, iteration_lr=0.01)
    with pytest.warns(torchiter.CompiledIterationsWarning, match="other than through its registered name"):
        out_c = comp(X)
    torch.testing.assert_close(out_c, eager(X), rtol=0, atol=0)


def _plain_tensor_parameter(m):
    m.z = torch.zeros(3, 5, dtype=torch.float64)  # an attribute, not a buffer
    m.iteration_parameters = lambda: [m.z]


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda m: setattr(m, "it_construct_optim", torch.optim.Adam), "only torch.optim.SGD"),
        (lambda m: setattr(m, "iteration", lambda x: torchiter.IterationLossModule.iteration(m, x)), "overrides iteration()"),
        (_plain_tensor_parameter, "not a registered buffer"),
    ],
)
def test_unsupported_configurations_fall_back_before_compiling(change, reason):
    comp = torchiter.compile_iterations(Quadratic(max_iterations=2, iteration_lr=0.01))
    change(comp)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            comp(X)
        except ValueError:
            pass  # the eager loop's own error (a loss that ignores the tensor)
    messages = [str(w.message) for w in caught if w.category is torchiter.CompiledIterationsWarning]
    assert len(messages) == 1 and reason in messages[0]
    assert torchiter.compiled_iterations_info(comp).compilations == 0


def test_argument_requiring_grad_falls_back():
    comp = torchiter.compile_iterations(Quadratic(max_iterations=2, iteration_lr=0.01))
    eager = Quadratic(max_iterations=2, iteration_lr=0.01)
    x = X.clone().requires_grad_(True)
    with pytest.warns(torchiter.CompiledIterationsWarning, match="requires grad"):
        out_c = comp(x)
    torch.testing.assert_close(out_c, eager(X.clone().requires_grad_(True)), rtol=0, atol=0)


def test_error_in_loss_leaves_module_usable(other_pair):
    eager, comp, out_e, _ = other_pair
    bad = torch.zeros(3, 6)  # W is (5, 7): y @ W - x fails to broadcast
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torchiter.CompiledIterationsWarning)
        with pytest.raises(RuntimeError):
            comp(bad)
    assert not comp.y.requires_grad and comp.W.requires_grad
    before = torchiter.compiled_iterations_info(comp).compilations
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        out = comp(X.float())
    torch.testing.assert_close(out, out_e, rtol=1e-5, atol=1e-6)
    assert torchiter.compiled_iterations_info(comp).compilations == before


def test_compilations_are_bounded(monkeypatch, other_pair):
    _, comp, _, _ = other_pair
    monkeypatch.setattr(compiled_mod, "MAX_COMPILATIONS", torchiter.compiled_iterations_info(comp).compilations)
    eager = Quadratic(**OTHER)
    x = X  # float64: a new variant (the loss then computes in float64)
    with pytest.warns(torchiter.CompiledIterationsWarning, match="compiled variants exist already"):
        out = comp(x)
    torch.testing.assert_close(out, eager(x), rtol=0, atol=0)


def test_copies_stay_switched_on_without_compiled_code(pc_pair):
    _, comp, _, _ = pc_pair
    assert torchiter.compiled_iterations_info(comp).compilations > 0
    for dup in (copy.deepcopy(comp), pickle.loads(pickle.dumps(comp))):
        # Its own counters, from zero: the copy compiles its own code.
        assert torchiter.compiled_iterations_info(dup) == (3, 0, 0)
        dup(*PC_INPUTS)
        assert torchiter.compiled_iterations_info(dup).compilations > 0


def test_module_without_compile_iterations_is_untouched():
    m = Quadratic(max_iterations=2)
    m(X)
    assert torchiter.compiled_iterations_info(m) is None
    assert m.iteration_stats.path == "fused_step"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_invalid_iterations_per_call(bad):
    with pytest.raises(ValueError, match="iterations_per_call"):
        torchiter.compile_iterations(Quadratic(), iterations_per_call=bad)


def test_not_an_iteration_loss_module():
    with pytest.raises(TypeError, match="IterationLossModule"):
        torchiter.compile_iterations(nn.Linear(2, 2))


def test_automatic_iterations_per_call():
    state = compiled_mod._CompiledIterations(None)
    assert state._choose_k(100) == 10
    assert state._choose_k(30) == 10
    assert state._choose_k(8) == 8
    assert state._choose_k(97) == 10  # prime: blocks of 10 and a remainder
    assert compiled_mod._CompiledIterations(4)._choose_k(3) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graph capture)")
def test_cuda_graph_replay_matches_eager():
    kwargs = dict(MOMENTUM, dtype=torch.float32)
    eager = Quadratic(**kwargs).cuda()
    comp = torchiter.compile_iterations(Quadratic(**kwargs).cuda(), iterations_per_call=2)
    x = X.float().cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        outs = [comp(x) for _ in range(3)]  # compile, record, replay
    out_e = eager(x)
    for out in outs:
        torch.testing.assert_close(out, out_e, rtol=1e-5, atol=1e-6)
    assert comp._it_compiled._cache and all(e.cuda_graph for e in comp._it_compiled._cache.values())
