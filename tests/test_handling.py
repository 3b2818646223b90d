"""What users do with modules besides calling them: copies, checkpoints,
threads, DataLoader workers, other layouts and dtypes, odd batches, tracing
(torch.compile, torch.export, AOTInductor), the meta device, duck-typed
optimizers and Ctrl-C. Each must work as it does for PyTorch's own modules.
"""

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import torchiter
from _modules import NNLS, DuckSGD
from torchiter.models import MultiSimilarityMatching, SimilarityMatching, SparseCoding, SupervisedSimilarityMatching



def _nnls(**kwargs):
    g = torch.Generator().manual_seed(0)
    return NNLS(torch.randn(7, 5, generator=g), **kwargs)


def _b(seed=1):
    return torch.randn(7, generator=torch.Generator().manual_seed(seed))


def _linear_sm(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("iteration_projection", nn.ReLU())
    kwargs.setdefault("max_iterations", 30)
    kwargs.setdefault("iteration_lr", 0.1)
    return SimilarityMatching(nn.Linear(6, 4, bias=False), 4, **kwargs)


def _conv_sm(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("iteration_projection", nn.ReLU())
    kwargs.setdefault("max_iterations", 20)
    return SimilarityMatching(nn.Conv2d(2, 5, 3, bias=False), 5, **kwargs)


def _models():
    """(name, model, inputs) for every model class, small."""
    torch.manual_seed(0)
    x = torch.randn(6, 6)
    labels = torch.randint(0, 3, (6,))
    return [
        ("SimilarityMatching", _linear_sm(), (x,)),
        ("SimilarityMatching conv", _conv_sm(), (torch.randn(3, 2, 7, 7),)),
        (
            "MultiSimilarityMatching",
            MultiSimilarityMatching([nn.Linear(6, 4, bias=False), nn.Linear(3, 4, bias=False)], 4, max_iterations=20),
            (x, torch.randn(6, 3)),
        ),
        (
            "SupervisedSimilarityMatching",
            SupervisedSimilarityMatching(nn.Linear(6, 4, bias=False), 3, 4, max_iterations=20,
                                         iteration_projection=nn.ReLU()),
            (x, nn.functional.one_hot(labels, 3).to(torch.get_default_dtype())),
        ),
        ("SparseCoding", SparseCoding(8, 6, sparsity=0.05, max_iterations=30, iteration_lr=0.2), (x,)),
    ]


MODEL_IDS = [name for name, _, _ in _models()]


def _model(name):
    return next((m, xs) for n, m, xs in _models() if n == name)


# ------------------------------------------------------------------ copies


def _round_trip(m, how):
    """A copy of ``m`` made the way ``how`` names."""
    if how == "deepcopy":
        return copy.deepcopy(m)
    if how == "pickle":
        return pickle.loads(pickle.dumps(m))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_loss_module_round_trip_after_a_forward_gives_the_same_next_output(how):
    m = _nnls()
    m(_b(1))
    assert m.last_iteration_loss is not None
    c = _round_trip(m, how)
    assert c.last_iteration_loss == m.last_iteration_loss
    assert torch.equal(c(_b(2)), m(_b(2)))
    assert c.last_iteration_loss == m.last_iteration_loss


def test_loss_module_keeps_no_autograd_graph_between_forwards():
    m = _nnls()
    m(_b(1))
    # What the module holds after a forward: plain values and tensors without
    # a graph (a graph would keep the loop's tensors alive and block deepcopy).
    for value in vars(m).values():
        if isinstance(value, torch.Tensor):
            assert value.grad_fn is None
    loss = m.__getstate__()["_last_iteration_loss"]
    assert not isinstance(loss, torch.Tensor) or loss.grad_fn is None


def test_last_iteration_loss_is_lazy_and_right():
    m = _nnls()
    b = _b(1)
    y = m(b)
    expected = float(((m.A.detach() @ _prev_state(m, b) - b) ** 2).sum())
    assert m.last_iteration_loss == pytest.approx(expected, rel=1e-5)
    assert y.shape == (5,)


def _prev_state(m, b):
    """The state before the last iteration: rerun with one iteration fewer."""
    c = copy.deepcopy(m)
    c.max_iterations -= 1
    return c(b)


@pytest.mark.parametrize("name", MODEL_IDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_model_round_trip_after_a_forward_gives_the_same_next_output(name, how):
    m, xs = _model(name)
    m(*xs)
    c = _round_trip(m, how)
    assert torch.equal(c(*xs), m(*xs))


@pytest.mark.parametrize("name", MODEL_IDS)
def test_state_dict_and_optimizer_state_resume_training_bit_for_bit(name):
    def train(model, opt, batches):
        for xs in batches:
            opt.zero_grad()
            model.loss(*xs, model(*xs)).backward()
            opt.step()

    model, xs = _model(name)
    batches = [tuple(x + 0.1 * k for x in xs) for k in range(4)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train(model, opt, batches[:2])
    checkpoint = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, checkpoint)
    train(model, opt, batches[2:])

    fresh, _ = _model(name)
    checkpoint.seek(0)
    state = torch.load(checkpoint)
    fresh.load_state_dict(state["model"])
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.01, momentum=0.9)
    fresh_opt.load_state_dict(state["opt"])
    train(fresh, fresh_opt, batches[2:])
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


# ------------------------------------------------------------------ threads, workers


def test_separate_modules_in_several_threads_equal_sequential_results():
    inputs = [torch.randn(50, 6, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    models = [_linear_sm(tol=1e-6) for _ in inputs]
    expected = [copy.deepcopy(m)(x) for m, x in zip(models, inputs)]
    results = [None] * len(inputs)
    errors = []

    def run(i):
        try:
            for _ in range(5):
                results[i] = models[i](inputs[i])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        assert torch.equal(r, e)


class _EncodedDigits(torch.utils.data.Dataset):
    """A dataset whose items are a model's outputs, computed in the worker."""

    def __init__(self, model, x):
        self.model, self.x = model, x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.model(self.x[i : i + 1])[0]


def test_dataloader_workers_run_forwards():
    model = _linear_sm()
    x = torch.randn(8, 6)
    expected = torch.cat([model(x[i : i + 1]) for i in range(8)])
    loader = torch.utils.data.DataLoader(_EncodedDigits(model, x), batch_size=4, num_workers=2)
    got = torch.cat(list(loader))
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ layouts, batches, dtypes


def test_channels_last_and_non_contiguous_inputs_equal_contiguous_ones():
    m = _conv_sm()
    x = torch.randn(3, 2, 9, 9)
    ref = m(x)
    assert torch.allclose(m(x.to(memory_format=torch.channels_last)), ref, rtol=1e-5, atol=1e-6)
    wide = torch.randn(3, 2, 9, 18)[..., ::2]
    assert not wide.is_contiguous()
    assert torch.allclose(m(wide), m(wide.contiguous()), rtol=1e-5, atol=1e-6)
    lin = _linear_sm()
    xt = torch.randn(6, 5).T
    assert torch.allclose(lin(xt), lin(xt.contiguous()), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_batch_of_one_equals_that_row_of_a_batch(per_sample):
    m = _linear_sm(tol=1e-5 if per_sample else 0.0, per_sample_stopping=per_sample)
    x = torch.randn(9, 6)
    batch = m(x)
    for i in (0, 4, 8):
        assert torch.allclose(m(x[i : i + 1])[0], batch[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_empty_batch_gets_an_empty_result_or_a_clear_error(name):
    m, xs = _model(name)
    empty = tuple(x[:0] for x in xs)
    try:
        out = m(*empty)
    except ValueError as e:
        assert "empty" in str(e)
    else:
        assert out.shape[0] == 0 and out.shape[1:] == m(*xs).shape[1:]


@pytest.mark.parametrize("name", MODEL_IDS)
def test_nan_input_is_reported_never_silent(name):
    m, xs = _model(name)
    bad = (xs[0].clone().index_fill_(0, torch.tensor([1]), float("nan")),) + xs[1:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(*bad)
    assert torch.isnan(out).any()
    messages = [str(w.message) for w in caught if issubclass(w.category, torchiter.DivergenceWarning)]
    assert messages and "non-finite" in messages[0], messages
    m.divergence = "error"
    with pytest.raises(torchiter.DivergenceError, match="non-finite"):
        m(*bad)


def test_nan_input_is_reported_by_a_loss_module():
    m = _nnls()
    with pytest.warns(torchiter.DivergenceWarning, match="non-finite"):
        m(torch.full((7,), float("nan")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", MODEL_IDS)
def test_models_move_to_other_dtypes(name, dtype):
    m, xs = _model(name)
    ref = m(*xs).double()
    m = m.to(dtype)
    out = m(*(x.to(dtype) for x in xs))
    assert out.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float64 else dict(rtol=0.1, atol=0.1)
    torch.testing.assert_close(out.double(), ref, **tol)


def test_loss_module_moves_to_float64():
    m = _nnls().to(torch.float64)
    out = m(_b(1).double())
    assert out.dtype == torch.float64


def test_default_dtype_float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for name in MODEL_IDS:
            m, xs = _model(name)
            out = m(*xs)
            assert out.dtype == torch.float64, name
        assert _nnls()(_b(1).double()).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


# ------------------------------------------------------------------ duck-typed optimizers


@pytest.mark.parametrize(
    "factory",
    [DuckSGD, lambda params, lr=1.0: mock.Mock()],
    ids=["own optimizer class", "mock optimizer"],
)
def test_any_object_with_step_and_zero_grad_is_an_iteration_optimizer(factory):
    m = _nnls(iteration_optimizer=factory)
    m(_b(1))
    assert int(m.iteration_stats.iterations) == 60
    assert m.iteration_stats.lr is None  # no param_groups: no learning rate to report


def test_own_optimizer_gives_the_sgd_result():
    ref = _nnls()(_b(1))
    out = _nnls(iteration_optimizer=DuckSGD)(_b(1))
    torch.testing.assert_close(out, ref)


def test_models_take_an_own_optimizer():
    ref = _linear_sm()
    m = _linear_sm(iteration_optimizer=lambda params, lr: DuckSGD(params, lr))
    x = torch.randn(5, 6)
    torch.testing.assert_close(m(x), ref(x))


def test_optimizer_with_odd_param_groups_is_duck_typed():
    class Odd(DuckSGD):
        param_groups = "not a list of dicts"

    m = _nnls(iteration_optimizer=Odd)
    m(_b(1))
    assert m.iteration_stats.lr is None


def test_diverging_loop_with_an_own_optimizer_is_still_reported():
    m = _nnls(iteration_optimizer=lambda params, lr: DuckSGD(params, lr=5.0))
    with pytest.warns(torchiter.DivergenceWarning):
        m(_b(1))


# ------------------------------------------------------------------ meta device


@pytest.mark.parametrize("name", MODEL_IDS)
def test_meta_forward_gives_shapes_and_dtypes(name):
    ref, xs = _model(name)
    expected = ref(*xs)
    with torch.device("meta"):
        m, _ = _model(name)
    out = m(*(x.to("meta") for x in xs))
    assert out.device.type == "meta"
    assert out.shape == expected.shape and out.dtype == expected.dtype


def test_meta_forward_of_a_loss_module():
    with torch.device("meta"):
        m = _nnls()
    out = m(_b(1).to("meta"))
    assert out.device.type == "meta" and out.shape == (5,)


# ------------------------------------------------------------------ compile and export


@pytest.mark.parametrize("name", MODEL_IDS)
def test_models_export_with_default_settings(name):
    m, xs = _model(name)
    ep = torch.export.export(m, xs)
    assert torch.equal(ep.module()(*xs), m(*xs))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", MODEL_IDS)
def test_models_compile_forward_and_training_step(name, fresh_dynamo):
    m, xs = _model(name)
    ref = copy.deepcopy(m)
    compiled = torch.compile(m)
    torch.testing.assert_close(compiled(*xs), ref(*xs))

    def step(model, xs):
        loss = model.loss(*xs, model(*xs))
        loss.backward()
        return loss

    loss = torch.compile(step)(m, xs)
    ref_loss = step(ref, xs)
    torch.testing.assert_close(loss, ref_loss)
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_loss_module_compiles_and_exports():
    # Few iterations: TorchDynamo unrolls the generic loop.
    m = _nnls(max_iterations=6)
    b = _b(1)
    ref = m(b)
    torch.testing.assert_close(torch.compile(m)(b), ref)
    ep = torch.export.export(m, (b,))
    torch.testing.assert_close(ep.module()(b), ref)


# ------------------------------------------------------------------ Ctrl-C


_INTERRUPT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import torch, torchiter
    threads, C, kind, tol, per_sample = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1"
    # Ctrl-C as an interactive Python has it: a process started with SIGINT
    # ignored (a background job of a non-interactive shell, as CI runners
    # may start the suite) passes that on, and Python then installs no
    # KeyboardInterrupt handler, so the signal below would be dropped.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    R = torch.randn(C, C)
    A = torch.eye(C) if kind == "diagonal" else torch.eye(C) + 0.01 * (R @ R.T)
    # lr = 2/L: the top eigencomponent oscillates forever, so a stop test
    # never passes and the loop runs to max_iterations.
    lr = 2.0 / float(torch.linalg.eigvalsh(A.double()).max())
    # "sparse": (B, C) rows under ReLU, the kernels' sparse-row driver.
    b = torch.randn(2000, C) if kind == "sparse" else torch.randn(2000 if C < 100 else 64, C, 40)
    lo = 0.0 if kind == "sparse" else None
    y0 = torch.zeros_like(b)
    y0_copy, b_copy = y0.clone(), b.clone()
    def interrupt():
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=interrupt, daemon=True).start()
    start = time.monotonic()
    try:
        torch.ops.torchiter.quadratic_descent_ex(y0, A, b, lr, 10**7, tol, 1, None, 0.0, lo, None, per_sample, False)
        print("not interrupted")
    except KeyboardInterrupt:
        print("interrupted after", round(time.monotonic() - start - 1.0, 2))
    assert torch.equal(y0, y0_copy) and torch.equal(b, b_copy), "inputs changed"
    y, n = torch.ops.torchiter.quadratic_descent(y0[:2], A, b[:2], 0.1, 5, 0.0, 1, None, 0.0, None, None)
    print("usable", bool(torch.isfinite(y).all()), int(n))
    """
)


# Each CPU loop driver: tiles through all iterations (dense, no stop test),
# runs of a diagonal A in registers, sweeps with a stop test (small and GEMM
# channel counts), the per-sample loop, and the rows that skip zeros (each
# on its own, and by blocks from 129 channels on).
@pytest.mark.parametrize(
    "threads,C,kind,tol,per_sample",
    [(2, 3, "dense", 0.0, 0), (1, 3, "dense", 0.0, 0), (2, 5, "diagonal", 0.0, 0), (1, 5, "diagonal", 0.0, 0),
     (2, 5, "dense", 1e-30, 0), (2, 130, "dense", 1e-30, 0), (2, 4, "dense", 1e-30, 1),
     (2, 64, "sparse", 0.0, 0), (1, 64, "sparse", 0.0, 0), (2, 200, "sparse", 0.0, 0), (1, 200, "sparse", 0.0, 0)],
    ids=["tiles", "tiles-1-thread", "diagonal", "diagonal-1-thread", "sweeps", "gemm-sweeps", "per-sample",
         "sparse-rows", "sparse-rows-1-thread", "sparse-blocks", "sparse-blocks-1-thread"],
)
def test_ctrl_c_interrupts_a_long_whole_loop_op(threads, C, kind, tol, per_sample):
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_SCRIPT, str(threads), str(C), kind, str(tol), str(per_sample)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("interrupted after"), proc.stdout
    # Polled every 0.1 s of work; generous for a loaded machine.
    assert float(lines[0].split()[-1]) < 1.0, proc.stdout
    assert lines[1] == "usable True 5", proc.stdout
