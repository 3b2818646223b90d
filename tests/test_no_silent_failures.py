"""Inputs that once gave a wrong answer without an error, or wrote before raising.

Each test pins one promise: a clear error naming the argument before anything
is written, or the right answer.
"""

import copy
import threading

import pytest
import torch
from torch import nn

import torchiter
from torchiter.models import SimilarityMatching, SparseCoding

from _util import JIT_WARNINGS, bits

OP = torch.ops.torchiter


# ---------------------------------------------------------------- TorchScript


class TestScriptedRawStep:
    """The raw op in scripted code: no form of it may be dropped as dead code."""

    # TorchScript's own deprecation warnings (DeprecationWarning in torch 2.13,
    # FutureWarning in 2.14), exactly those.
    pytestmark = [pytest.mark.filterwarnings(w) for w in JIT_WARNINGS]

    @staticmethod
    def _expected(p, g, lr=0.5):
        return p - lr * g

    def test_function_returning_the_param(self):
        @torch.jit.script
        def f(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            torch.ops.torchiter.sgd_step_([p], [g], [], 0.5, 0.0, 0.0, 0.0, False, False, False, 0.0, None, None)
            return p

        p, g = torch.randn(7), torch.randn(7)
        want = self._expected(p, g)
        f(p, g)
        torch.testing.assert_close(p, want)
        assert "torchiter::sgd_step_" in str(f.graph)

    def test_function_returning_nothing_with_two_params(self):
        @torch.jit.script
        def f(p: torch.Tensor, q: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
            torch.ops.torchiter.sgd_step_([p, q], [g, h], [], 0.5)

        p, q, g, h = (torch.randn(5) for _ in range(4))
        want_p, want_q = self._expected(p, g), self._expected(q, h)
        f(p, q, g, h)
        torch.testing.assert_close(p, want_p)
        torch.testing.assert_close(q, want_q)

    def test_tensor_lr_overload(self):
        @torch.jit.script
        def f(p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor) -> None:
            torch.ops.torchiter.sgd_step_([p], [g], [], lr)

        p, g = torch.randn(9), torch.randn(9)
        want = self._expected(p, g, 0.25)
        f(p, g, torch.tensor(0.25))
        torch.testing.assert_close(p, want)

    def test_module_stepping_its_buffer_also_after_save_load(self, tmp_path):
        class Stepper(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("w", torch.zeros(4))

            def forward(self, g: torch.Tensor) -> torch.Tensor:
                torch.ops.torchiter.sgd_step_([self.w], [g], [], 1.0)
                return g

        g = torch.arange(4.0)
        scripted = torch.jit.script(Stepper())
        scripted(g)
        torch.testing.assert_close(scripted.w, -g)
        path = tmp_path / "stepper.pt"
        torch.jit.save(scripted, str(path))
        loaded = torch.jit.load(str(path))
        loaded(g)
        loaded(g)
        torch.testing.assert_close(loaded.w, -3 * g)

    def test_momentum_buffer_is_updated(self):
        @torch.jit.script
        def f(p: torch.Tensor, g: torch.Tensor, b: torch.Tensor) -> None:
            torch.ops.torchiter.sgd_step_([p], [g], [b], 0.1, 0.9, 0.0, 0.0, False, False, True)

        p, g, b = torch.randn(6), torch.randn(6), torch.full((6,), float("nan"))
        want = p - 0.1 * g
        f(p, g, b)
        torch.testing.assert_close(p, want)
        torch.testing.assert_close(b, g)


# ---------------------------------------------------------------- aliasing


def _assert_rejected(match, params, grads, bufs, lr=0.1, **opts):
    """The call raises naming `match` and writes no tensor."""
    before = [bits(t) for t in (*params, *grads, *bufs)]
    with pytest.raises(RuntimeError, match=match):
        OP.sgd_step_(params, grads, bufs, lr, **opts)
    after = [bits(t) for t in (*params, *grads, *bufs)]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


class TestAliasing:
    def test_param_is_its_own_momentum_buffer(self):
        p, g = torch.randn(8), torch.randn(8)
        _assert_rejected(r"momentum_buffers\[0\] shares memory with params\[0\]", [p], [g], [p], momentum=0.9, first_step=True)

    def test_same_param_twice(self):
        p, g, h = torch.randn(8), torch.randn(8), torch.randn(8)
        _assert_rejected(r"params\[1\] shares memory with params\[0\]", [p, p], [g, h], [])

    def test_overlapping_views_of_one_storage(self):
        base = torch.randn(1000)
        a, b = base[:600], base[400:]
        _assert_rejected(r"params\[1\] shares memory with params\[0\]", [a, b], [torch.randn(600), torch.randn(600)], [])

    def test_param_passed_as_another_params_grad(self):
        p, q = torch.randn(5), torch.randn(5)
        _assert_rejected(r"grads\[1\] shares memory with params\[0\]", [p, q], [torch.randn(5), p], [])

    def test_param_as_its_own_grad(self):
        p = torch.randn(5)
        _assert_rejected(r"grads\[0\] shares memory with params\[0\]", [p], [p], [])

    def test_as_strided_param_overlapping_itself(self):
        base = torch.randn(10)
        p = base.as_strided((3, 3), (1, 1))
        _assert_rejected(r"params\[0\] has elements that share memory", [p], [torch.randn(3, 3)], [])

    def test_expanded_param(self):
        p = torch.randn(1, 4).expand(3, 4)
        _assert_rejected(r"params\[0\] has elements that share memory", [p], [torch.randn(3, 4)], [])

    def test_interleaved_views_overlapping_in_range_but_not_in_memory_are_accepted(self):
        base = torch.randn(4, 6)
        left, right = base[:, :3], base[:, 3:]  # byte ranges intersect, elements do not
        even, odd = base.view(-1)[::2], base.view(-1)[1::2]
        for views in ((left, right), (even, odd)):
            grads = [torch.randn_like(v) for v in views]
            want = [v - 0.1 * g for v, g in zip(views, grads)]
            OP.sgd_step_(list(views), grads, [], 0.1)
            for v, w in zip(views, want):
                torch.testing.assert_close(v, w)

    def test_disjoint_slices_of_one_storage_are_accepted(self):
        base = torch.randn(1000)
        a, b = base[:600], base[600:]
        ga, gb = torch.randn(600), torch.randn(400)
        want = torch.cat([a - 0.1 * ga, b - 0.1 * gb])
        OP.sgd_step_([a, b], [ga, gb], [], 0.1)
        torch.testing.assert_close(base, want)

    def test_grads_may_share_memory_with_each_other(self):
        p, q, g = torch.randn(5), torch.randn(5), torch.randn(5)
        want = (p - 0.1 * g, q - 0.1 * g)
        OP.sgd_step_([p, q], [g, g], [], 0.1)
        torch.testing.assert_close(p, want[0])
        torch.testing.assert_close(q, want[1])

    def test_non_dense_as_strided_without_overlap_is_accepted(self):
        base = torch.zeros(40)
        p = base.as_strided((3, 4), (10, 2))  # gaps, no overlap
        g = torch.ones(3, 4)
        OP.sgd_step_([p], [g], [], 1.0)
        assert (p == -1).all()
        assert base.sum() == -12


# ---------------------------------------------------------------- writability


class TestWritability:
    def test_inference_tensor_outside_inference_mode_writes_nothing(self):
        with torch.inference_mode():
            q = torch.randn(6)
        p, g, h = torch.randn(6), torch.randn(6), torch.randn(6)
        _assert_rejected(r"params\[1\] is an inference tensor", [p, q], [g, h], [])

    def test_inference_tensor_inside_inference_mode_is_updated(self):
        with torch.inference_mode():
            p, g = torch.randn(6), torch.randn(6)
            want = p - 0.1 * g
            OP.sgd_step_([p], [g], [], 0.1)
            torch.testing.assert_close(p, want)

    @pytest.mark.parametrize("kind", ["leaf", "view of leaf", "non-leaf"])
    def test_param_requiring_grad_in_grad_mode_is_rejected(self, kind):
        leaf = torch.randn(6, requires_grad=True)
        p = {"leaf": leaf, "view of leaf": leaf[1:], "non-leaf": leaf * 2}[kind]
        g = torch.randn(p.shape)
        _assert_rejected(r"params\[0\] requires grad and grad mode is enabled", [p], [g], [])

    def test_param_requiring_grad_under_no_grad_is_updated(self):
        p = torch.randn(6, requires_grad=True)
        g = torch.randn(6)
        want = p.detach() - 0.1 * g
        with torch.no_grad():
            OP.sgd_step_([p], [g], [], 0.1)
        torch.testing.assert_close(p.detach(), want)


# ---------------------------------------------------------------- quadratic_descent devices and sizes


class TestQuadraticDescentInputs:
    def test_lrs_on_meta_is_rejected(self):
        y0, A, b = torch.zeros(2, 3), torch.eye(3), torch.ones(2, 3)
        with pytest.raises(RuntimeError, match=r"lrs must be on the CPU or on y0's device"):
            OP.quadratic_descent(y0, A, b, 0.1, 5, 0.0, 1, torch.full((5,), 0.1, device="meta"))

    def test_other_meta_arguments_are_rejected(self):
        y0, A, b = torch.zeros(2, 3), torch.eye(3), torch.ones(2, 3)
        with pytest.raises(RuntimeError, match=r"must live on one device"):
            OP.quadratic_descent(y0, A.to("meta"), b, 0.1, 5)
        p, g = torch.randn(4), torch.randn(4)
        before = bits(p)
        with pytest.raises(RuntimeError, match=r"lr is on meta but params\[0\] is on cpu"):
            OP.sgd_step_.tensor_lr([p], [g], [], torch.tensor(0.1, device="meta"))
        with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
            OP.sgd_step_([p], [g.to("meta")], [], 0.1)
        assert torch.equal(bits(p), before)

    def test_meta_y0_with_cpu_lrs_traces(self):
        y0, A, b = (t.to("meta") for t in (torch.zeros(2, 3), torch.eye(3), torch.ones(2, 3)))
        y, n = OP.quadratic_descent(y0, A, b, 0.1, 5, 0.0, 1, torch.full((5,), 0.1))
        assert y.device.type == "meta" and n.device.type == "meta"

    def test_huge_max_iterations_costs_what_runs(self):
        y0, A, b = torch.zeros(2, 3), torch.eye(3), torch.ones(2, 3)
        y, n = OP.quadratic_descent(y0, A, b, 0.5, 10**12, 1e-3)
        assert 0 < int(n) < 100
        torch.testing.assert_close(y, torch.ones(2, 3), atol=2e-3, rtol=0)

    def test_lrs_read_only_as_far_as_the_loop_runs(self):
        y0, A, b = torch.zeros(2, 3), torch.eye(3), torch.ones(2, 3)
        lrs = torch.full((10**6,), 0.5)
        lrs[1000:] = float("nan")  # never reached: the loop stops long before
        y, n = OP.quadratic_descent(y0, A, b, 0.0, 10**6, 1e-3, 1, lrs)
        assert int(n) < 100
        lrs[3] = -1.0
        with pytest.raises(RuntimeError, match=r"lrs\[3\] must be a finite number >= 0"):
            OP.quadratic_descent(y0, A, b, 0.0, 10**6, 1e-3, 1, lrs)

    def test_model_scheduler_is_stepped_only_as_far_as_the_loop_runs(self):
        torch.manual_seed(0)
        steps = []

        class CountingStepLR(torch.optim.lr_scheduler.StepLR):
            def step(self, *a, **k):
                steps.append(1)
                return super().step(*a, **k)

        enc = nn.Linear(6, 4)
        m = SimilarityMatching(enc, 4, tol=1e-4, max_iterations=10**7, iteration_lr=0.2,
                               iteration_projection=nn.ReLU(), iteration_scheduler=CountingStepLR,
                               it_sched_kwargs=dict(step_size=1000, gamma=0.9))
        y = m(torch.randn(5, 6))
        assert m.iteration_idx + 1 < 1000
        assert len(steps) < 2000  # the chunks made, not 10**7
        assert torch.isfinite(y).all()


# ---------------------------------------------------------------- module state


class NNLS(torchiter.IterationLossModule):
    def __init__(self, A, lr=0.02, iterations=300, **kwargs):
        super().__init__(max_iterations=iterations, iteration_lr=lr, iteration_projection=nn.ReLU(), **kwargs)
        self.register_buffer("A", A)
        self.register_buffer("y", torch.zeros(A.shape[1]))

    def iteration_parameters(self):
        return [self.y]

    def iteration_loss(self, b):
        return 0.5 * ((self.A @ self.y - b) ** 2).sum()

    def post_iteration(self, b):
        super().post_iteration(b)
        return self.y.clone()


def _nnls(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(20, 10, generator=g)
    b = torch.randn(20, generator=g)
    return NNLS(A), b


class TestReentrancy:
    def _with_outer_param(self, module):
        module.scale = nn.Parameter(torch.ones(()))
        return module

    def test_forward_from_own_hook_is_refused_and_module_stays_usable(self):
        m, b = _nnls()
        m = self._with_outer_param(m)
        ref = copy.deepcopy(m)(b)

        def hook(mod):
            mod(b)

        handle = m.register_iteration_hook("iteration", hook)
        with pytest.raises(RuntimeError, match=r"NNLS.forward is already running on this instance"):
            m(b)
        assert m.scale.requires_grad and not m.y.requires_grad
        handle.remove()
        m.y.zero_()
        torch.testing.assert_close(m(b), ref)
        assert m.scale.requires_grad

    def test_two_threads_on_one_instance(self):
        m, b = _nnls()
        m = self._with_outer_param(m)
        inside = threading.Event()
        release = threading.Event()

        def hook(mod):
            inside.set()
            release.wait(10)

        h = m.register_iteration_hook("pre", hook)
        t = threading.Thread(target=lambda: m(b))
        t.start()
        assert inside.wait(10)
        try:
            with pytest.raises(RuntimeError, match=r"already running"):
                m(b)
        finally:
            release.set()
            t.join(10)
        h.remove()
        assert m.scale.requires_grad and not m.y.requires_grad
        # Usable again: a forward, and a forward from inside a hook is still refused.
        m(b)
        m.register_iteration_hook("pre", lambda mod: mod(b))
        with pytest.raises(RuntimeError, match=r"already running"):
            m(b)

    def test_deepcopy_during_forward_gives_a_usable_copy(self):
        m, b = _nnls()
        copies = []
        h = m.register_iteration_hook("pre", lambda mod: copies.append(copy.deepcopy(mod)))
        want = m(b)
        h.remove()
        copies[0].hooks["pre"].clear()
        # The copy, taken as the forward began, runs the same forward.
        torch.testing.assert_close(copies[0](b), want, rtol=0, atol=0)


class TestModes:
    def test_autocast_gives_the_float32_answer(self):
        m, b = _nnls()
        want = copy.deepcopy(m)(b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m(b)
        # bfloat16 matmuls: a few per cent, not the stale-parameter 20x.
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)

    @pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
    def test_autograd_loss_module_under_evaluation_modes(self, mode):
        m, b = _nnls()
        want = copy.deepcopy(m)(b)
        ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
        with ctx:
            b_in = b.clone()
            got = m(b_in)
        assert not got.requires_grad
        torch.testing.assert_close(got, want)
        assert not m.y.requires_grad

    def test_inference_tensor_iteration_parameter_is_named(self):
        m, b = _nnls()
        with torch.inference_mode():
            m.y = torch.zeros(10)
            with pytest.raises(ValueError, match=r"iteration_parameters\(\)\[0\] is an inference tensor"):
                m(b)

    def test_models_still_run_under_inference_mode(self):
        enc = nn.Linear(6, 4)
        m = SimilarityMatching(enc, 4, iteration_lr=0.1, iteration_projection=nn.ReLU())
        x = torch.randn(3, 6)
        want = m(x)
        with torch.inference_mode():
            got = m(x)
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- argument validation


class TestValidation:
    @pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf")])
    def test_similarity_matching_tau(self, tau):
        with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
            SimilarityMatching(nn.Linear(3, 2), 2, tau=tau)
        m = SimilarityMatching(nn.Linear(3, 2), 2)
        with pytest.raises(ValueError, match=r"tau must be a finite number > 0"):
            m.tau = tau
        assert m.tau == 0.1

    def test_encoder_channels_must_match_out_channels(self):
        m = SimilarityMatching(nn.Linear(3, 7), 5)
        with pytest.raises(ValueError, match=r"out_channels=5"):
            m(torch.randn(2, 3))
        assert not any(p.requires_grad is False for p in m.encoder.parameters())

    @pytest.mark.parametrize("tol", [-1e-3, float("nan"), float("inf")])
    def test_tol_on_every_path(self, tol):
        with pytest.raises(ValueError, match=r"tol must be a finite number >= 0"):
            SimilarityMatching(nn.Linear(3, 2), 2, tol=tol)
        with pytest.raises(ValueError, match=r"tol must be a finite number >= 0"):
            SparseCoding(4, 3, tol=tol)
        m = SimilarityMatching(nn.Linear(3, 2), 2)
        m.register_iteration_hook("iteration", lambda mod: None)  # the per-iteration path
        with pytest.raises(ValueError, match=r"tol must be a finite number >= 0"):
            m.tol = tol

    def test_empty_batch_loss_is_an_error_not_nan(self):
        m = SimilarityMatching(nn.Linear(3, 2), 2)
        x = torch.randn(0, 3)
        y = m(x)
        assert y.shape == (0, 2)
        with pytest.raises(ValueError, match=r"batch is empty"):
            m.loss(x, y)
        s = SparseCoding(4, 3)
        with pytest.raises(ValueError, match=r"batch is empty"):
            s.loss(torch.randn(0, 3), s(torch.randn(0, 3)))

    def test_sparse_coding_input_shape(self):
        s = SparseCoding(4, 3)
        with pytest.raises(ValueError, match=r"input_size=3"):
            s(torch.randn(2, 5))

    @pytest.mark.parametrize(
        "loss, error, match",
        [
            (lambda self, b: (self.A @ self.y - b) ** 2, ValueError, r"NNLS.iteration_loss\(\) must return a scalar tensor, got shape \(20,\)"),
            (lambda self, b: 1.5, TypeError, r"NNLS.iteration_loss\(\) must return a scalar tensor, got float"),
            (lambda self, b: (b**2).sum(), ValueError, r"NNLS.iteration_loss\(\) does not depend on the iteration parameters"),
        ],
    )
    def test_bad_iteration_loss_is_named(self, loss, error, match, monkeypatch):
        m, b = _nnls()
        m.scale = nn.Parameter(torch.ones(()))
        monkeypatch.setattr(NNLS, "iteration_loss", loss)
        with pytest.raises(error, match=match):
            m(b)
        assert m.scale.requires_grad and not m.y.requires_grad


def test_readme_example_reaches_the_non_negative_least_squares_optimum():
    """The README's first example, as printed there, against scipy's NNLS solver."""
    import re
    from pathlib import Path

    scipy_optimize = pytest.importorskip("scipy.optimize")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(import torch, torchiter\n\nclass NonNegativeLeastSquares.*?)```", readme, re.S)
    assert code, "the README's first example was not found"
    namespace = {}
    exec(code.group(1).replace("y = NonNegativeLeastSquares", "_ = NonNegativeLeastSquares"), namespace)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        A, b = torch.randn(20, 10, generator=g), torch.randn(20, generator=g)
        y = namespace["NonNegativeLeastSquares"](A)(b)
        x, _ = scipy_optimize.nnls(A.double().numpy(), b.double().numpy())
        torch.testing.assert_close(y.double(), torch.from_numpy(x), atol=1e-5, rtol=0)
