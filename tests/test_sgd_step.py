"""torchiter.sgd_step_ against torch.optim.SGD (float64) plus the projection."""


import pytest
import torch

import torchiter
from _util import DTYPES, JIT_WARNINGS, TOL, bits as _bits, sgd_option_grid
from torchiter.reference import project, sgd_step_reference

OP = torch.ops.torchiter.sgd_step_
# Sizes around and past every vector width (4/8/16/32 lanes), plus empty ones.
SIZES = [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 63, 65, 127, 129, 1000, 4099]


def _tensors(sizes, dtype, device):
    return [torch.randn(n, dtype=torch.float64).to(dtype=dtype, device=device) for n in sizes]


def _sgd64_step(p, g, buf, opts, first):
    """One step of torch.optim.SGD in float64 from the kernel's current state."""
    p64 = p.detach().double().clone().requires_grad_(True)
    kw = {k: opts[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
    opt = torch.optim.SGD([p64], foreach=False, **kw)
    p64.grad = g.double()
    if opts["momentum"] != 0 and not first:
        opt.state[p64]["momentum_buffer"] = buf.double().clone()
    opt.step()
    new_buf = opt.state[p64].get("momentum_buffer")
    with torch.no_grad():
        out = project(p64.detach(), opts["shrink"], opts["min"], opts["max"])
    return out, new_buf


OPTION_GRID = sgd_option_grid([(None, None), (0.0, None), (-0.4, 0.6), (None, 0.2)])


def _run_against_sgd(dtype, device, opts, sizes, steps=3, lr=0.1):
    params = _tensors(sizes, dtype, device)
    grads_seq = [_tensors(sizes, dtype, device) for _ in range(steps)]
    # Poisoned buffers: with first_step=True their old contents must not matter.
    bufs = [torch.full_like(p, float("nan")) for p in params] if opts["momentum"] else []
    full = dict(opts, lr=lr)
    for step in range(steps):
        grads = grads_seq[step]
        expected = [_sgd64_step(p, g, bufs[i] if bufs else None, full, step == 0) for i, (p, g) in enumerate(zip(params, grads))]
        OP(params, grads, bufs, lr, opts["momentum"], opts["dampening"], opts["weight_decay"], opts["nesterov"],
           opts["maximize"], step == 0, opts["shrink"], opts["min"], opts["max"])
        for i, (ep, eb) in enumerate(expected):
            assert not torch.isnan(params[i]).any(), f"NaN in params[{i}] at step {step}"
            torch.testing.assert_close(params[i].double().cpu(), ep.cpu(), **TOL[dtype])
            if bufs:
                torch.testing.assert_close(bufs[i].double().cpu(), eb.cpu(), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch_sgd_all_options(device, dtype, opts):
    _run_against_sgd(dtype, device, opts, SIZES[:12])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_torch_sgd_large_and_parallel(device, dtype):
    # Big enough to be split across threads; sizes not multiples of the chunk.
    opts = dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, maximize=False, shrink=0.02, min=-1.0, max=1.5)
    _run_against_sgd(dtype, device, opts, [100_003, 65_537, 5], steps=3)


def test_without_projection_matches_torch_sgd_to_one_ulp_float64(device):
    # Same operation order as torch.optim.SGD's in-place ops. With vector FMA
    # (AVX2/AVX-512 builds, like torch's kernels) the results are bitwise
    # equal; a plain x86-64 build rounds the products separately: one ulp.
    params = _tensors([1000, 17], torch.float64, device)
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SGD(ref, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=False)
    bufs = [torch.empty_like(p) for p in params]
    for step in range(3):
        grads = _tensors([1000, 17], torch.float64, device)
        for r, g in zip(ref, grads):
            r.grad = g.clone()
        opt.step()
        OP(params, grads, bufs, 0.05, momentum=0.9, weight_decay=0.01, first_step=step == 0)
        for p, r in zip(params, ref):
            torch.testing.assert_close(p, r.detach(), rtol=2.3e-16, atol=4.5e-16)


def test_reference_function_agrees(device):
    params = _tensors(SIZES, torch.float64, device)
    grads = _tensors(SIZES, torch.float64, device)
    bufs = _tensors(SIZES, torch.float64, device)
    rp, rb = [p.clone() for p in params], [b.clone() for b in bufs]
    kw = dict(momentum=0.8, dampening=0.2, weight_decay=0.1, shrink=0.1, min=-0.3, max=0.9)
    sgd_step_reference(rp, grads, rb, 0.3, **kw)
    torchiter.ops.sgd_step_(params, grads, bufs, 0.3, **kw)
    for a, b in zip(params + bufs, rp + rb):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_mixed_dtypes_in_one_call(device):
    sizes = [33, 100]
    ps = [torch.randn(n, device=device, dtype=dt) for n in sizes for dt in DTYPES]
    gs = [torch.randn_like(p) for p in ps]
    exp = [project(p.double() - 0.5 * g.double(), min=0.0) for p, g in zip(ps, gs)]
    OP(ps, gs, [], 0.5, min=0.0)
    for p, e in zip(ps, exp):
        torch.testing.assert_close(p.double(), e, **TOL[p.dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_params_updated_in_place(device, dtype):
    base = torch.randn(37, 41, dtype=torch.float64).to(device=device, dtype=dtype)
    views = [base[:, ::2], base.t(), base[3:20, 5:39]]
    for view in views:
        before = base.clone()
        g = torch.randn(view.shape, dtype=torch.float64).to(device=device, dtype=dtype)
        buf = torch.randn(view.shape, dtype=torch.float64).to(device=device, dtype=dtype).t().contiguous().t()
        exp_buf = 0.9 * buf.double() + g.double()
        exp = project(view.double() - 0.1 * exp_buf, min=-0.5)
        OP([view], [g], [buf], 0.1, momentum=0.9, min=-0.5)
        torch.testing.assert_close(view.double(), exp, **TOL[dtype])
        torch.testing.assert_close(buf.double(), exp_buf, **TOL[dtype])
        # Memory outside the view is untouched.
        mask = torch.ones_like(base, dtype=torch.bool)
        if view is views[1]:
            mask[:] = False
        elif view is views[0]:
            mask[:, ::2] = False
        else:
            mask[3:20, 5:39] = False
        assert torch.equal(base[mask], before[mask])


def test_transposed_param_with_transposed_grad(device):
    p = torch.randn(64, 33, device=device).t()
    g = torch.randn(64, 33, device=device).t()
    exp = (p - 0.2 * g).clamp(min=0)
    OP([p], [g], [], 0.2, min=0.0)
    torch.testing.assert_close(p, exp)


def test_thread_count_does_not_change_result():
    p0 = torch.randn(300_001)
    g = torch.randn(300_001)
    outs = []
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            p = p0.clone()
            b = torch.zeros_like(p)
            OP([p], [g], [b], 0.1, momentum=0.9, first_step=True, shrink=0.01)
            outs.append(p)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_tensor_lr_overload(device):
    p = torch.randn(1025, device=device)
    g = torch.randn(1025, device=device)
    exp = (p - 0.25 * g).clamp(max=0.1)
    OP.tensor_lr([p], [g], [], torch.tensor(0.25, device=device), max=0.1)
    torch.testing.assert_close(p, exp)
    # the wrapper picks the Tensor overload by type
    exp = (p - 0.5 * g).clamp(max=0.1)
    torchiter.ops.sgd_step_([p], [g], [], torch.tensor(0.5, device=device), max=0.1)
    torch.testing.assert_close(p, exp)
    torchiter.ops.sgd_step_([p], [g], [], torch.tensor(0.0, dtype=torch.float64, device=device))


def test_empty_lists_are_a_no_op():
    OP([], [], [], 0.1)
    OP([], [], [], 0.1, momentum=0.9)


# --- bad input: clear error, raised before anything is written ---------------

def _bad_cases(device):
    def make():
        ps = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
        gs = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
        bs = [torch.randn(5, device=device), torch.randn(3, 4, device=device)]
        return ps, gs, bs

    cases = []

    def add(name, match, mutate, **kw):
        cases.append((name, match, mutate, kw))

    add("grads length", r"grads has 1 tensors but params has 2", lambda p, g, b: (p, g[:1], b), momentum=0.9)
    add("buffers length", r"momentum_buffers has 1 tensors", lambda p, g, b: (p, g, b[:1]), momentum=0.9)
    add("buffers without momentum", r"momentum_buffers must be empty", lambda p, g, b: (p, g, b))
    add("grad shape", r"grads\[1\] has shape \[4, 3\] but params\[1\] has shape \[3, 4\]",
        lambda p, g, b: (p, [g[0], g[1].t().contiguous()], b), momentum=0.9)
    add("buffer shape", r"momentum_buffers\[1\] has shape", lambda p, g, b: (p, g, [b[0], b[1].reshape(12)]), momentum=0.9)
    add("grad dtype", r"grads\[1\] has dtype Double but params\[1\] has dtype Float",
        lambda p, g, b: (p, [g[0], g[1].double()], b), momentum=0.9)
    add("buffer dtype", r"momentum_buffers\[0\] has dtype Half", lambda p, g, b: (p, g, [b[0].half(), b[1]]), momentum=0.9)
    add("int param", r"params\[1\] has dtype Long but float32, float64, float16 or bfloat16 is expected",
        lambda p, g, b: ([p[0], p[1].long()], [g[0], g[1].long()], []))
    add("expanded param", r"params\[1\] has elements that share memory",
        lambda p, g, b: ([p[0], p[1][:1].expand(3, 4)], g, []))
    add("negative lr", r"lr must be >= 0, got -0.1", lambda p, g, b: (p, g, []), lr=-0.1)
    add("NaN lr", r"lr must be a finite number", lambda p, g, b: (p, g, []), lr=float("nan"))
    add("negative momentum", r"momentum must be >= 0", lambda p, g, b: (p, g, b), momentum=-0.5)
    add("NaN momentum", r"momentum must be a finite number", lambda p, g, b: (p, g, b), momentum=float("nan"))
    add("NaN dampening", r"dampening must be a finite number", lambda p, g, b: (p, g, b), momentum=0.9, dampening=float("nan"))
    add("NaN weight decay", r"weight_decay must be a finite number", lambda p, g, b: (p, g, []), weight_decay=float("nan"))
    add("nesterov without momentum", r"nesterov requires momentum > 0 and dampening == 0",
        lambda p, g, b: (p, g, []), nesterov=True)
    add("nesterov with dampening", r"nesterov requires momentum > 0 and dampening == 0, got momentum=0.9 and dampening=0.1",
        lambda p, g, b: (p, g, b), momentum=0.9, dampening=0.1, nesterov=True)
    add("negative shrink", r"shrink must be >= 0", lambda p, g, b: (p, g, []), shrink=-1.0)
    add("min > max", r"min must be <= max, got min=1 and max=0", lambda p, g, b: (p, g, []), min=1.0, max=0.0)
    add("NaN min", r"min must not be NaN", lambda p, g, b: (p, g, []), min=float("nan"))
    add("NaN max", r"max must not be NaN", lambda p, g, b: (p, g, []), max=float("nan"))
    add("device", r"params\[1\] is on meta but params\[0\] is on cpu",
        lambda p, g, b: ([p[0], torch.empty(3, 4, device="meta")], g, []))
    return make, cases


@pytest.mark.parametrize("case", range(len(_bad_cases("cpu")[1])), ids=lambda i: _bad_cases("cpu")[1][i][0])
def test_bad_input_raises_before_writing(device, case):
    make, cases = _bad_cases(device)
    name, match, mutate, kw = cases[case]
    if device != "cpu" and name == "device":
        pytest.skip("mixes CPU with meta only")
    ps, gs, bs = mutate(*make())
    snap = [None if t.device.type == "meta" else _bits(t) for t in ps + gs + bs]
    lr = kw.pop("lr", 0.1)
    with pytest.raises(RuntimeError, match="torchiter.sgd_step_: " + match):
        OP(ps, gs, bs, lr, **kw)
    for t, s in zip(ps + gs + bs, snap):
        if t.device.type != "meta":
            assert torch.equal(_bits(t), s), f"{name}: a tensor was written before the error"


def test_sparse_grad_is_named(device):
    ps = [torch.randn(3, 4, device=device) for _ in range(3)]
    gs = [torch.randn(3, 4, device=device) for _ in range(2)] + [torch.randn(3, 4, device=device).to_sparse()]
    snap = [_bits(p) for p in ps]
    with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: grads\[2\] must be a dense \(strided\) tensor, got layout Sparse"):
        OP(ps, gs, [], 0.1)
    assert all(torch.equal(_bits(p), s) for p, s in zip(ps, snap))


def test_bad_tensor_lr(device):
    p, g = torch.randn(4, device=device), torch.randn(4, device=device)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: lr must be a 0-dim tensor"):
        OP.tensor_lr([p], [g], [], torch.tensor([0.1, 0.2], device=device))
    with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: lr must be a floating tensor"):
        OP.tensor_lr([p], [g], [], torch.tensor(1, device=device))
    with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: lr must be a floating tensor"):
        torchiter.ops.sgd_step_([p], [g], [], torch.tensor(1, device=device))
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: lr must be a finite number >= 0"):
            OP.tensor_lr([p], [g], [], torch.tensor(-1.0))
    assert torch.equal(p, before)


# --- dispatcher integration ---------------------------------------------------

def test_opcheck(device):
    ps = [torch.randn(17, device=device), torch.randn(4, 5, device=device)]
    gs = [torch.randn_like(p) for p in ps]
    bs = [torch.randn_like(p) for p in ps]
    torch.library.opcheck(OP.default, (ps, gs, bs, 0.1), dict(momentum=0.9, shrink=0.01, min=-1.0, max=1.0))
    torch.library.opcheck(OP.tensor_lr, ([p.clone() for p in ps], gs, [], torch.tensor(0.1, device=device)), dict(min=0.0))


def _step_fn(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], lr: float) -> None:
    torchiter.ops.sgd_step_(params, grads, bufs, lr, momentum=0.9, first_step=True, min=0.0)


class _Step(torch.nn.Module):
    def forward(self, p: torch.Tensor, g: torch.Tensor, b: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        _step_fn([p], [g], [b], 0.1)
        torchiter.ops.sgd_step_([p], [g], [], lr, shrink=0.01)
        return p


@pytest.mark.filterwarnings(*JIT_WARNINGS)
def test_torchscript_round_trip(tmp_path):
    scripted = torch.jit.script(_Step())
    path = tmp_path / "step.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    p0, g = torch.randn(77), torch.randn(77)
    outs = []
    for fn in (_Step(), scripted, loaded):
        p, b = p0.clone(), torch.empty(77)
        fn(p, g, b, torch.tensor(0.05))
        outs.append(p)
    assert not torch.equal(outs[0], p0)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bumps_autograd_version_counters():
    # A graph that saved a param must notice that the step changed it.
    p, g, b = torch.randn(5), torch.randn(5), torch.zeros(5)
    v = (p._version, b._version)
    OP([p], [g], [b], 0.1, momentum=0.9, first_step=True)
    assert p._version > v[0] and b._version > v[1]
    y = torch.randn(5, requires_grad=True)
    w = y * 1
    loss = (w * w).sum()
    with torch.no_grad():
        torchiter.ops.sgd_step_([w], [torch.ones(5)], [], torch.tensor(0.1))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_direct_binding_equals_the_op():
    # torchiter._C._sgd_step_no_momentum (the iteration modules' hot path)
    # goes through the same dispatcher entry as the op.
    step = torchiter._C._sgd_step_no_momentum
    for kw in [dict(), dict(weight_decay=0.1, maximize=True, shrink=0.05, min=-0.2, max=0.3)]:
        ps = _tensors([17, 1000], torch.float32, "cpu")
        gs = _tensors([17, 1000], torch.float32, "cpu")
        ref = [p.clone() for p in ps]
        OP(ref, gs, [], 0.1, **kw)
        versions = [p._version for p in ps]
        step(ps, gs, 0.1, kw.get("weight_decay", 0.0), kw.get("maximize", False), kw.get("shrink", 0.0),
             kw.get("min"), kw.get("max"))
        assert all(torch.equal(p, r) for p, r in zip(ps, ref))
        assert all(p._version > v for p, v in zip(ps, versions))
    p = torch.randn(4)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"torchiter.sgd_step_: lr must be >= 0"):
        step([p], [torch.randn(4)], -1.0, 0.0, False, 0.0, None, None)
    assert torch.equal(p, before)
