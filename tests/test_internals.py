"""Pins the private PyTorch behaviour that torchiter._internals relies on."""

import shutil
import subprocess
import sys

import pytest
import torch

import torchiter
from torchiter import _internals


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is needed")
def test_ddp_records_the_module_running_its_forward():
    from torch.nn.parallel import DistributedDataParallel

    assert _internals.active_ddp_module() is None
    # The attribute DDP sets around its forward (read here, set by DDP's
    # _inside_ddp_forward context manager).
    assert "_active_ddp_module" in vars(DistributedDataParallel)
    sentinel = object()
    ctx = DistributedDataParallel._inside_ddp_forward(sentinel)  # type: ignore[arg-type]
    with ctx:
        assert _internals.active_ddp_module() is sentinel
    assert _internals.active_ddp_module() is None


# --------------------------------------------------------------------------- optimizers


def _sgd():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    return p, torch.optim.SGD([p], lr=0.1)


def test_step_hooks_are_seen_on_the_optimizer_and_globally():
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _, opt = _sgd()
    assert not _internals.optimizer_step_hooks_present(opt)
    h = opt.register_step_pre_hook(lambda *a: None)
    assert _internals.optimizer_step_hooks_present(opt)
    h.remove()
    h = opt.register_step_post_hook(lambda *a: None)
    assert _internals.optimizer_step_hooks_present(opt)
    h.remove()
    h = register_optimizer_step_post_hook(lambda *a: None)
    try:
        assert _internals.optimizer_step_hooks_present(opt)
    finally:
        h.remove()
    assert not _internals.optimizer_step_hooks_present(opt)


def test_scheduler_wrapper_is_not_a_replaced_step_but_a_patch_is():
    _, opt = _sgd()
    assert not _internals.optimizer_step_replaced(opt) and _internals.optimizer_step_is_plain(opt)
    torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    # What is relied on: the scheduler's wrapper (if any) keeps the class'
    # step in __wrapped__.
    assert not _internals.optimizer_step_replaced(opt)
    opt.step = lambda closure=None: None
    assert _internals.optimizer_step_replaced(opt) and not _internals.optimizer_step_is_plain(opt)


@pytest.mark.parametrize("marked", [False, True])
def test_marking_the_optimizer_stepped_silences_the_scheduler(marked):
    import warnings

    _, opt = _sgd()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if marked:
            _internals.mark_optimizer_stepped(opt)
        sched.step()
    order = [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    assert bool(order) != marked


def test_unhooked_step_skips_the_hooks_and_steps():
    p, opt = _sgd()
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    _internals.unhooked_step(torch.optim.SGD)(opt)
    assert calls == [] and torch.equal(p.detach(), torch.full((3,), -0.1))
    opt.step()
    assert calls == [1]


def test_precomputable_schedulers():
    _, opt = _sgd()
    assert _internals.scheduler_is_precomputable(torch.optim.lr_scheduler.StepLR(opt, step_size=1))
    assert not _internals.scheduler_is_precomputable(torch.optim.lr_scheduler.ReduceLROnPlateau(opt))
    assert not _internals.scheduler_is_precomputable(object())


# --------------------------------------------------------------------------- autograd, modules, tensors


def test_run_backward_equals_backward_and_accumulates():
    x = torch.randn(4, requires_grad=True)
    y = torch.randn(4, requires_grad=True)
    (x * x * 3).sum().backward()
    expected = x.grad.clone()
    _internals.run_backward((y * y * 3).sum() * 0 + (x * x * 3).sum(), torch.ones(()))
    torch.testing.assert_close(x.grad, 2 * expected)
    assert y.grad is not None and torch.equal(y.grad, torch.zeros(4))


def test_forward_hooks_and_patched_forward_are_seen():
    from torch.nn.modules.module import register_module_forward_hook

    relu = torch.nn.ReLU()
    assert not _internals.module_has_forward_hooks(relu)
    h = relu.register_forward_hook(lambda *a: None)
    assert _internals.module_has_forward_hooks(relu)
    h.remove()
    h = relu.register_forward_pre_hook(lambda *a: None)
    assert _internals.module_has_forward_hooks(relu)
    h.remove()
    h = register_module_forward_hook(lambda *a: None)
    try:
        assert _internals.module_has_forward_hooks(relu)
    finally:
        h.remove()
    relu.forward = lambda x: x
    assert _internals.module_has_forward_hooks(relu)


def test_module_attr_reads_plain_attributes_and_submodules_like_getattr():
    m = torch.nn.Module()
    m.relu = torch.nn.ReLU()
    m.fn = torch.relu
    m.nothing = None
    m.register_buffer("buf", torch.ones(2))
    m.w = torch.nn.Parameter(torch.zeros(2))
    for name in ("relu", "fn", "nothing", "buf", "w", "training"):
        assert _internals.module_attr(m, name) is getattr(m, name)
    m.relu = torch.nn.Sigmoid()  # replaced through nn.Module.__setattr__
    assert isinstance(_internals.module_attr(m, "relu"), torch.nn.Sigmoid)
    with pytest.raises(AttributeError):
        _internals.module_attr(m, "missing")


def test_set_grad_enabled_switches_grad_mode():
    assert torch.is_grad_enabled()
    _internals.set_grad_enabled(False)
    try:
        assert not torch.is_grad_enabled()
        assert (torch.ones(1, requires_grad=True) * 2).grad_fn is None
    finally:
        _internals.set_grad_enabled(True)
    assert torch.is_grad_enabled()


def test_views_hooks_and_kernels():
    base = torch.zeros(4, requires_grad=True)
    assert not _internals.is_view(base) and _internals.is_view(base[1:])
    assert _internals.tensor_backward_hooks(base) == {}
    hook = lambda g: g  # noqa: E731
    base.register_hook(hook)
    assert hook in _internals.tensor_backward_hooks(base).values()
    assert _internals.has_kernel_for("torchiter::sgd_step_", "CPU")
    assert not _internals.has_kernel_for("torchiter::sgd_step_", "XLA")


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
def test_inductor_backend_compiles_and_errors_are_named():
    calls = []
    inductor = _internals.inductor_backend(cpu_threads=1)  # the option compiled iterations use

    def counting(gm, example_inputs):
        calls.append(len(example_inputs))
        return inductor(gm, example_inputs)

    f = torch.compile(lambda x: torch.relu(x) * 2, backend=counting, fullgraph=True)
    x = torch.randn(5)
    torch.testing.assert_close(f(x), torch.relu(x) * 2)
    assert calls == [1]

    g = torch.compile(lambda x: x * 2 if x.sum().item() > 0 else x, backend=counting, fullgraph=True)
    with pytest.raises(Exception) as info:
        g(x)
    reason = _internals.compile_error_reason(info.value, KeyError)
    assert reason is not None and reason.startswith("torch.compile cannot trace")
    assert _internals.compile_error_reason(ValueError("x"), KeyError) is None

    class Own(Exception):
        pass

    def refusing(gm, example_inputs):
        raise Own("refused here")

    h = torch.compile(lambda x: x + 1, backend=refusing, fullgraph=True)
    with pytest.raises(Exception) as info:
        h(x)
    assert _internals.compile_error_reason(info.value, Own) == "refused here"


def test_values_readable_only_for_real_tensors_outside_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = torch.zeros(3)
    assert _internals.values_readable(t)
    assert not _internals.values_readable(torch.zeros(3, device="meta"))
    with FakeTensorMode():
        fake = torch.zeros(3)
    assert not _internals.values_readable(fake)
    seen = []

    def f(x):
        seen.append(_internals.values_readable(x))
        return x + 1

    torch.compile(f, backend="eager", fullgraph=True)(t)
    assert seen == [False]
    seen.clear()

    class Plus(torch.nn.Module):
        def forward(self, x):
            seen.append(_internals.values_readable(x))
            return x + 1

    torch.export.export(Plus(), (t,))
    assert seen and not any(seen)


@pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("readelf") is None,
                    reason="needs Linux and readelf")
def test_extension_uses_the_shared_libstdcxx():
    # A toolchain that links libstdc++ statically gives the extension a second
    # copy beside torch's, and the two disagree about locale facets: numbers in
    # error messages came out truncated ("grads[") or crashed the process.
    # setup.py links the shared library then; both symptoms are checked here.
    dynamic = subprocess.run(["readelf", "-d", torchiter._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libstdc++.so" in dynamic
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[5\] but params\[0\] has shape \[4\]"):
        torchiter.ops.sgd_step_([torch.randn(4)], [torch.randn(5)], [], 0.1)
