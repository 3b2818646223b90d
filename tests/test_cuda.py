"""CUDA kernels of torchiter against float64 CPU references.

Every test here skips when ``torch.cuda.is_available()`` is false. With
``TORCHITER_CUDA_TESTS_ON=cpu`` the device-independent tests run on the CPU
kernels instead (graph capture and stream tests still skip): a way to check
the tests themselves on a machine without a GPU.
"""

import itertools
import os

import pytest
import torch

import torchiter
from _util import DTYPES, TOL, bits as _bits, cpu_has_vector_fma, sgd_option_grid
from torchiter.reference import quadratic_descent_reference, sgd_step_reference

_ON = os.environ.get("TORCHITER_CUDA_TESTS_ON", "cuda")
DEV = torch.device("cuda" if _ON == "cuda" else _ON)
HAS_DEVICE = torch.cuda.is_available() if DEV.type == "cuda" else True
IS_CUDA = DEV.type == "cuda" and HAS_DEVICE

pytestmark = pytest.mark.skipif(not HAS_DEVICE, reason="CUDA is not available")
cuda_only = pytest.mark.skipif(not IS_CUDA, reason="needs a CUDA device")

# The wrapper binds a tensor lr to the Tensor-lr overload (the raw op, in eager
# Python, would read a 0-dim tensor as a float).
SGD = torchiter.ops.sgd_step_
QD = torch.ops.torchiter.quadratic_descent

# Around every vector width (2/4/8 lanes), chunk sizes (4096..65536) and odd tails.
SIZES = [1, 2, 3, 7, 8, 9, 15, 17, 33, 127, 1000, 4095, 4097, 65537]


def _rand(shape, dtype, device=DEV):
    return torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device)


# --------------------------------------------------------------------------- #
# sgd_step_
# --------------------------------------------------------------------------- #

OPTIONS = sgd_option_grid([(None, None), (0.0, None), (-0.4, 0.6)])


def _call(params, grads, bufs, lr, o, first_step):
    SGD(params, grads, bufs, lr, o["momentum"], o["dampening"], o["weight_decay"], o["nesterov"],
        o["maximize"], first_step, o["shrink"], o["min"], o["max"])


def _check_steps(params, grads_seq, bufs, o, lr=0.1, tol=None):
    """Runs len(grads_seq) steps on `params` and a float64 CPU reference side by side."""
    ref_p = [p.detach().double().cpu().clone() for p in params]
    ref_b = [b.detach().double().cpu().clone() for b in bufs]
    for step, grads in enumerate(grads_seq):
        first = step == 0
        _call(params, grads, bufs, lr, o, first)
        sgd_step_reference(ref_p, [g.double().cpu() for g in grads], ref_b, lr, o["momentum"], o["dampening"],
                           o["weight_decay"], o["nesterov"], o["maximize"], first, o["shrink"], o["min"], o["max"])
        for i, p in enumerate(params):
            t = tol or TOL[p.dtype]
            torch.testing.assert_close(p.double().cpu(), ref_p[i], **t, msg=lambda m: f"params[{i}] step {step}: {m}")
            if bufs:
                torch.testing.assert_close(bufs[i].double().cpu(), ref_b[i], **t,
                                           msg=lambda m: f"bufs[{i}] step {step}: {m}")
            # The reference follows the kernel's rounding of the stored values.
            ref_p[i] = p.detach().double().cpu().clone()
            if bufs:
                ref_b[i] = bufs[i].detach().double().cpu().clone()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("o", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sgd_step_every_option(dtype, o):
    params = [_rand(n, dtype) for n in (1, 7, 33, 4097)]
    grads_seq = [[_rand(p.shape, dtype) for p in params] for _ in range(3)]
    # Poisoned buffers: with first_step=True their old contents must not matter.
    bufs = [torch.full_like(p, float("nan")) for p in params] if o["momentum"] else []
    _check_steps(params, grads_seq, bufs, o)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_sizes_and_tails(dtype, momentum):
    o = dict(momentum=momentum, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
             shrink=0.01, min=-1.0, max=1.0)
    params = [_rand(n, dtype) for n in SIZES] + [_rand((3, 5, 7), dtype), _rand((0,), dtype)]
    grads_seq = [[_rand(p.shape, dtype) for p in params] for _ in range(2)]
    bufs = [torch.full_like(p, float("nan")) for p in params] if momentum else []
    _check_steps(params, grads_seq, bufs, o)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_unaligned_views(dtype):
    """Storage offsets that break 16-byte alignment take the scalar path."""
    o = dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False,
             shrink=0.0, min=0.0, max=None)
    base_p, base_g, base_b = (_rand(70004, dtype) for _ in range(3))
    params = [base_p[1:70001], base_p[0:1]]
    grads = [base_g[3:70003], base_g[0:1]]
    bufs = [base_b[2:70002], base_b[0:1]]
    before = _bits(base_p)
    _check_steps(params, [grads], bufs, o)
    assert not torch.equal(_bits(base_p), before)


def test_sgd_step_many_tensors_one_list():
    """More tensors than one launch carries, of mixed dtypes and sizes."""
    o = dict(momentum=0.5, dampening=0.0, weight_decay=0.1, nesterov=False, maximize=True,
             shrink=0.0, min=None, max=0.5)
    params, dtypes = [], itertools.cycle(DTYPES)
    for i in range(300):
        params.append(_rand((i % 13) + 1 + (4096 if i % 50 == 0 else 0), next(dtypes)))
    grads_seq = [[_rand(p.shape, p.dtype) for p in params] for _ in range(2)]
    bufs = [torch.zeros_like(p) for p in params]
    _check_steps(params, grads_seq, bufs, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sgd_step_non_contiguous(dtype):
    o = dict(momentum=0.9, dampening=0.2, weight_decay=0.0, nesterov=False, maximize=False,
             shrink=0.02, min=-0.5, max=0.5)
    strided = _rand((9, 14), dtype)[:, ::2]  # not dense: a working copy, written back
    dense_t = _rand((6, 11), dtype).t()  # dense, permuted strides
    p = [strided, dense_t, _rand((5, 4), dtype), _rand((8, 3), dtype).t()]
    g_seq = [[_rand(strided.shape, dtype),
              _rand((6, 11), dtype).t(),  # same strides as its param: walked flat
              _rand((4, 5), dtype).t(),  # contiguous param, transposed grad
              _rand((3, 8), dtype)]  # transposed param, contiguous grad
             for _ in range(3)]
    bufs = [torch.zeros_like(t) for t in p]  # same strides as the params
    bufs[2] = _rand((4, 5), dtype).t()  # a non-contiguous buffer of a contiguous param
    _check_steps(p, g_seq, bufs, o)
    # The strided view's neighbours are untouched.
    base = _rand((9, 14), dtype)
    neigh = base[:, 1::2].clone()
    SGD([base[:, ::2]], [_rand((9, 7), dtype)], [], 0.1)
    assert torch.equal(_bits(base[:, 1::2]), _bits(neigh))


@pytest.mark.skipif(not cpu_has_vector_fma(), reason="bitwise CPU agreement needs the vector-FMA CPU kernels")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_step_bitwise_equals_cpu_kernel(dtype):
    """Same per-element formula and FMA order as the CPU kernel: equal bits."""
    o = dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False,
             shrink=0.05, min=-0.3, max=None)
    p = [_rand(n, dtype) for n in (3, 1000, 4099)]
    g = [_rand(t.shape, dtype) for t in p]
    b = [_rand(t.shape, dtype) for t in p]
    pc, gc, bc = ([t.cpu().clone() for t in ts] for ts in (p, g, b))
    _call(p, g, b, 0.1, o, False)
    _call(pc, gc, bc, 0.1, o, False)
    for x, y in zip(p + b, pc + bc):
        assert torch.equal(_bits(x), _bits(y))


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sgd_step_tensor_lr_equals_float_lr(dtype, lr_dtype):
    lr_t = torch.tensor(0.37, dtype=lr_dtype, device=DEV)
    lr = float(lr_t)  # the value the tensor actually holds
    p1 = [_rand(n, dtype) for n in (5, 4099)]
    g = [_rand(t.shape, dtype) for t in p1]
    b1 = [_rand(t.shape, dtype) for t in p1]
    p2, b2 = [t.clone() for t in p1], [t.clone() for t in b1]
    SGD(p1, g, b1, lr_t, 0.9, 0.0, 0.0, True, False, False, 0.1, 0.0, None)
    SGD(p2, g, b2, lr, 0.9, 0.0, 0.0, True, False, False, 0.1, 0.0, None)
    for x, y in zip(p1 + b1, p2 + b2):
        assert torch.equal(_bits(x), _bits(y))
    assert lr_t.dtype == lr_dtype and float(lr_t) == lr  # lr itself is untouched


def test_sgd_step_empty_lists_and_empty_tensors():
    SGD([], [], [], 0.1)
    SGD([], [], [], torch.tensor(0.1, device=DEV))
    e = torch.empty(0, device=DEV)
    SGD([e], [e.clone()], [], 0.1)
    assert e.numel() == 0


def _error_cases():
    f32 = torch.float32
    cases = {
        "shape": (lambda: ([_rand(4, f32)], [_rand(5, f32)], []), dict(lr=0.1), "shape"),
        "dtype": (lambda: ([_rand(4, f32)], [_rand(4, torch.float64)], []), dict(lr=0.1), "dtype"),
        "int params": (lambda: ([torch.ones(4, dtype=torch.int32, device=DEV)],
                                [torch.ones(4, dtype=torch.int32, device=DEV)], []), dict(lr=0.1), "dtype"),
        "list length": (lambda: ([_rand(4, f32), _rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1), "grads has"),
        "buffers without momentum": (lambda: ([_rand(4, f32)], [_rand(4, f32)], [_rand(4, f32)]),
                                     dict(lr=0.1), "momentum_buffers must be empty"),
        "missing buffers": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1, momentum=0.9),
                            "momentum_buffers has"),
        "negative lr": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=-0.1), "lr must be >= 0"),
        "nan lr": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=float("nan")), "lr must be a finite"),
        "nesterov": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1, nesterov=True), "nesterov"),
        "min > max": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1, min=1.0, max=0.0), "min must be"),
        "negative shrink": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1, shrink=-1.0), "shrink"),
        "nan max": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []), dict(lr=0.1, max=float("nan")), "max must not"),
        "expanded param": (lambda: ([_rand(1, f32).expand(4)], [_rand(4, f32)], []), dict(lr=0.1), "share memory"),
        "2-d tensor lr": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []),
                          dict(lr=torch.ones(2, 2, device=DEV)), "0-dim"),
        "int tensor lr": (lambda: ([_rand(4, f32)], [_rand(4, f32)], []),
                          dict(lr=torch.tensor(1, device=DEV)), "floating"),
    }
    if IS_CUDA:
        cases["grad on cpu"] = (lambda: ([_rand(4, f32)], [_rand(4, f32, "cpu")], []), dict(lr=0.1), "is on")
        cases["cpu tensor lr"] = (lambda: ([_rand(4, f32)], [_rand(4, f32)], []),
                                  dict(lr=torch.tensor(0.1)), "lr is on")
    return cases


ERROR_CASES = [
    "shape", "dtype", "int params", "list length", "buffers without momentum", "missing buffers", "negative lr",
    "nan lr", "nesterov", "min > max", "negative shrink", "nan max", "expanded param", "2-d tensor lr",
    "int tensor lr", "grad on cpu", "cpu tensor lr",
]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_sgd_step_errors_leave_tensors_unchanged(case):
    cases = _error_cases()  # built here: the cases make device tensors
    if case not in cases:
        pytest.skip("needs a CUDA device")
    make, kw, match = cases[case]
    params, grads, bufs = make()
    # A good tensor first in the list: nothing may be written before the error.
    if params[0].is_floating_point() and case != "list length":
        good = _rand(4, params[0].dtype)
        params, grads = [good] + params, [_rand(4, good.dtype)] + grads
        if bufs:
            bufs = [_rand(4, good.dtype)] + bufs
    before = [_bits(t) for t in params + bufs]
    kw = dict(kw)
    lr = kw.pop("lr")
    with pytest.raises(RuntimeError, match=match):
        SGD(params, grads, bufs, lr, **kw)
    after = [_bits(t) for t in params + bufs]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@cuda_only
def test_sgd_step_on_current_stream():
    s = torch.cuda.Stream()
    p = [_rand(1 << 20, torch.float32)]
    g = [_rand(1 << 20, torch.float32)]
    expected = p[0].cpu().double() - 0.25 * g[0].cpu().double()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        SGD(p, g, [], 0.25)
    torch.cuda.current_stream().wait_stream(s)
    torch.testing.assert_close(p[0].cpu().double(), expected, **TOL[torch.float32])


@cuda_only
def test_sgd_step_other_device_index():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    p, g = [_rand(100, torch.float32, "cuda:1")], [_rand(100, torch.float32, "cuda:1")]
    expected = p[0].cpu() - 0.5 * g[0].cpu()
    SGD(p, g, [], 0.5)
    torch.testing.assert_close(p[0].cpu(), expected)


@cuda_only
@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64])
def test_sgd_step_tensor_lr_cuda_graph(lr_dtype):
    """The Tensor-lr step captured once, replayed with new learning rates."""
    dtype = torch.float32
    params = [_rand(n, dtype) for n in (3, 1000, 70001)]
    grads = [_rand(p.shape, dtype) for p in params]
    bufs = [_rand(p.shape, dtype) for p in params]
    lr = torch.tensor(0.1, dtype=lr_dtype, device=DEV)
    kw = dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
              first_step=False, shrink=0.0, min=0.0, max=None)

    def step():
        SGD(params, grads, bufs, lr, kw["momentum"], kw["dampening"], kw["weight_decay"], kw["nesterov"],
            kw["maximize"], kw["first_step"], kw["shrink"], kw["min"], kw["max"])

    # Warm up on a side stream (as torch.cuda.graphs recommends), then capture.
    saved = [t.clone() for t in params + bufs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for t, v in zip(params + bufs, saved):
        t.copy_(v)
    ep = [p.clone() for p in params]
    eb = [b.clone() for b in bufs]
    for value in (0.05, 0.2, 0.0):
        lr.fill_(value)  # the scheduler's update, in place, on the device
        graph.replay()
        SGD(ep, grads, eb, float(lr), kw["momentum"], kw["dampening"],
            kw["weight_decay"], kw["nesterov"], kw["maximize"], kw["first_step"], kw["shrink"], kw["min"],
            kw["max"])
        torch.cuda.synchronize()
        for x, y in zip(params + bufs, ep + eb):
            assert torch.equal(x, y), f"replay with lr={value} differs from the eager step"


# --------------------------------------------------------------------------- #
# quadratic_descent
# --------------------------------------------------------------------------- #


def _problem(B, C, spatial, dtype, seed=0, scale=1.0):
    """A well-conditioned problem: A symmetric positive definite with ||A|| ~ 1."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(C, C, generator=gen, dtype=torch.float64)
    A = M @ M.T / C + 0.5 * torch.eye(C, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64) * scale
    y0 = torch.randn((B, C, *spatial), generator=gen, dtype=torch.float64) * 0.1
    return y0.to(dtype), A.to(dtype), b.to(dtype)


QD_TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=2e-5)}

# C across every CMAX bucket edge (4, 8, 16, 32, 64) and past it (cuBLAS path).
QD_SHAPES = [
    (1, 1, ()), (7, 3, ()), (1000, 3, ()), (100, 10, ()), (5, 4, (3,)), (3, 5, (7, 9)), (4, 8, (33,)),
    (2, 9, (5, 5)), (3, 16, (11,)), (2, 17, (6,)), (2, 33, (3, 4)), (3, 50, (23, 23)), (2, 64, (5,)),
    (2, 65, (9,)), (3, 100, ()),
]
PROJECTIONS = [dict(), dict(min=0.0), dict(min=-0.2, max=0.3), dict(shrink=0.01), dict(shrink=0.02, min=0.0)]


def _qd(y0, A, b, lr, K, tol=0.0, check_every=1, lrs=None, **proj):
    return QD(y0, A, b, lr, K, tol, check_every, lrs, proj.get("shrink", 0.0), proj.get("min"), proj.get("max"))


def _qd_ref(y0, A, b, lr, K, tol=0.0, check_every=1, lrs=None, **proj):
    return quadratic_descent_reference(
        y0.double().cpu(), A.double().cpu(), b.double().cpu(), lr, K, tol, check_every,
        None if lrs is None else lrs.double().cpu(), proj.get("shrink", 0.0), proj.get("min"), proj.get("max"))


def _assert_qd(y0, A, b, lr, K, tol=0.0, check_every=1, lrs=None, exact_count=True, **proj):
    y0_before = _bits(y0)
    y, n = _qd(y0, A, b, lr, K, tol, check_every, lrs, **proj)
    ry, rn = _qd_ref(y0, A, b, lr, K, tol, check_every, lrs, **proj)
    assert torch.equal(_bits(y0), y0_before), "y0 was modified"
    assert y.shape == y0.shape and y.dtype == y0.dtype and y.device == y0.device and y.is_contiguous()
    assert n.dim() == 0 and n.dtype == torch.int64 and n.device == y0.device
    if exact_count:
        assert int(n) == rn
        torch.testing.assert_close(y.double().cpu(), ry, **QD_TOL[y0.dtype])
    return y, int(n), rn


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", QD_SHAPES, ids=str)
@pytest.mark.parametrize("proj", PROJECTIONS, ids=str)
def test_quadratic_descent_fixed_iterations(dtype, shape, proj):
    B, C, spatial = shape
    y0, A, b = (t.to(DEV) for t in _problem(B, C, spatial, dtype))
    _assert_qd(y0, A, b, 0.7, 13, **proj)


@pytest.mark.parametrize("shape", [(1000, 3, ()), (100, 10, ()), (3, 50, (7, 7)), (2, 65, (9,)), (3, 100, ())],
                         ids=str)
@pytest.mark.parametrize("check_every", [1, 3, 7])
@pytest.mark.parametrize("proj", [dict(), dict(min=0.0), dict(shrink=0.01)], ids=str)
def test_quadratic_descent_stop_test_counts(shape, check_every, proj):
    """tol > 0: same iteration count as the per-iteration loop (float64)."""
    B, C, spatial = shape
    y0, A, b = (t.to(DEV) for t in _problem(B, C, spatial, torch.float64, seed=1))
    for tol in (1e-2, 1e-4, 1e-7):
        _, n, rn = _assert_qd(y0, A, b, 0.9, 400, tol, check_every, **proj)
        assert 1 <= n <= 400
        if check_every == 1 and tol == 1e-2:
            assert n < 400, "the loop should stop early on this problem"


@pytest.mark.parametrize("shape", [(100, 10, ()), (3, 50, (7, 7)), (2, 65, (9,))], ids=str)
def test_quadratic_descent_stop_test_float32(shape):
    B, C, spatial = shape
    y0, A, b = (t.to(DEV) for t in _problem(B, C, spatial, torch.float32, seed=2))
    y, n = _qd(y0, A, b, 0.9, 300, 1e-3, 1)
    ry, rn = _qd_ref(y0, A, b, 0.9, 300, 1e-3, 1)
    assert abs(int(n) - rn) <= 1  # float32 deltas may cross tol one iteration apart
    if int(n) == rn:
        torch.testing.assert_close(y.double().cpu(), ry, **QD_TOL[torch.float32])


@pytest.mark.parametrize("lrs_device", ["cpu", DEV.type])
@pytest.mark.parametrize("lrs_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,tol", [((6, 5, (4,)), 0.0), ((6, 5, (4,)), 1e-6), ((2, 70, ()), 0.0)], ids=str)
def test_quadratic_descent_lrs(lrs_device, lrs_dtype, shape, tol):
    B, C, spatial = shape
    y0, A, b = (t.to(DEV) for t in _problem(B, C, spatial, torch.float64, seed=3))
    K = 25
    lrs = (0.9 * 0.93 ** torch.arange(K + 5, dtype=torch.float64)).to(lrs_dtype).to(lrs_device)
    _assert_qd(y0, A, b, 123.0, K, tol, 2, lrs, min=0.0)  # lr is ignored when lrs is given


def test_quadratic_descent_non_contiguous_inputs():
    y0, A, b = _problem(3, 6, (5, 7), torch.float64, seed=4)
    y0 = y0.to(DEV).transpose(2, 3).contiguous().transpose(2, 3)  # permuted spatial strides
    b = b.to(DEV).contiguous(memory_format=torch.channels_last)
    A = A.to(DEV).t().contiguous().t()  # a transposed (C, C) view
    for tol in (0.0, 1e-8):
        _assert_qd(y0, A, b, 0.5, 30, tol, 1, min=0.0)
    big = torch.randn(2, 8, 12, dtype=torch.float64, device=DEV)
    y0s = big[:, ::2, ::3]  # strided, not mergeable into (B, C, S) without a copy
    _, A4, b4 = _problem(2, 4, (4,), torch.float64, seed=5)
    _assert_qd(y0s, A4.to(DEV), b4.to(DEV)[:1].expand(2, 4, 4), 0.5, 9)  # b with a 0 stride


@pytest.mark.parametrize("tol", [0.0, 1e-3])
def test_quadratic_descent_edge_cases(tol):
    y0, A, b = (t.to(DEV) for t in _problem(4, 3, (2,), torch.float32))
    y, n = _qd(y0, A, b, 0.5, 0, tol)
    assert int(n) == 0 and torch.equal(y, y0) and y.data_ptr() != y0.data_ptr()
    y, n = _qd(y0, A, b, 0.5, 1, tol)  # one iteration: never a stop test at k = 0
    assert int(n) == 1
    empty = torch.empty(0, 3, 2, device=DEV)
    y, n = _qd(empty, A, empty, 0.5, 7, tol)
    assert y.shape == (0, 3, 2) and int(n) == 7
    # A diverged (NaN) loop never counts as converged.
    A_nan = A.clone()
    A_nan[0, 0] = float("nan")
    _, n = _qd(y0, A_nan, b, 0.5, 9, 1e30)
    assert int(n) == 9
    # lr 0: no change at all, converged at the first check.
    y, n = _qd(y0, A, b, 0.0, 50, 1e-12, 4)
    assert int(n) == 5 and torch.equal(y, y0)


def test_quadratic_descent_nsm_workloads():
    """The shipped workloads' sizes (models.md) against the per-iteration loop."""
    torch.manual_seed(0)
    cases = [  # (B, C, spatial, K, lr, tol, projection)
        (1000, 3, (), 100, 0.1, 1e-5, dict()),
        (100, 10, (), 200, 0.05, 1e-4, dict(min=0.0)),
        (20, 50, (23, 23), 40, 1.0, 0.0, dict(min=0.0)),
    ]
    for B, C, spatial, K, lr, tol, proj in cases:
        M = torch.eye(C, dtype=torch.float64) + 0.05 * torch.randn(C, C, dtype=torch.float64)
        Wx = torch.randn((B, C, *spatial), dtype=torch.float64)
        y0 = torch.zeros_like(Wx)
        _assert_qd(y0.to(DEV), M.to(DEV), Wx.to(DEV), lr, K, tol, 1, **proj)


def test_quadratic_descent_errors():
    y0, A, b = (t.to(DEV) for t in _problem(2, 3, (), torch.float32))
    with pytest.raises(RuntimeError, match="must be a floating tensor"):
        _qd(y0.int(), A.int(), b.int(), 0.1, 3)
    with pytest.raises(RuntimeError, match="A must have shape"):
        _qd(y0, A[:2], b, 0.1, 3)
    with pytest.raises(RuntimeError, match="share one dtype"):
        _qd(y0, A.double(), b, 0.1, 3)
    with pytest.raises(RuntimeError, match="lrs has"):
        _qd(y0, A, b, 0.1, 3, lrs=torch.ones(2))
    # A CPU lrs is checked on the host, with an error naming the rate; a
    # device one on the device, where a bad rate fails a device-side assert
    # (test_cuda_sync.py runs that in a child process).
    with pytest.raises(RuntimeError, match="lrs\\[1\\]"):
        _qd(y0, A, b, 0.1, 3, lrs=torch.tensor([0.1, -1.0, 0.1]))
    with pytest.raises(RuntimeError, match="check_every"):
        _qd(y0, A, b, 0.1, 3, 1e-3, 0)
    with pytest.raises(RuntimeError, match="min must be <= max"):
        _qd(y0, A, b, 0.1, 3, min=1.0, max=0.0)
    if IS_CUDA:
        with pytest.raises(RuntimeError, match="one device"):
            _qd(y0, A.cpu(), b, 0.1, 3)


@pytest.mark.skipif(not cpu_has_vector_fma(), reason="bitwise CPU agreement needs the vector-FMA CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tol", [0.0, 1e-6])
def test_quadratic_descent_bitwise_equals_cpu_kernel(dtype, tol):
    """C <= 64 accumulates in the CPU kernel's FMA order: equal bits."""
    y0, A, b = _problem(7, 12, (9,), dtype, seed=6)
    y_cpu, n_cpu = _qd(y0, A, b, 0.8, 40, tol, 2, min=0.0, shrink=0.001)
    y_dev, n_dev = _qd(y0.to(DEV), A.to(DEV), b.to(DEV), 0.8, 40, tol, 2, min=0.0, shrink=0.001)
    assert int(n_cpu) == int(n_dev)
    assert torch.equal(_bits(y_dev), _bits(y_cpu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(40, 6, ()), (5, 12, (9,)), (6, 40, ())], ids=str)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("trace", [False, True])
def test_quadratic_descent_ex_equals_cpu(dtype, shape, per_sample, trace):
    """Statistics, per-sample stops and traces of the device path against the CPU kernel."""
    B, C, spatial = shape
    y0, A, b = _problem(B, C, spatial, dtype, seed=7)
    b = b * torch.rand((B,) + (1,) * (b.dim() - 1), dtype=dtype) * 3
    lrs = torch.linspace(0.5, 0.3, 90, dtype=torch.float64)
    for kw in (dict(), dict(lrs=lrs)):
        args = (0.45, 90, 1e-4, 2, kw.get("lrs"), 0.0, 0.0, None, per_sample, trace)
        cpu = torch.ops.torchiter.quadratic_descent_ex(y0, A, b, *args)
        dev = torch.ops.torchiter.quadratic_descent_ex(y0.to(DEV), A.to(DEV), b.to(DEV), *args)
        it = torchiter.ops.QuadraticDescentResult._fields.index("iterations")
        d = (cpu[it] - dev[it].cpu()).abs().reshape(-1)
        if dtype == torch.float32 and d.any() and d.numel() == B:
            # A sample whose change lands within float32 rounding of tol at a
            # stop test stops there on one device and one test later on the
            # other (the kernels sum in different orders). Such ties must be
            # rare and one test apart; the rest must then agree exactly.
            assert int(d.max()) <= 2 and int((d > 0).sum()) <= max(1, B // 10), (cpu[it], dev[it])
            keep = d == 0
            y0k, bk = y0[keep], b[keep]
            cpu = torch.ops.torchiter.quadratic_descent_ex(y0k, A, bk, *args)
            dev = torch.ops.torchiter.quadratic_descent_ex(y0k.to(DEV), A.to(DEV), bk.to(DEV), *args)
        for x, z, name in zip(cpu, dev, torchiter.ops.QuadraticDescentResult._fields):
            assert z.device == y0.to(DEV).device and z.shape == x.shape and z.dtype == x.dtype, name
            if x.is_floating_point():
                torch.testing.assert_close(z.cpu(), x, equal_nan=True, **QD_TOL[dtype], msg=name)
            else:
                assert torch.equal(z.cpu(), x), name
