"""The models' iteration statistics, per-sample stopping and divergence reports,
on the whole-loop op and on the per-iteration path alike."""

import copy
import warnings

import pytest
import torch
from torch import nn

import torchiter
from torchiter.models import SimilarityMatching, SparseCoding
from torchiter.reference import quadratic_descent_ex_reference


def force_generic(model):
    """An iteration hook that never stops the loop: forbids the whole-loop op."""
    return model.register_iteration_hook("iteration", lambda m: False)


def nsm(tol, per_sample=False, lr=0.2, relu=True, **kw):
    torch.manual_seed(0)
    enc = nn.Linear(7, 5, dtype=torch.float64)
    model = SimilarityMatching(
        enc, 5, tau=0.3, tol=tol, max_iterations=300, iteration_lr=lr,
        iteration_projection=nn.ReLU() if relu else None, per_sample_stopping=per_sample, **kw,
    ).double()
    with torch.no_grad():
        P = 0.1 * torch.randn_like(model.competitor.weight)
        model.competitor.weight.add_(P + P.T)
    return model


def inputs(B=13):
    torch.manual_seed(1)
    return torch.randn(B, 7, dtype=torch.float64) * torch.rand(B, 1, dtype=torch.float64) * 3


def nsm_reference(model, x, tol, per_sample):
    """The statistics of the model's loop from the op's reference loop."""
    Wx = model.encoder(x).detach()
    M = model.competitor.weight.detach()
    return quadratic_descent_ex_reference(torch.zeros_like(Wx), M, Wx, 0.2, 300, tol, 1, None, 0.0, 0.0, None,
                                          per_sample)


@pytest.mark.parametrize("tol", [0.0, 1e-6])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("path", ["fused", "per_iteration"])
def test_model_statistics_equal_plain_loop(tol, per_sample, path):
    model = nsm(tol, per_sample, stats_trace=True)
    if path == "per_iteration":
        force_generic(model)
    x = inputs()
    y = model(x)
    ref = nsm_reference(model, x, tol, per_sample)
    torch.testing.assert_close(y, ref["y"], rtol=1e-10, atol=1e-10)
    st = model.iteration_stats
    assert st.iterations.tolist() == ref["iterations"]
    assert st.converged.tolist() == ref["converged"]
    assert model.iteration_idx == max(ref["iterations"] if per_sample else [ref["iterations"]]) - 1
    if not per_sample or path == "fused":
        torch.testing.assert_close(st.change.double(), torch.tensor(ref["change"], dtype=torch.float64),
                                   rtol=1e-8, atol=1e-13)
        torch.testing.assert_close(st.change_trace.double(), torch.tensor(ref["trace"], dtype=torch.float64),
                                   rtol=1e-8, atol=1e-13)
    assert not bool(st.diverging.any())


@pytest.mark.parametrize("path", ["fused", "per_iteration"])
def test_per_sample_stopping_equals_each_sample_alone(path):
    x = inputs(9)
    model = nsm(1e-5, per_sample=True)
    if path == "per_iteration":
        force_generic(model)
    y = model(x)
    counts = model.iteration_stats.iterations
    assert counts.shape == (9,) and len(set(counts.tolist())) > 1
    for i in range(9):
        alone = copy.deepcopy(model)
        alone.per_sample_stopping = False
        yi = alone(x[i : i + 1])
        torch.testing.assert_close(yi[0], y[i], rtol=1e-12, atol=1e-12)
        assert int(alone.iteration_stats.iterations) == int(counts[i])


def test_per_sample_stopping_is_opt_in_and_validated():
    assert nsm(1e-5).per_sample_stopping is False
    with pytest.raises(ValueError, match="per_sample_stopping must be a bool"):
        nsm(1e-5, per_sample="yes")
    m = SparseCoding(6, 4, sparsity=0.05, tol=1e-5, per_sample_stopping=True, iteration_lr=0.1).double()
    torch.manual_seed(2)
    codes = m(torch.randn(5, 4, dtype=torch.float64))
    assert codes.shape == (5, 6) and m.iteration_stats.iterations.shape == (5,)


def test_scheduler_with_stop_test_statistics_match_per_iteration_path():
    kw = dict(iteration_scheduler=torch.optim.lr_scheduler.StepLR, it_sched_kwargs=dict(step_size=30, gamma=0.9),
              stats_trace=True)
    x = inputs()
    fast, slow = nsm(1e-6, **kw), nsm(1e-6, **kw)
    force_generic(slow)
    torch.testing.assert_close(fast(x), slow(x), rtol=1e-10, atol=1e-10)
    a, b = fast.iteration_stats, slow.iteration_stats
    assert int(a.iterations) == int(b.iterations) and bool(a.converged) and bool(b.converged)
    torch.testing.assert_close(a.change_trace, b.change_trace, rtol=1e-8, atol=1e-13)
    torch.testing.assert_close(a.change, b.change, rtol=1e-8, atol=1e-13)
    assert fast.iteration_scheduler.last_epoch == slow.iteration_scheduler.last_epoch


def test_step_above_two_over_L_warns_and_strict_mode_raises():
    x = inputs()
    model = nsm(0.0, lr=3.0, relu=False)
    L = torch.linalg.eigvalsh(model.competitor.weight.detach()).max().item()
    assert 3.0 > 2 / L
    with pytest.warns(torchiter.DivergenceWarning, match=r"iteration_lr=3 .*2/L"):
        model(x)
    assert bool(model.iteration_stats.diverging)
    strict = nsm(0.0, lr=3.0, relu=False, divergence="error")
    with pytest.raises(torchiter.DivergenceError, match="SimilarityMatching"):
        strict(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nsm(0.0, lr=3.0, relu=False, divergence="ignore")(x)
        nsm(0.0, lr=0.2)(x)  # converging: no warning


@pytest.mark.parametrize("numel", [7, 1 << 16, (1 << 16) + 3], ids=["small", "at-switch", "large"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_noise_floor_is_max_abs_of_the_state(numel, dtype):
    # Large states take max|y| from amax/amin (no |y| temporary); both ways
    # must give 16 eps max(1, max|y|) exactly, and NaN.
    from torchiter.models import _noise
    from torchiter.stats import NOISE_ULPS

    gen = torch.Generator().manual_seed(numel)
    eps = torch.finfo(dtype).eps
    for scale, where in [(5.0, "neg"), (5.0, "pos"), (0.1, "pos")]:
        y = torch.rand(numel, generator=gen, dtype=dtype) * scale
        if where == "neg":
            y[numel // 2] = -3 * scale
        expected = max(1.0, float(y.abs().max())) * NOISE_ULPS * eps
        got = _noise(y.view(1, -1))
        assert got.dtype == dtype and got.dim() == 0
        assert float(got) == pytest.approx(expected, rel=1e-12), (scale, where)
    y = torch.rand(numel, generator=gen, dtype=dtype)
    y[numel - 1] = float("nan")
    assert torch.isnan(_noise(y.view(1, -1)))


@pytest.mark.parametrize("forwards", [1, 2], ids=["first-forward", "replayed-forward"])
@pytest.mark.parametrize("B", [13, 20000], ids=["small-state", "large-state"])
def test_model_noise_is_the_floor_of_the_returned_state(B, forwards):
    # Small CPU states get their noise floor when it is first read; it must
    # be that of the loop's result even after the caller changes the
    # returned tensor in place, and a diverging loop must still be reported.
    # A replayed forward's state is the op's output itself, which the
    # returned tensor shares.
    from torchiter.stats import NOISE_ULPS

    torch.manual_seed(2)
    x = torch.randn(B, 7, dtype=torch.float64) * 3
    model = nsm(1e-9)
    for _ in range(forwards - 1):
        model(x)
    y = model(x)
    expected = max(1.0, float(y.abs().max())) * NOISE_ULPS * torch.finfo(torch.float64).eps
    y.mul_(1000.0)
    noise = model.iteration_stats.noise
    assert noise.dtype == torch.float64 and noise.dim() == 0
    assert float(noise) == pytest.approx(expected, rel=1e-12)
    assert model.iteration_stats.to_dict()["noise"] == float(noise)
    copied = copy.deepcopy(model)
    assert float(copied.iteration_stats.noise) == float(noise)
    diverging = nsm(0.0, lr=3.0, relu=False)
    with pytest.warns(torchiter.DivergenceWarning):
        diverging(x)
    assert bool(diverging.iteration_stats.diverging)
