"""Iteration statistics and divergence reports of IterationLossModule (torchiter.stats)."""

import warnings

import pytest
import torch
from torch import nn

import torchiter
from torchiter.stats import IterationStats, estimate_lipschitz_hvp, estimate_lipschitz_matrix


class NNLS(torchiter.IterationLossModule):
    """Non-negative least squares, ½‖Ay − b‖² over y >= 0 (the README's first example)."""

    def __init__(self, A: torch.Tensor, lr: float, max_iterations: int = 200, **kwargs) -> None:
        kwargs.setdefault("iteration_projection", nn.ReLU())
        super().__init__(max_iterations=max_iterations, iteration_lr=lr, **kwargs)
        self.register_buffer("A", A)
        self.register_buffer("y", torch.zeros(A.shape[1], dtype=A.dtype))

    def iteration_parameters(self):
        return [self.y]

    def pre_iteration(self, b):
        super().pre_iteration(b)
        with torch.no_grad():
            self.y.zero_()

    def iteration_loss(self, b):
        return 0.5 * ((self.A @ self.y - b) ** 2).sum()

    def post_iteration(self, b):
        super().post_iteration(b)
        return self.y.clone()


class StopAt(NNLS):
    """Stops through an overridden converged() after ``stop`` iterations."""

    def __init__(self, *args, stop: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stop = stop

    def converged(self, b):
        return self.iteration_idx + 1 >= self.stop


class NotExactlySGD(torch.optim.SGD):
    """Same numbers as SGD, but not the type the fused step recognises: the generic path."""


def problem(seed: int, dtype=torch.float64, m: int = 20, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(m, n, generator=g, dtype=dtype)
    b = torch.randn(m, generator=g, dtype=dtype)
    return A, b


def lipschitz(A: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(A.double(), 2).item() ** 2


def plain_loop(A, b, lr, iterations, stop=None):
    """The projected gradient loop in plain PyTorch: (changes, losses)."""
    y = torch.zeros(A.shape[1], dtype=A.dtype)
    changes, losses = [], []
    for k in range(iterations):
        r = A @ y - b
        losses.append(0.5 * (r * r).sum())
        new = torch.relu(y - lr * (A.T @ r))
        changes.append((new - y).abs().max())
        y = new
        if stop is not None and k + 1 >= stop:
            break
    return torch.stack(changes), torch.stack(losses)


PATHS = {
    "fused": {},
    "generic": {"iteration_optimizer": NotExactlySGD},
    "projection-unfused": {"iteration_projection": lambda y: torch.relu(y)},
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("seed", [0, 1])
def test_statistics_equal_a_plain_loop(path, seed):
    A, b = problem(seed)
    lr = 1.0 / lipschitz(A)
    m = NNLS(A, lr, max_iterations=37, stats_trace=True, **PATHS[path])
    m(b)
    assert m.iteration_stats.path == ("generic" if path == "generic" else "fused_step")
    s = m.iteration_stats
    changes, losses = plain_loop(A, b, lr, 37)
    assert s.iterations.dtype == torch.int64 and s.iterations.shape == () and int(s.iterations) == 37
    assert s.converged.dtype == torch.bool and not bool(s.converged)
    torch.testing.assert_close(s.change_trace, changes, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.loss_trace, losses, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.change, changes[-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.growth, changes[-1] / changes[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.loss, losses[-1], rtol=1e-9, atol=1e-12)
    assert s.lr == pytest.approx(lr)
    assert not bool(s.diverging)
    # Without the trace, the same figures from three copies of the state.
    m2 = NNLS(A, lr, max_iterations=37, **PATHS[path])
    m2(b)
    s2 = m2.iteration_stats
    assert s2.change_trace is None and s2.loss_trace is None
    assert int(s2.iterations) == 37
    torch.testing.assert_close(s2.change, s.change, rtol=0, atol=0)
    torch.testing.assert_close(s2.growth, s.growth, rtol=0, atol=0)


def test_traces_off_by_default_and_stats_none_before_forward():
    A, b = problem(0)
    m = NNLS(A, 1.0 / lipschitz(A), max_iterations=5)
    assert m.iteration_stats is None
    assert m.stats_trace is False and m.divergence == "warn"
    m(b)
    s = m.iteration_stats
    assert isinstance(s, IterationStats)
    assert s.change_trace is None and s.loss_trace is None
    assert s.iterations.device == m.y.device and s.change.device == m.y.device
    assert "5 iterations, not converged" in repr(s)


def test_stats_with_max_iterations_zero():
    A, b = problem(0)
    m = NNLS(A, 0.1, max_iterations=0, stats_trace=True, divergence="error")
    m(b)
    s = m.iteration_stats
    assert int(s.iterations) == 0 and not bool(s.converged)
    assert float(s.change) == 0 and float(s.growth) == 0
    assert s.change_trace.shape == (0,) and s.loss_trace.shape == (0,)
    assert s.loss is None
    assert not bool(s.diverging)


@pytest.mark.parametrize("trace", [False, True])
def test_stats_on_an_early_stop_through_converged(trace):
    A, b = problem(2)
    lr = 1.0 / lipschitz(A)
    m = StopAt(A, lr, max_iterations=50, stop=6, stats_trace=trace)
    m(b)
    s = m.iteration_stats
    changes, losses = plain_loop(A, b, lr, 50, stop=6)
    assert int(s.iterations) == 6 and bool(s.converged)
    torch.testing.assert_close(s.change, changes[-1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.growth, changes[-1] / changes[0], rtol=1e-9, atol=1e-12)
    if trace:
        torch.testing.assert_close(s.change_trace, changes, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(s.loss_trace, losses, rtol=1e-9, atol=1e-12)
    assert "6 iterations, converged" in s.summary()


def test_stats_on_an_early_stop_through_a_hook():
    A, b = problem(3)
    lr = 1.0 / lipschitz(A)
    m = NNLS(A, lr, max_iterations=50)
    m.register_iteration_hook("iteration", lambda mod: mod.iteration_idx == 3)
    m(b)
    s = m.iteration_stats
    changes, _ = plain_loop(A, b, lr, 4)
    assert int(s.iterations) == 4 and bool(s.converged)
    torch.testing.assert_close(s.change, changes[-1], rtol=1e-9, atol=1e-12)


# The README's original settings: A = torch.randn(20, 10), iteration_lr=0.1, 200 iterations
# (float32). L = ‖A‖₂² is about 40-60, so 0.1 > 2/L: depending on A the state explodes to
# inf/NaN, its change grows, or it settles into an oscillation that never decays.
README_SEEDS = range(6)


def readme_problem(seed: int):
    torch.manual_seed(seed)
    A = torch.randn(20, 10)
    b = torch.randn(20)
    return A, b


@pytest.mark.parametrize("seed", README_SEEDS)
def test_divergence_warned_on_the_readme_settings(seed):
    A, b = readme_problem(seed)
    assert 0.1 > 2 / lipschitz(A)
    m = NNLS(A, 0.1, max_iterations=200)
    with pytest.warns(torchiter.DivergenceWarning, match=r"NNLS: the inner loop diverges.*iteration_lr=0\.1 is above 2/L") as rec:
        m(b)
    assert len(rec) == 1
    assert bool(m.iteration_stats.diverging)
    # The hint's 2/L is the true one (the loss is quadratic, L estimated at the start).
    msg = str(rec[0].message)
    two_over_l = float(msg.split("2/L = ")[1].split(" ")[0])
    assert two_over_l == pytest.approx(2 / lipschitz(A), rel=0.02)


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_divergence_is_an_error_in_strict_mode(seed):
    A, b = readme_problem(seed)
    m = NNLS(A, 0.1, max_iterations=200, divergence="error")
    with pytest.raises(torchiter.DivergenceError, match=r"iteration_lr=0\.1 is above 2/L = .* use iteration_lr <= 1/L"):
        m(b)
    assert isinstance(torchiter.DivergenceError("x"), RuntimeError)
    # The forward finished before the report: the module is at rest and usable.
    assert not m.y.requires_grad
    m.divergence = "ignore"
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.DivergenceWarning)
        m(b)
    assert bool(m.iteration_stats.diverging)


@pytest.mark.parametrize("seed", README_SEEDS)
@pytest.mark.parametrize("factor", [1.0, 1.9])
def test_no_warning_for_a_converging_problem(seed, factor):
    A, b = readme_problem(seed)
    for path in PATHS.values():
        m = NNLS(A, factor / lipschitz(A), max_iterations=200, divergence="error", **path)
        m(b)
        assert not bool(m.iteration_stats.diverging)


def test_no_warning_with_momentum_while_it_builds_up():
    # Heavy-ball steps grow while the velocity builds up: not a divergence.
    A, b = readme_problem(0)
    m = NNLS(A, 0.1 / lipschitz(A), max_iterations=5, it_optim_kwargs={"momentum": 0.9}, divergence="error")
    m(b)
    s = m.iteration_stats
    assert float(s.growth) > 1 and s.growth_limit > 1
    assert not bool(s.diverging)


def test_non_finite_input_is_reported():
    A, b = problem(0, dtype=torch.float32)
    b[3] = float("nan")
    m = NNLS(A, 1.0 / lipschitz(A), max_iterations=10, divergence="error")
    with pytest.raises(torchiter.DivergenceError, match="non-finite"):
        m(b)


def test_divergence_argument_is_validated():
    A, _ = problem(0)
    with pytest.raises(ValueError, match="NNLS: divergence must be one of"):
        NNLS(A, 0.1, divergence="strict")
    with pytest.raises(TypeError):
        torchiter.IterationLossModule(torch.optim.SGD, None, 0.1, None, None, None, None, "error")


def test_the_hint_restores_the_state():
    A, b = readme_problem(0)
    m = NNLS(A, 0.1, max_iterations=200, divergence="ignore")
    expected = m(b)
    m.divergence = "warn"
    with pytest.warns(torchiter.DivergenceWarning):
        out = m(b)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(m.y, expected, rtol=0, atol=0)
    assert m.iteration_stats._initial is None


def test_estimates_of_l():
    A, _ = problem(4, m=30, n=12)
    exact = lipschitz(A)
    assert estimate_lipschitz_matrix(A) == pytest.approx(exact, rel=1e-9)
    assert estimate_lipschitz_matrix(A.T @ A) == pytest.approx(exact, rel=1e-9)
    big, _ = problem(5, m=200, n=90)
    assert estimate_lipschitz_matrix(big, iters=300) == pytest.approx(lipschitz(big), rel=1e-3)
    y = torch.zeros(12, dtype=A.dtype, requires_grad=True)
    L = estimate_lipschitz_hvp(lambda: 0.5 * ((A @ y) ** 2).sum(), [y], iters=300)
    assert L == pytest.approx(exact, rel=1e-6)


def test_stats_of_several_iteration_parameters():
    class Two(torchiter.IterationLossModule):
        def __init__(self):
            super().__init__(max_iterations=4, iteration_lr=0.25, stats_trace=True)
            self.register_buffer("u", torch.zeros(3, dtype=torch.float64))
            self.register_buffer("v", torch.zeros(2, dtype=torch.float64))

        def iteration_parameters(self):
            return [self.u, self.v]

        def iteration_loss(self, a, c):
            return ((self.u - a) ** 2).sum() + 4 * ((self.v - c) ** 2).sum()

    a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c = torch.tensor([3.0, 1.0], dtype=torch.float64)
    m = Two()
    with pytest.warns(torchiter.DivergenceWarning, match=r"oscillates without decaying.*iteration_lr=0\.25 equals 2/L = 0\.25"):
        m(a, c)
    u, v = torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    changes = []
    for _ in range(4):
        nu, nv = u - 0.25 * 2 * (u - a), v - 0.25 * 8 * (v - c)
        changes.append(max((nu - u).abs().max(), (nv - v).abs().max()))
        u, v = nu, nv
    torch.testing.assert_close(m.iteration_stats.change_trace, torch.stack(changes))
    # lr = 0.25 is exactly 2/L for v (L = 8): a 2-cycle that never decays.
    assert bool(m.iteration_stats.reversal)


@pytest.mark.filterwarnings(
    # torch.compile's import uses torch.jit.script_method, deprecated in torch 2.13 and 2.14.
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning",
    "ignore:`torch.jit.script_method` is deprecated:UserWarning",
)
def test_stats_with_compiled_iterations():
    # One iteration per call (an overridden converged()): the same figures as the eager loop;
    # then k iterations per call: iterations counted, change and growth per call.
    A, b = problem(2)
    lr = 1.0 / lipschitz(A)
    m = torchiter.compile_iterations(StopAt(A, lr, max_iterations=50, stop=6, stats_trace=True))
    m(b)
    s = m.iteration_stats
    changes, losses = plain_loop(A, b, lr, 50, stop=6)
    assert int(s.iterations) == 6 and bool(s.converged) and s.per_call == 1
    torch.testing.assert_close(s.change_trace, changes, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(s.loss_trace[-1], losses[-1], rtol=1e-9, atol=1e-12)
    blocks = torchiter.compile_iterations(NNLS(A, lr, max_iterations=12), iterations_per_call=4)
    blocks(b)
    s = blocks.iteration_stats
    assert int(s.iterations) == 12 and not bool(s.converged) and s.per_call == 4
    changes, _ = plain_loop(A, b, lr, 12)
    assert 0 < float(s.change) <= 4 * float(changes[8:].max()) + 1e-12
    assert not bool(s.diverging)


def test_empty_iteration_parameters():
    # Nothing to change: change 0, not a divergence.
    class Empty(torchiter.IterationLossModule):
        def __init__(self):
            super().__init__(max_iterations=3, iteration_lr=0.1, divergence="error")
            self.register_buffer("e", torch.zeros(0))

        def iteration_parameters(self):
            return [self.e]

        def iteration_loss(self):
            return (self.e * 2).sum()

    m = Empty()
    m()
    s = m.iteration_stats
    assert int(s.iterations) == 3 and float(s.change) == 0 and not bool(s.diverging)


def test_per_sample_statistics_as_the_models_build_them():
    # The models' whole-loop op gives one figure per sample: shape (B,) fields.
    stats = IterationStats(
        torch.tensor([3, 40, 40, 40]),
        torch.tensor([True, False, False, False]),
        torch.tensor([1e-7, 0.5, float("nan"), 1e-3]),
        torch.tensor([1e-6, 3.0, 0.0, 0.01]),
        torch.tensor(1e-6),
        lr=0.3,
    )
    assert stats.diverging.tolist() == [False, True, True, False]
    assert stats.summary() == "4 samples: 1 converged, 2 diverging; iterations 3..40; largest last change nan"
    with pytest.raises(torchiter.DivergenceError, match=r"Model: the inner loop diverges in 2 of 4 samples.*lr=0\.3 is above 2/L = 0\.2"):
        torchiter.stats.check_divergence(
            stats, "error", "Model", lambda: torchiter.stats.step_size_hint(stats.lr, 10.0, name="lr", how="from A")
        )
    assert torchiter.stats.check_divergence(stats, "ignore", "Model") is False
    with pytest.raises(ValueError, match="divergence must be one of"):
        torchiter.stats.check_divergence(stats, "loud", "Model")
    d = stats.to_dict()
    assert d["iterations"] == [3, 40, 40, 40] and d["diverging"] == [False, True, True, False]


def test_diverging_broadcasts_per_sample_counts_over_batch_wide_changes():
    # The models' per-iteration path with per-sample stopping: (B,) counts, () changes.
    stats = IterationStats(
        torch.tensor([5, 9, 9]),
        torch.tensor([True, False, False]),
        torch.tensor(0.5),
        torch.tensor(2.0),
        torch.tensor(1e-6),
        late_growth=torch.tensor(1.5),
        reversal=torch.tensor(False),
        loss=torch.tensor(1.0),
    )
    assert stats.diverging.tolist() == [False, True, True]


_EDGE = [0.0, -0.0, 1e-30, 0.5, 1.0, 1.001, float(torch.tensor(1.001, dtype=torch.float32)), 1.0011, 2.0, 1e30,
         float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_scalar_divergence_test_equals_the_tensor_one(dtype):
    # check_divergence reads CPU scalars as Python floats; it must agree with
    # the `diverging` tensor on every edge: NaN, infinities, the growth limit
    # itself and its float32 rounding, zero changes.
    gen = torch.Generator().manual_seed(0)
    pick = lambda: _EDGE[int(torch.randint(len(_EDGE), (), generator=gen))]  # noqa: E731
    mismatches = []
    for i in range(3000):
        t = lambda v: torch.tensor(v, dtype=dtype)  # noqa: E731
        optional = int(torch.randint(4, (), generator=gen))
        stats = IterationStats(
            torch.tensor(7),
            torch.tensor(bool(torch.randint(2, (), generator=gen))),
            t(pick()),
            t(pick()),
            t(abs(pick())),
            late_growth=t(pick()) if optional & 1 else None,
            reversal=torch.tensor(bool(torch.randint(2, (), generator=gen))) if optional & 2 else None,
            growth_limit=[1.0, 2.0, float("inf")][i % 3],
            loss=t(pick()) if i % 5 == 0 else None,
            loss_trace=torch.tensor([1.0, pick()], dtype=dtype) if i % 7 == 0 else None,
        )
        if stats._any_diverging() != bool(stats.diverging.any()):
            mismatches.append(stats.to_dict())
    assert not mismatches, mismatches[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_per_sample_divergence_test_equals_the_tensor_one(dtype):
    # Per-sample statistics ((B,) changes and growths) take a two-reduction
    # shortcut in the report; it must agree with `diverging` on every edge.
    gen = torch.Generator().manual_seed(1)
    mismatches = []
    for i in range(1500):
        B = int(torch.randint(1, 6, (), generator=gen))
        vec = lambda: torch.tensor(  # noqa: E731
            [_EDGE[int(j)] for j in torch.randint(len(_EDGE), (B,), generator=gen)], dtype=dtype)
        if i % 2:  # mostly tame values, so that the shortcut's "not diverging" is reached
            vec_ = vec
            vec = lambda: vec_().clamp(0, 1.0).nan_to_num(0.5)  # noqa: E731
        stats = IterationStats(
            torch.full((B,), 7),
            torch.randint(2, (B,), generator=gen).bool(),
            vec().abs(),
            vec(),
            torch.tensor(abs(_EDGE[int(torch.randint(len(_EDGE), (), generator=gen))]), dtype=dtype),
            growth_limit=[1.0, 2.0, float("inf")][i % 3],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reported = torchiter.stats.check_divergence(stats, "warn", "Model")
        if reported != bool(stats.diverging.any()):
            mismatches.append(stats.to_dict())
    assert not mismatches, mismatches[:3]
