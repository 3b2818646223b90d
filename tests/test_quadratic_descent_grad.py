"""Implicit gradients of torchiter.quadratic_descent with respect to A and b.

The op's backward differentiates the projected fixed point (see
csrc/ops/autograd/quadratic_descent.cpp). The problems here converge to
machine precision and keep every entry well away from the projection's kinks,
so the active set does not change under gradcheck's perturbations and the
fixed point's gradient is the true derivative of the op's output.
"""

import pytest
import torch

import torchiter  # noqa: F401  (registers the ops)
from _util import JIT_WARNINGS
from torchiter.reference import quadratic_descent_backward_reference, quadratic_descent_reference

OP = torch.ops.torchiter.quadratic_descent
BACKWARD = torch.ops.torchiter.quadratic_descent_backward
F64 = torch.float64
LR, ITERS = 0.5, 600

PROJECTIONS = {
    "none": dict(),
    "relu": dict(min=0.0),
    "box": dict(min=-0.4, max=0.6),
    "soft": dict(shrink=0.1),
    "soft_nonneg": dict(shrink=0.05, min=0.0),
}


def _margin(y, A, b, lr, shrink=0.0, min=None, max=None):
    """Distance of the fixed point from the projection's kinks (smallest over entries).

    Held entries: how far the pre-projection value lies beyond the bound (or
    inside the threshold); active ones: how far y lies from every kink.
    """
    w = y - lr * (torch.einsum("ij,bj...->bi...", A, y) - b)
    d = torch.full_like(y, float("inf"))
    if shrink > 0:
        d = torch.minimum(d, (w.abs() - shrink).abs())
    if min is not None:
        d = torch.minimum(d, (w - min).abs())
    if max is not None:
        d = torch.minimum(d, (w - max).abs())
    return float(d.min())


def _problem(shape, proj, skew=0.0, seed=0, dtype=F64):
    """A strictly convex problem whose fixed point has every entry 1e-2 from a kink."""
    C = shape[1]
    for attempt in range(100):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        q, _ = torch.linalg.qr(torch.randn(C, C, dtype=F64, generator=g))
        A = (q * (torch.rand(C, dtype=F64, generator=g) + 0.5)) @ q.T
        if skew:
            S = torch.randn(C, C, dtype=F64, generator=g)
            A = A + skew * (S - S.T)
        b = torch.randn(shape, dtype=F64, generator=g)
        y, _ = OP(torch.zeros_like(b), A, b, LR, ITERS, **PROJECTIONS[proj])
        if _margin(y, A, b, LR, **PROJECTIONS[proj]) > 1e-2:
            return A.to(dtype), b.to(dtype)
    raise AssertionError("no problem with a stable active set found")


def _solve(A, b, proj, iters=ITERS):
    return OP(torch.zeros_like(b), A, b, LR, iters, **PROJECTIONS[proj])[0]


@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
@pytest.mark.parametrize("shape", [(3, 4), (2, 5, 3), (2, 3, 2, 3)], ids=str)
def test_gradcheck_b_and_A(proj, shape):
    A, b = _problem(shape, proj)
    A.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, b: _solve(A, b, proj), (A, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("proj", ["none", "box", "soft"], ids=str)
def test_gradcheck_nonsymmetric_A(proj):
    # The backward solves with A's transpose on the active set: a skew part
    # in A makes a transpose mistake visible.
    A, b = _problem((4, 5), proj, skew=0.15, seed=1)
    assert not torch.allclose(A, A.T)
    A.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda A, b: _solve(A, b, proj), (A, b), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
def test_matches_autograd_through_unrolled_loop(proj):
    A, b = _problem((3, 6, 4), proj, seed=2)
    w = torch.randn_like(b)  # a random upstream gradient
    A1, b1 = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    (OP(torch.zeros_like(b), A1, b1, LR, ITERS, **PROJECTIONS[proj])[0] * w).sum().backward()
    A2, b2 = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y_ref, _ = quadratic_descent_reference(torch.zeros_like(b), A2, b2, LR, ITERS, **PROJECTIONS[proj])
    (y_ref * w).sum().backward()
    assert b2.grad.abs().max() > 0.1  # a gradient that can disagree
    torch.testing.assert_close(b1.grad, b2.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("proj", ["relu", "soft_nonneg"], ids=str)
def test_held_entries_get_no_gradient_in_b(proj):
    A, b = _problem((5, 7), proj, seed=3)
    b.requires_grad_(True)
    y = _solve(A, b, proj)
    held = (y == 0)
    assert held.any() and (~held).any()
    (g,) = torch.autograd.grad(y.sum(), b)
    assert torch.equal(g[held], torch.zeros_like(g[held]))
    assert (g[~held] != 0).all()


def test_float32_gradients_close_to_float64():
    A, b = _problem((4, 6, 5), "box", seed=4)
    w = torch.randn_like(b)
    grads = {}
    for dtype in (torch.float32, F64):
        Ad, bd = A.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
        y = _solve(Ad, bd, "box")
        grads[dtype] = torch.autograd.grad((y * w.to(dtype)).sum(), (Ad, bd))
        assert grads[dtype][0].dtype == dtype
    for g32, g64 in zip(grads[torch.float32], grads[F64]):
        torch.testing.assert_close(g32.double(), g64, rtol=1e-4, atol=1e-4)


def test_noncontiguous_inputs_and_upstream_gradient():
    A, b = _problem((3, 5, 4), "box", seed=5)
    w = torch.randn(3, 4, 5, dtype=F64).transpose(1, 2)  # non-contiguous upstream
    bt = b.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)  # a non-contiguous leaf
    At = A.T.contiguous().T.requires_grad_(True)
    y = _solve(At, bt, "box")
    gA, gb = torch.autograd.grad(y, (At, bt), w)
    ref = BACKWARD(w.contiguous(), y.detach(), A, 0.0, -0.4, 0.6)
    torch.testing.assert_close(gA, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_backward_op_matches_per_row_reference(proj, dtype):
    # With C = 128 one batched solve takes 128 rows in float64 (256 in
    # float32), so the 3 * 100 rows here take several.
    C = 128
    A, b = _problem((3, C, 100), "none", seed=12)
    b = b * 2
    y = _solve(A, b, proj, 300).to(dtype)
    g = torch.randn_like(y)
    got = BACKWARD(g, y, A.to(dtype), **PROJECTIONS[proj])
    ref = quadratic_descent_backward_reference(g.double(), y.double(), A, **PROJECTIONS[proj])
    tol = 1e-10 if dtype == F64 else 2e-3
    for a, r in zip(got, ref):
        assert a.dtype == dtype and a.is_contiguous()
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)


def test_y0_gets_no_gradient():
    A, b = _problem((3, 4), "none")
    y0 = torch.randn(3, 4, dtype=F64, requires_grad=True)
    y, n = OP(y0, A, b, LR, 50)
    assert not y.requires_grad and not n.requires_grad
    y, n = OP(y0, A.requires_grad_(True), b, LR, 50)
    assert y.requires_grad and not n.requires_grad
    assert torch.autograd.grad(y.sum(), (y0, A), allow_unused=True)[0] is None
    with torch.no_grad():
        assert not OP(y0, A, b, LR, 50)[0].requires_grad


def test_early_stop_gives_the_gradient_at_the_returned_point():
    # The backward differentiates the fixed point as if the returned y were it;
    # the iteration count tells the caller whether the loop got there.
    A, b = _problem((3, 5), "relu", seed=6)
    A.requires_grad_(True)
    b.requires_grad_(True)
    y, n = OP(torch.zeros_like(b), A, b, LR, ITERS, tol=1e-2, min=0.0)
    assert 1 < int(n) < ITERS
    w = torch.randn_like(y)
    gA, gb = torch.autograd.grad(y, (A, b), w)
    ref = BACKWARD(w, y.detach(), A.detach(), 0.0, 0.0, None)
    torch.testing.assert_close(gA, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(gb, ref[1], rtol=0, atol=0)


def _saved_bytes(fn):
    """Bytes autograd saves for backward while ``fn()`` builds its graph."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def test_backward_memory_does_not_grow_with_iterations():
    A, b = _problem((8, 6, 5), "soft", seed=7)
    A.requires_grad_(True)
    b.requires_grad_(True)
    saved = {}
    for iters in (50, 5000):
        saved[iters], y = _saved_bytes(lambda: _solve(A, b, "soft", iters))
        gA, gb = torch.autograd.grad(y.sum(), (A, b))
        assert torch.isfinite(gA).all() and torch.isfinite(gb).all()
    # the op keeps y and A: independent of the iteration count
    assert saved[50] == saved[5000] == (b.numel() + A.numel()) * 8
    # whereas the unrolled loop saves every iterate
    unrolled, _ = _saved_bytes(lambda: quadratic_descent_reference(torch.zeros_like(b), A, b, LR, 50, shrink=0.1)[0])
    assert unrolled > 50 * b.numel() * 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gradients_match_cpu_and_peak_memory_is_flat():
    A, b = _problem((16, 8, 9), "box", seed=8)
    w = torch.randn_like(b)
    cpu = torch.autograd.grad((_solve(A.requires_grad_(True), b.requires_grad_(True), "box") * w).sum(), (A, b))
    Ac, bc = A.detach().cuda().requires_grad_(True), b.detach().cuda().requires_grad_(True)
    _solve(Ac, bc, "box", 5).sum().backward()  # the solver's handles and workspaces, once
    peaks = []
    for iters in (50, 5000):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y = _solve(Ac, bc, "box", iters)
        g = torch.autograd.grad((y * w.cuda()).sum(), (Ac, bc))
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
    for gc, gr in zip(g, cpu):
        torch.testing.assert_close(gc.cpu(), gr, rtol=1e-9, atol=1e-9)
    assert peaks[0] == peaks[1]


def test_singular_active_block_is_a_clear_error_on_cpu():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=F64)).requires_grad_(True)
    b = torch.tensor([[1.0, 0.0]], dtype=F64)
    y, _ = OP(torch.zeros_like(b), A, b, LR, 100)
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent_backward: A restricted to the active set is singular"):
        y.sum().backward()


def test_singular_block_with_a_projection_names_the_row():
    A = torch.ones(2, 2, dtype=F64, requires_grad=True)  # rank 1: every block with both entries is singular
    b = torch.tensor([[4.0, -4.0], [1.0, 1.0]], dtype=F64)
    y, _ = OP(torch.zeros_like(b), A, b, LR, 200, min=-5.0)
    assert (y[0] == -5.0).any() and (y[1] > -5.0).all()  # row 0 holds an entry, row 1 none
    with pytest.raises(RuntimeError, match=r"singular \(the block of row 1 of the batch"):
        y.sum().backward()


def test_double_backward_is_refused():
    A, b = _problem((2, 3), "none")
    b.requires_grad_(True)
    y = _solve(A, b, "none")
    (g,) = torch.autograd.grad((y**2).sum(), b, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)), "share one dtype"),
        ((torch.zeros(2, 4, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)), "grad_y has shape"),
        ((torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), torch.eye(4, dtype=F64)), "A must have shape"),
        ((torch.zeros(3, dtype=F64), torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)), "y must have shape"),
    ],
)
def test_backward_op_errors(args, match):
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent_backward: .*" + match):
        BACKWARD(*args)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(shrink=-0.1), "shrink must be >= 0"),
        (dict(shrink=float("nan")), "shrink must be a finite number"),
        (dict(shrink=float("inf")), "shrink must be a finite number"),
        (dict(min=0.5, max=0.1), "min must be <= max"),
        (dict(min=float("nan")), "min must not be NaN"),
        (dict(max=float("nan")), "max must not be NaN"),
    ],
)
def test_backward_op_checks_the_projection_as_the_forward_does(options, match):
    """The same rule and words as quadratic_descent's own check of these options."""
    y, A = torch.zeros(2, 3, dtype=F64), torch.eye(3, dtype=F64)
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent_backward: " + match):
        BACKWARD(torch.ones_like(y), y, A, **options)
    with pytest.raises(RuntimeError, match=r"torchiter\.quadratic_descent: " + match):
        OP(y, A, torch.zeros_like(y), LR, 3, **options)


def _opcheck(op, args, kwargs=None):
    result = torch.library.opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("proj", ["none", "box", "soft_nonneg"], ids=str)
def test_opcheck_with_requires_grad(proj):
    A, b = _problem((3, 4, 2), proj, seed=9)
    _opcheck(
        OP.default,
        (torch.zeros_like(b), A.requires_grad_(True), b.requires_grad_(True), LR, 200),
        PROJECTIONS[proj],
    )
    y = _solve(A.detach(), b.detach(), proj)
    _opcheck(BACKWARD.default, (torch.randn_like(y), y, A.detach()), PROJECTIONS[proj])


@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_torchscript_gradients_match_eager():
    def solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.ops.torchiter.quadratic_descent(torch.zeros_like(b), A, b, 0.5, 600, 0.0, 1, None, 0.0, 0.0, None)[0]

    scripted = torch.jit.script(solve)
    A, b = _problem((4, 5), "relu", seed=10)
    w = torch.randn_like(b)
    grads = []
    for fn in (solve, scripted):
        Ai, bi = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
        grads.append(torch.autograd.grad((fn(Ai, bi) * w).sum(), (Ai, bi)))
    for ge, gs in zip(*grads):
        torch.testing.assert_close(gs, ge, rtol=0, atol=0)


def test_compiled_gradients_match_eager():
    def solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y, _ = torch.ops.torchiter.quadratic_descent(torch.zeros_like(b), A, b, 0.5, 600, 0.0, 1, None, 0.05, 0.0, None)
        return (y * y).sum()

    torch._dynamo.reset()
    try:
        compiled = torch.compile(solve, fullgraph=True, backend="aot_eager")
        A, b = _problem((4, 5, 3), "soft_nonneg", seed=11)
        grads = []
        for fn in (solve, compiled):
            Ai, bi = A.clone().requires_grad_(True), b.clone().requires_grad_(True)
            grads.append(torch.autograd.grad(fn(Ai, bi), (Ai, bi)))
        for ge, gc in zip(*grads):
            torch.testing.assert_close(gc, ge, rtol=1e-12, atol=1e-12)
    finally:
        torch._dynamo.reset()
