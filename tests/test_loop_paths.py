"""iteration_stats.path and path_reason: which loop a forward ran, and why not a faster one."""

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

import torchiter
from torchiter.models import SimilarityMatching, SparseCoding
from _modules import NNLS, DuckSGD
from _util import JIT_WARNINGS

# torch.compile's imports (compiled iterations) touch TorchScript's deprecated decorators.
pytestmark = [pytest.mark.filterwarnings(w) for w in JIT_WARNINGS]


def nnls(**kw):
    kw.setdefault("iteration_lr", 0.01)
    kw.setdefault("max_iterations", 12)
    kw.setdefault("iteration_projection", None)
    torch.manual_seed(0)
    return NNLS(torch.randn(9, 5), **kw), torch.randn(9)


def model(**kw):
    torch.manual_seed(0)
    return SimilarityMatching(nn.Linear(6, 3, bias=False), 3, max_iterations=15, **kw), torch.randn(11, 6)


def run(module, *args):
    out = module(*args)
    stats = module.iteration_stats
    assert stats.path in ("quadratic_descent", "compiled", "fused_step", "generic")
    assert stats.path_reason is None or (isinstance(stats.path_reason, str) and stats.path_reason)
    return out, stats


def test_models_run_the_whole_loop_op_by_default():
    for kw in (dict(), dict(iteration_projection=nn.ReLU()), dict(tol=1e-5), dict(per_sample_stopping=True, tol=1e-5)):
        m, x = model(**kw)
        _, stats = run(m, x)
        assert (stats.path, stats.path_reason) == ("quadratic_descent", None), kw
    torch.manual_seed(0)
    sc = SparseCoding(4, 6, max_iterations=10)
    _, stats = run(sc, torch.randn(5, 6))
    assert (stats.path, stats.path_reason) == ("quadratic_descent", None)


@pytest.mark.parametrize(
    "kw, path, words",
    [
        (dict(iteration_projection=torch.tanh), "fused_step", ["torch.tanh", "not one the kernels express"]),
        (dict(iteration_optimizer=torch.optim.Adam), "generic", ["Adam", "torch.optim.SGD"]),
        (dict(it_optim_kwargs=dict(momentum=0.5)), "fused_step", ["momentum 0.5"]),
        (dict(iteration_scheduler=torch.optim.lr_scheduler.LambdaLR, it_sched_kwargs=dict(lr_lambda=lambda i: 1.0)),
         "quadratic_descent", None),
    ],
)
def test_a_model_held_back_says_why(kw, path, words):
    m, x = model(**kw)
    _, stats = run(m, x)
    assert stats.path == path
    if words is None:
        assert stats.path_reason is None
    else:
        for w in words:
            assert w in stats.path_reason, (w, stats.path_reason)


def test_a_hook_or_an_override_keeps_a_model_off_the_op_and_the_same_numbers():
    m, x = model(iteration_projection=nn.ReLU())
    ref, stats = run(copy.deepcopy(m), x)
    assert stats.path == "quadratic_descent"
    handle = m.register_iteration_hook("iteration", lambda mod: False)
    out, stats = run(m, x)
    assert stats.path == "fused_step" and "'iteration' hook" in stats.path_reason
    torch.testing.assert_close(out, ref)
    handle.remove()
    _, stats = run(m, x)
    assert (stats.path, stats.path_reason) == ("quadratic_descent", None)

    class Custom(SimilarityMatching):
        def converged(self, *xs):
            return False

    torch.manual_seed(0)
    c = Custom(nn.Linear(6, 3, bias=False), 3, max_iterations=15)
    _, stats = run(c, x)
    assert stats.path == "fused_step" and stats.path_reason == "Custom overrides converged()"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_take_the_whole_loop_op(dtype):
    m, x = model(iteration_projection=nn.ReLU())
    ref, _ = run(copy.deepcopy(m).double(), x.double())
    out, stats = run(m.to(dtype), x.to(dtype))
    assert (stats.path, stats.path_reason) == ("quadratic_descent", None)
    assert out.dtype == dtype
    # The encoder and the competitor run in the dtype, the loop in float32:
    # a few of the dtype's ulps from the float64 model.
    eps = torch.finfo(dtype).eps
    assert (out.double() - ref).abs().max() <= 8 * eps * ref.abs().max()


@pytest.mark.parametrize(
    "kw, path, words",
    [
        (dict(), "fused_step", None),
        (dict(iteration_projection=nn.ReLU()), "fused_step", None),
        (dict(iteration_projection=torchiter.projections.Clamp(min=0.0, max=1.0)), "fused_step", None),
        (dict(iteration_projection=lambda t: t.clamp_(min=0)), "fused_step", ["<lambda>"]),
        (dict(iteration_optimizer=torch.optim.Adam), "generic", ["Adam"]),
        (dict(iteration_optimizer=torchiter.optim.SGD, it_optim_kwargs=dict(projection=nn.ReLU()),
              iteration_projection=nn.ReLU()), "generic", ["both"]),
    ],
)
def test_loss_module_paths(kw, path, words):
    m, b = nnls(**kw)
    _, stats = run(m, b)
    assert stats.path == path, stats.path_reason
    if words is None:
        assert stats.path_reason is None
    else:
        for w in words:
            assert w in stats.path_reason, (w, stats.path_reason)


def test_duck_typed_optimizer_runs_generic_and_says_so():
    m, b = nnls(iteration_optimizer=DuckSGD)
    _, stats = run(m, b)
    assert stats.path == "generic" and "DuckSGD" in stats.path_reason


def test_step_hooks_decline_the_fused_step_mid_forward():
    m, b = nnls()
    seen = []

    def add_hook(mod):
        if mod.iteration_idx == 3 and not seen:
            seen.append(mod.iteration_optimizer.register_step_post_hook(lambda *a: None))

    m.register_iteration_hook("iteration", add_hook)
    _, stats = run(m, b)
    assert stats.path == "generic" and "step hooks" in stats.path_reason


def test_override_of_iteration_is_generic():
    class Own(NNLS):
        def iteration(self, b):
            super().iteration(b)

    torch.manual_seed(0)
    m = Own(torch.randn(9, 5), iteration_lr=0.01)
    _, stats = run(m, torch.randn(9))
    assert stats.path == "generic" and stats.path_reason == "Own overrides iteration()"


def test_compiled_path_and_fallback_reason_agree_with_the_warning():
    m, b = nnls()
    torchiter.compile_iterations(m)
    ref_m, _ = nnls()
    ref, _ = run(ref_m, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        out, stats = run(m, b)
    assert (stats.path, stats.path_reason) == ("compiled", None)
    torch.testing.assert_close(out, ref)

    m, b = nnls(iteration_optimizer=torch.optim.Adam)
    torchiter.compile_iterations(m)
    with pytest.warns(torchiter.CompiledIterationsWarning) as record:
        _, stats = run(m, b)
    assert stats.path == "generic"
    assert stats.path_reason.startswith("compiled iterations fall back to the eager loop: ")
    assert stats.path_reason in str(record[0].message)
    # Warned once; the reason is still given on every forward.
    with warnings.catch_warnings():
        warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
        _, stats = run(m, b)
    assert stats.path_reason.startswith("compiled iterations fall back")


def test_the_reason_is_per_forward():
    m, x = model()
    m.iteration_projection = torch.tanh
    _, stats = run(m, x)
    assert stats.path == "fused_step" and stats.path_reason
    m.iteration_projection = nn.ReLU()
    _, stats = run(m, x)
    assert (stats.path, stats.path_reason) == ("quadratic_descent", None)


def test_paths_survive_copies_and_to_dict():
    m, x = model(iteration_projection=torch.relu)
    run(m, x)
    for c in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert c.iteration_stats.path == m.iteration_stats.path
        _, stats = run(c, x)
        assert stats.path == m.iteration_stats.path
    d = m.iteration_stats.to_dict()
    assert d["path"] == m.iteration_stats.path and d["path_reason"] == m.iteration_stats.path_reason


def test_paths_give_the_same_numbers():
    """Every path a model can take computes the same forward (to float rounding)."""
    m, x = model(iteration_projection=nn.ReLU(), it_optim_kwargs=dict(lr=0.05))
    ref, stats = run(copy.deepcopy(m), x)
    assert stats.path == "quadratic_descent"
    hooked = copy.deepcopy(m)
    hooked.register_iteration_hook("iteration", lambda mod: False)
    out, stats = run(hooked, x)
    assert stats.path == "fused_step"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # The models set their gradients by hand, which compiled iterations do
    # not take: the per-iteration loop runs, and the first reason is given.
    compiled = copy.deepcopy(m)
    compiled.register_iteration_hook("iteration", lambda mod: False)
    torchiter.compile_iterations(compiled)
    with pytest.warns(torchiter.CompiledIterationsWarning, match="overrides iteration_set_gradients"):
        out, stats = run(compiled, x)
    assert stats.path == "fused_step" and "'iteration' hook" in stats.path_reason
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    n, b = nnls(iteration_projection=nn.ReLU())
    ref, stats = run(copy.deepcopy(n), b)
    assert stats.path == "fused_step"
    generic, _ = nnls(iteration_projection=lambda t: t.clamp_(min=0))
    out, stats = run(generic, b)
    assert stats.path == "fused_step" and "<lambda>" in stats.path_reason
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torchiter.compile_iterations(n)
    out, stats = run(n, b)
    assert (stats.path, stats.path_reason) == ("compiled", None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_many_compiled_modules_in_one_process_stay_compiled():
    # TorchDynamo keeps at most recompile_limit (8) variants per code object;
    # each module's blocks must not count against the others'.
    torch._dynamo.reset()
    for n in range(3, 3 + torch._dynamo.config.recompile_limit + 1):
        torch.manual_seed(n)
        A, b = torch.randn(n + 2, n), torch.randn(n + 2)
        ref, _ = run(NNLS(A, max_iterations=4, iteration_lr=0.01), b)
        m = torchiter.compile_iterations(NNLS(A, max_iterations=4, iteration_lr=0.01))
        with warnings.catch_warnings():
            warnings.simplefilter("error", torchiter.CompiledIterationsWarning)
            out, stats = run(m, b)
        assert (stats.path, stats.path_reason) == ("compiled", None), n
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["zero", "nan", "normal"])
def test_statistics_follow_one_rule_on_every_path(case):
    """growth: 0 when no change at all, NaN when a change is NaN, else last/first:
    the same on the whole-loop op and on the per-iteration loops."""
    m, x = model(iteration_projection=nn.ReLU(), divergence="ignore", iteration_lr=0.3)
    if case == "zero":
        x = torch.zeros_like(x)
    elif case == "nan":
        x[3, 1] = float("nan")
    class OwnSGD(torch.optim.SGD):
        """SGD's math under another class: the generic loop."""

    paths = {}
    for how in ("op", "hook", "generic"):
        c = copy.deepcopy(m)
        if how == "hook":
            c.register_iteration_hook("iteration", lambda mod: False)
        elif how == "generic":
            c.it_construct_optim = OwnSGD
        _, stats = run(c, x)
        paths[stats.path] = stats
    assert set(paths) == {"quadratic_descent", "fused_step", "generic"}
    values = {p: (float(s.change), float(s.growth)) for p, s in paths.items()}
    for p, (change, growth) in values.items():
        if case == "zero":
            assert (change, growth) == (0.0, 0.0), (p, values)
        elif case == "nan":
            assert growth != growth and change != change, (p, values)  # NaN
        else:
            assert 0.0 < growth < 1.0, (p, values)
    ref = values["quadratic_descent"]
    if case == "normal":
        for p, v in values.items():
            assert v == pytest.approx(ref, rel=1e-4), (p, values)
