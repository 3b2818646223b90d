"""Private PyTorch internals torchiter relies on, each behind one named helper.

Every use of a private torch API lives here, with a test in
``tests/test_internals.py`` pinning the behaviour relied on, so that a torch
upgrade that changes one of them is a change to this file alone.
"""

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake as _is_fake
from torch.nn.modules import module as _module_module
from torch.optim import optimizer as _optimizer_module


def active_ddp_module() -> Optional[torch.nn.Module]:
    """The ``DistributedDataParallel`` module whose forward is running, or None.

    DDP records itself in a class attribute for the duration of its forward
    (for TorchDynamo); torchiter's models read it to tell a loss computed
    inside the wrapped forward from one computed outside it.
    """
    ddp = _DDP_CLASS[0]
    if ddp is None:
        # Resolved once: the import statement and the availability test cost
        # microseconds, read in every model forward.
        if torch.distributed.is_available():
            from torch.nn.parallel import DistributedDataParallel as ddp
        else:
            ddp = False
        _DDP_CLASS[0] = ddp
    return getattr(ddp, "_active_ddp_module", None) if ddp is not False else None


_DDP_CLASS: list = [None]


# --------------------------------------------------------------------------- optimizers


def optimizer_step_hooks_present(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step pre/post hooks (the optimizer's own or global ones) are registered.

    A step that bypasses ``optimizer.step()`` must not run where such hooks
    expect to be called. Reads ``Optimizer._optimizer_step_pre_hooks`` /
    ``_optimizer_step_post_hooks`` and the module-level
    ``_global_optimizer_pre_hooks`` / ``_global_optimizer_post_hooks``.
    """
    return bool(
        optimizer._optimizer_step_pre_hooks
        or optimizer._optimizer_step_post_hooks
        or getattr(_optimizer_module, "_global_optimizer_pre_hooks", None)
        or getattr(_optimizer_module, "_global_optimizer_post_hooks", None)
    )


def optimizer_step_replaced(optimizer: torch.optim.Optimizer) -> bool:
    """Whether something other than an LR scheduler patched ``step`` onto the instance.

    An LR scheduler wraps ``step`` on the instance with a call-counting
    wrapper whose ``__wrapped__`` is the class' step; that wrapper still runs
    the class' step, anything else patched onto the instance may not.
    """
    step = optimizer.__dict__.get("step")
    return step is not None and getattr(step, "__wrapped__", None) is not type(optimizer).step


def optimizer_step_is_plain(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` would run its class' step and nothing else (no step hooks)."""
    return not optimizer_step_replaced(optimizer) and not optimizer_step_hooks_present(optimizer)


def mark_optimizer_stepped(optimizer: torch.optim.Optimizer) -> None:
    """Tells an LR scheduler that ``optimizer.step()`` ran (it warns otherwise).

    Sets ``optimizer._opt_called``, the flag the scheduler's wrapper around
    ``step`` sets and ``LRScheduler.step`` reads.
    """
    optimizer._opt_called = True  # type: ignore[attr-defined]


def unhooked_step(cls: type) -> Callable:
    """``cls.step`` without the hook-running wrapper ``Optimizer`` patches onto the class.

    ``Optimizer.__init_subclass__``/``profile_hook_step`` marks its wrapper
    with ``hooked = True`` and keeps the original in ``__wrapped__``.
    """
    step = cls.step
    if getattr(step, "hooked", False):
        step = step.__wrapped__  # type: ignore[attr-defined]
    return step


def scheduler_is_precomputable(scheduler: Any) -> bool:
    """Whether ``scheduler.step()`` depends on the step count alone.

    Every ``torch.optim.lr_scheduler.LRScheduler`` except
    ``ReduceLROnPlateau`` (which needs a metric); a user's object of another
    type is not assumed to be.
    """
    from torch.optim import lr_scheduler

    return isinstance(scheduler, lr_scheduler.LRScheduler) and not isinstance(
        scheduler, lr_scheduler.ReduceLROnPlateau
    )


# --------------------------------------------------------------------------- autograd

_ENGINE = torch.autograd.Variable._execution_engine


def run_backward(loss: torch.Tensor, seed: torch.Tensor) -> None:
    """``loss.backward(seed)`` straight into the autograd engine.

    ``Tensor.backward`` spends microseconds in Python before reaching
    ``Variable._execution_engine.run_backward``; this calls the engine with
    the arguments ``torch.autograd.backward`` passes for a plain call
    (no retain_graph, no create_graph, no inputs, accumulate into ``.grad``).
    """
    _ENGINE.run_backward((loss,), (seed,), False, False, (), allow_unreachable=True, accumulate_grad=True)


# --------------------------------------------------------------------------- nn.Module inspection

_MISSING = object()


def module_attr(module: torch.nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a plain attribute or a registered
    submodule (not a parameter or buffer), without ``nn.Module.__getattr__``'s
    Python frame (half a microsecond, several times per model forward).

    Reads ``Module._modules``; anything else falls back to ``getattr``.
    """
    attrs = module.__dict__
    value = attrs.get(name, _MISSING)
    if value is _MISSING:
        value = attrs["_modules"].get(name, _MISSING)
        if value is _MISSING:
            return getattr(module, name)
    return value



def module_has_forward_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` would run more than its class' ``forward``.

    True when the instance or the process has forward (pre-)hooks, or a
    ``forward`` is patched onto the instance. Reads ``Module._forward_hooks``,
    ``_forward_pre_hooks`` and ``torch.nn.modules.module._global_forward_hooks``
    / ``_global_forward_pre_hooks``.
    """
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or "forward" in module.__dict__
        or _module_module._global_forward_hooks
        or _module_module._global_forward_pre_hooks
    )


# --------------------------------------------------------------------------- torch.compile


def inductor_backend(cuda_graphs: bool = False, cpu_threads: Optional[int] = None) -> Callable:
    """The ``"inductor"`` torch.compile backend as a callable ``(gm, example_inputs)``.

    Wrapped by torchiter's compiled iterations to count and bound compilations.
    With ``cuda_graphs`` the compiled graph is captured in a CUDA graph and
    replayed (what ``mode="reduce-overhead"`` does), through inductor's
    ``triton.cudagraphs`` option; ``cpu_threads`` caps the threads of the
    generated CPU code (inductor's ``cpp.threads``).
    """
    from torch._dynamo.backends.registry import lookup_backend

    inductor = lookup_backend("inductor")
    patches: Dict[str, Any] = {}
    if cuda_graphs:
        patches["triton.cudagraphs"] = True
    if cpu_threads is not None:
        patches["cpp.threads"] = cpu_threads
    if not patches:
        return inductor

    def patched(gm: Any, example_inputs: Any) -> Callable:
        return inductor(gm, example_inputs, config_patches=patches)

    return patched


def compile_error_reason(error: BaseException, own: type) -> Optional[str]:
    """A one-line reason for a torch.compile failure, or None if it is not one.

    ``own`` is the caller's exception type raised from inside a backend,
    which dynamo wraps in ``BackendCompilerFailed`` (``inner_exception``).
    """
    from torch._dynamo import exc

    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, own):
        return str(inner)
    cause = error.__cause__
    if isinstance(cause, own):
        return str(cause)
    if not isinstance(error, exc.TorchDynamoException):
        return None
    text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    # Dynamo's messages carry hints and a user stack; the first lines name the cause.
    detail = " ".join(line.strip() for line in text[1:4] if line.strip() and not line.startswith("  File"))
    return f"torch.compile cannot trace the iteration ({type(error).__name__}: {first} {detail})".strip()


# --------------------------------------------------------------------------- tensors and the dispatcher


def is_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of another tensor's memory (``Tensor._is_view``)."""
    return t._is_view()


def tensor_backward_hooks(t: torch.Tensor) -> Dict[Any, Callable]:
    """The hooks registered with ``t.register_hook`` (``Tensor._backward_hooks``), possibly empty."""
    return t._backward_hooks or {}


def values_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host now.

    Not while ``torch.compile`` / ``torch.export`` / ``torch.jit.trace`` trace
    the code (a read would be a data-dependent guard or a graph break), and
    not for tensors without data: meta tensors and the fake tensors of a
    ``FakeTensorMode`` (shape inference, deferred initialisation).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or t.is_meta:
        return False
    # A plain tensor (the eager case, once per forward) needs no fake test.
    return type(t) is torch.Tensor or not _is_fake(t)


# Sets grad mode without a context manager object (a tenth of the cost of
# ``torch.no_grad()``), for a model forward that restores it in ``finally``.
set_grad_enabled = torch._C._set_grad_enabled


def has_kernel_for(op: str, dispatch_key: str) -> bool:
    """Whether operator ``op`` (``"ns::name"``) has a kernel registered for ``dispatch_key``.

    Reads ``torch._C._dispatch_has_kernel_for_dispatch_key``: an op library
    built without CUDA has no ``"CUDA"`` kernel.
    """
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
