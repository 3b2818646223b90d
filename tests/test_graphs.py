"""torchiter ops in graphs: TorchScript, a LibTorch C++ program, torch.compile, torch.export.

The C++ test configures and builds ``examples/cpp`` with CMake (about a minute
on two cores the first time, incremental afterwards) into
``examples/cpp/build``, or into ``$TORCHITER_CPP_BUILD_DIR`` when set, with the
extra CMake options in ``$TORCHITER_CMAKE_ARGS`` (e.g. ``-DTORCHITER_NO_CUDA=ON``).
"""

import copy
import fcntl
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch._dynamo.testing

import torchiter  # noqa: F401  (registers torch.ops.torchiter.*)
import torchiter.ops as tops
from _util import JIT_WARNINGS
from torchiter.scripting import ScriptableNSM, ScriptableOnlineNSM

ROOT = Path(__file__).resolve().parents[1]

# TorchScript is deprecated (see _util.JIT_WARNINGS): exactly those warnings are
# expected here.
pytestmark = [pytest.mark.filterwarnings(w) for w in JIT_WARNINGS]

F64 = torch.float64
IN, OUT, BATCH = 10, 5, 6


def _nsm(cls=ScriptableNSM, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(IN, OUT, lr=0.2, iterations=60, dtype=F64, **kwargs)


def _copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module)


def _input(batch: int = BATCH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, IN, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _sgd_case(dtype=torch.float32, momentum: float = 0.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (2, 3, 5)]
    params = [torch.randn(s, dtype=dtype, generator=g) for s in shapes]
    grads = [torch.randn(s, dtype=dtype, generator=g) for s in shapes]
    bufs = [torch.randn(s, dtype=dtype, generator=g) for s in shapes] if momentum else []
    return params, grads, bufs


def _clone_all(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    return [t.clone() for t in tensors]


def _qd_case(spatial: Tuple[int, ...] = (), dtype=F64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    C = 4
    R = torch.randn(C, C, dtype=dtype, generator=g)
    A = R @ R.T / C + torch.eye(C, dtype=dtype)
    b = torch.randn((3, C) + spatial, dtype=dtype, generator=g)
    return torch.zeros_like(b), A, b


# ----------------------------------------------------------------- TorchScript


def test_scripted_nsm_matches_eager_and_survives_save_load(tmp_path):
    model = _nsm()
    x = _input()
    expected = model(x)
    assert (expected >= 0).all() and (expected > 0).any()

    scripted = torch.jit.script(model)
    for _ in range(3):  # past the profiling runs of the graph executor
        assert torch.equal(scripted(x), expected)

    path = tmp_path / "nsm.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    for _ in range(3):
        assert torch.equal(loaded(x), expected)


def test_scripted_online_nsm_updates_buffers_like_eager(tmp_path):
    eager = _nsm(ScriptableOnlineNSM, eta=0.05)
    scripted = torch.jit.script(_copy(eager))
    W0 = eager.W.clone()
    for step in range(4):
        x = _input(seed=step)
        assert torch.equal(scripted(x), eager(x))
        # the sgd_step_ call on the buffers ran (TorchScript did not drop it)
        assert torch.equal(scripted.W, eager.W) and torch.equal(scripted.M, eager.M)
    assert not torch.equal(eager.W, W0)

    path = tmp_path / "online.pt"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    for step in range(4, 7):
        x = _input(seed=step)
        assert torch.equal(loaded(x), eager(x))
        assert torch.equal(loaded.W, eager.W) and torch.equal(loaded.M, eager.M)


class _RawStep(torch.nn.Module):
    """The raw op on a list built in the graph, read back as docs/graphs_section.md shows."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("W", torch.ones(3, 4))
        self.register_buffer("M", torch.ones(4))

    def forward(self, gW: torch.Tensor, gM: torch.Tensor) -> None:
        params = [self.W, self.M]
        torch.ops.torchiter.sgd_step_(params, [gW, gM], [], 0.5)
        if torch.jit.is_scripting():
            self.W, self.M = params[0], params[1]


def test_scripted_raw_sgd_step_on_buffers_with_read_back():
    eager, scripted = _RawStep(), torch.jit.script(_RawStep())
    for k in range(4):
        gW, gM = torch.full((3, 4), 0.1 * k), torch.full((4,), -0.2 * k)
        eager(gW, gM)
        scripted(gW, gM)
        assert torch.equal(scripted.W, eager.W) and torch.equal(scripted.M, eager.M)
    assert not torch.equal(eager.W, torch.ones(3, 4))


def _script_sgd(
    params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor], lr: float
) -> None:
    torch.ops.torchiter.sgd_step_(
        params, grads, bufs, lr, momentum=0.9, nesterov=True, weight_decay=0.01, min=-1.0, max=1.0
    )


def _script_sgd_tensor_lr(params: List[torch.Tensor], grads: List[torch.Tensor], lr: torch.Tensor) -> None:
    torch.ops.torchiter.sgd_step_(params, grads, [], lr, shrink=0.05)


def _script_qd(
    y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor, lrs: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 50, 1e-9, 2, lrs, 0.0, 0.0, None)


@pytest.mark.parametrize("wrapper", [False, True], ids=["torch.ops", "torchiter.ops"])
def test_scripted_sgd_step_matches_eager(wrapper):
    if wrapper:

        def fn(
            params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor], lr: float
        ) -> None:
            tops.sgd_step_(
                params, grads, bufs, lr, momentum=0.9, nesterov=True, weight_decay=0.01, min=-1.0, max=1.0
            )

    else:
        fn = _script_sgd
    scripted = torch.jit.script(fn)
    params, grads, bufs = _sgd_case(momentum=0.9)
    p_ref, b_ref = _clone_all(params), _clone_all(bufs)
    for _ in range(3):
        fn(p_ref, grads, b_ref, 0.1)
        scripted(params, grads, bufs, 0.1)
    for got, want in zip(params + bufs, p_ref + b_ref):
        assert torch.equal(got, want)


@pytest.mark.parametrize("wrapper", [False, True], ids=["torch.ops", "torchiter.ops"])
def test_scripted_sgd_step_tensor_lr_matches_eager(wrapper):
    if wrapper:

        def fn(params: List[torch.Tensor], grads: List[torch.Tensor], lr: torch.Tensor) -> None:
            tops.sgd_step_(params, grads, [], lr, shrink=0.05)

    else:
        fn = _script_sgd_tensor_lr
    scripted = torch.jit.script(fn)
    params, grads, _ = _sgd_case(torch.float64)
    p_ref = _clone_all(params)
    lr = torch.tensor(0.25, dtype=torch.float64)
    for _ in range(3):
        fn(p_ref, grads, lr)
        scripted(params, grads, lr)
    for got, want in zip(params, p_ref):
        assert torch.equal(got, want)
    # the tensor overload is the float one with lr.item()
    p_float = _clone_all(p_ref)
    q_float = _clone_all(p_ref)
    tops.sgd_step_(p_float, grads, [], 0.25, shrink=0.05)
    scripted(q_float, grads, lr)
    for got, want in zip(q_float, p_float):
        assert torch.equal(got, want)


@pytest.mark.parametrize("wrapper", [False, True], ids=["torch.ops", "torchiter.ops"])
@pytest.mark.parametrize("with_lrs", [False, True])
def test_scripted_quadratic_descent_matches_eager(wrapper, with_lrs):
    if wrapper:

        def fn(
            y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor, lrs: Optional[torch.Tensor]
        ) -> Tuple[torch.Tensor, torch.Tensor]:
            return tops.quadratic_descent(y0, A, b, 0.3, 50, tol=1e-9, check_every=2, lrs=lrs, min=0.0)

    else:
        fn = _script_qd
    scripted = torch.jit.script(fn)
    y0, A, b = _qd_case(spatial=(2, 3))
    lrs = torch.linspace(0.3, 0.1, 60, dtype=torch.float32) if with_lrs else None
    y_ref, n_ref = fn(y0, A, b, lrs)
    for _ in range(3):
        y, n = scripted(y0, A, b, lrs)
        assert torch.equal(y, y_ref) and torch.equal(n, n_ref)
    assert n.dtype == torch.int64 and n.dim() == 0 and 0 < int(n) <= 50
    assert torch.equal(y0, torch.zeros_like(y0))


def test_scripted_wrappers_directly():
    """The ``torchiter.ops`` wrappers themselves are scriptable (keyword defaults and all)."""
    sgd = torch.jit.script(tops.sgd_step_)
    qd = torch.jit.script(tops.quadratic_descent)
    params, grads, _ = _sgd_case()
    p_ref = _clone_all(params)
    tops.sgd_step_(p_ref, grads, [], 0.1, min=0.0)
    sgd(params, grads, [], 0.1, min=0.0)
    assert all(torch.equal(a, b) for a, b in zip(params, p_ref))
    y0, A, b = _qd_case()
    y_ref, n_ref = tops.quadratic_descent(y0, A, b, 0.3, 40)
    y, n = qd(y0, A, b, 0.3, 40)
    assert torch.equal(y, y_ref) and torch.equal(n, n_ref)


def _inlined_graph(scripted) -> str:
    graph = scripted.graph.copy()
    torch._C._jit_pass_inline(graph)
    return str(graph)


def test_scripted_op_takes_tensor_lr_overload_without_conversion():
    graph = _inlined_graph(torch.jit.script(_script_sgd_tensor_lr))
    assert "torchiter::sgd_step_" in graph and "FloatImplicit" not in graph


def test_scripted_wrapper_takes_tensor_lr_overload_without_conversion():
    def fn(params: List[torch.Tensor], grads: List[torch.Tensor], lr: torch.Tensor) -> None:
        tops.sgd_step_(params, grads, [], lr)

    graph = _inlined_graph(torch.jit.script(fn))
    assert "torchiter::sgd_step_" in graph and "FloatImplicit" not in graph


# ------------------------------------------------------------------------- C++


def _cxx_compiler() -> Optional[str]:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@pytest.fixture(scope="session")
def cpp_runner() -> Path:
    """Configures and builds examples/cpp once per session; returns the program."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: cannot build the LibTorch example")
    if _cxx_compiler() is None:
        pytest.skip("no C++ compiler (c++, g++, clang++ or $CXX) found: cannot build the LibTorch example")
    build = Path(os.environ.get("TORCHITER_CPP_BUILD_DIR", ROOT / "examples" / "cpp" / "build"))
    build.mkdir(parents=True, exist_ok=True)
    # Several test runs may share the build directory.
    with open(build / ".test_lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for cmd in (
            [
                "cmake",
                "-S",
                str(ROOT / "examples" / "cpp"),
                "-B",
                str(build),
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DTORCHITER_PYTHON={sys.executable}",
                *shlex.split(os.environ.get("TORCHITER_CMAKE_ARGS", "")),
            ],
            ["cmake", "--build", str(build), "--parallel", "2"],
        ):
            # Generous: the op library takes a few minutes on two busy cores.
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    program = build / "torchiter_run"
    assert program.is_file()
    return program


def _run_cpp(program: Path, model: Path, inputs: Path, repeat: int = 1) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    proc = subprocess.run(
        [str(program), str(model), str(inputs), str(repeat)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return _parse_program_output(proc.stdout)


def _parse_program_output(stdout: str) -> Tuple[List[str], Dict[str, torch.Tensor]]:
    """The example programs' output: comment lines and named tensors."""
    comments, tensors = [], {}
    lines = iter(stdout.splitlines())
    for line in lines:
        if line.startswith("#"):
            comments.append(line)
            continue
        kind, name, dtype, *sizes = line.split()
        assert kind == "tensor", line
        shape = [int(s) for s in sizes]
        numel = 1
        for s in shape:
            numel *= s
        floating = dtype in ("Float", "Double", "Half", "BFloat16")
        values = [float(next(lines)) if floating else int(next(lines)) for _ in range(numel)]
        tensors[name] = torch.tensor(values, dtype=F64 if floating else torch.int64).reshape(shape)
    return comments, tensors


def _assert_matches(got: torch.Tensor, want: torch.Tensor) -> None:
    # Same sources, flags and LibTorch: the results agree to the last bit in
    # practice; the contract asked of the C++ build is 1e-12 relative.
    torch.testing.assert_close(got, want.detach().to(got.dtype), rtol=1e-12, atol=1e-300)


def test_cpp_program_registers_ops_and_runs_nsm(cpp_runner, tmp_path):
    model = _nsm()
    x = _input()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "nsm.pt"))
    torch.save(x, tmp_path / "x.pt")
    comments, tensors = _run_cpp(cpp_runner, tmp_path / "nsm.pt", tmp_path / "x.pt")

    registered = "\n".join(c for c in comments if c.startswith("# registered (CPU kernel): "))
    for name in ("torchiter::sgd_step_(", "torchiter::sgd_step_.tensor_lr(", "torchiter::quadratic_descent("):
        assert name in registered
    assert any("direct call: quadratic_descent(A=2, b=1) -> y=0.4999999" in c for c in comments)

    _assert_matches(tensors["output"], model(x))
    _assert_matches(tensors["buffer.W"], model.W)
    _assert_matches(tensors["buffer.M"], model.M)


def test_cpp_program_runs_online_nsm_with_sgd_step(cpp_runner, tmp_path):
    eager = _nsm(ScriptableOnlineNSM, eta=0.05)
    torch.jit.save(torch.jit.script(_copy(eager)), str(tmp_path / "online.pt"))
    x = _input()
    torch.save(x, tmp_path / "x.pt")
    repeat = 4  # past the profiling runs of the graph executor
    _, tensors = _run_cpp(cpp_runner, tmp_path / "online.pt", tmp_path / "x.pt", repeat)
    for _ in range(repeat):
        y = eager(x)
    _assert_matches(tensors["output"], y)
    _assert_matches(tensors["buffer.W"], eager.W)
    _assert_matches(tensors["buffer.M"], eager.M)


def test_cpp_program_takes_tuple_inputs_and_tuple_outputs(cpp_runner, tmp_path):
    class QD(torch.nn.Module):
        def forward(self, y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
            return torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 50, 1e-9, 1, None, 0.0, None, None)

    y0, A, b = _qd_case(spatial=(3,), dtype=torch.float32)
    torch.jit.save(torch.jit.script(QD()), str(tmp_path / "qd.pt"))
    torch.save((y0, A, b), tmp_path / "args.pt")
    _, tensors = _run_cpp(cpp_runner, tmp_path / "qd.pt", tmp_path / "args.pt")
    y, n = QD()(y0, A, b)
    assert torch.equal(tensors["output.0"].float(), y)  # float32 printed exactly
    assert torch.equal(tensors["output.1"], n)


def test_cpp_program_prints_what_save_model_py_prints(cpp_runner, tmp_path):
    """The documented walk-through: examples/cpp/save_model.py, then the program."""
    script = ROOT / "examples" / "cpp" / "save_model.py"
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run = subprocess.run(
        [str(cpp_runner), str(tmp_path / "model.pt"), str(tmp_path / "input.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    output_block = [line for line in run.stdout.splitlines() if not line.startswith("#")]
    expected = proc.stdout.splitlines()
    assert output_block[: len(expected)] == expected  # same digits, line for line


# --------------------------------------------------------------- torch.compile


def _backend() -> str:
    # Inductor compiles C++ for CPU graphs; without a compiler use AOT eager.
    return "inductor" if _cxx_compiler() is not None else "aot_eager"


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
def test_compiled_sgd_step_inplace_matches_eager(fresh_dynamo, tensor_lr):
    def step(params: List[torch.Tensor], grads: List[torch.Tensor], bufs: List[torch.Tensor], lr) -> None:
        tops.sgd_step_(params, grads, bufs, lr, momentum=0.9, dampening=0.1, weight_decay=0.01, max=0.5)

    compiled = torch.compile(step, fullgraph=True, backend=_backend())
    params, grads, bufs = _sgd_case(momentum=0.9)
    p_ref, b_ref = _clone_all(params), _clone_all(bufs)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    for _ in range(3):
        step(p_ref, grads, b_ref, lr)
        compiled(params, grads, bufs, lr)
        for got, want in zip(params + bufs, p_ref + b_ref):
            assert torch.equal(got, want)


def test_compiled_quadratic_descent_returns_both_outputs(fresh_dynamo):
    def solve(y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor, lrs: torch.Tensor):
        y, n = torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 50, 1e-9, 1, lrs, 0.0, 0.0, None)
        return y, n

    compiled = torch.compile(solve, fullgraph=True, backend=_backend())
    y0, A, b = _qd_case(spatial=(2,))
    lrs = torch.full((50,), 0.3, dtype=F64)
    y_ref, n_ref = solve(y0, A, b, lrs)
    y, n = compiled(y0, A, b, lrs)
    assert torch.equal(y, y_ref) and torch.equal(n, n_ref)
    assert n.dtype == torch.int64 and n.dim() == 0


def test_compiled_online_nsm_matches_eager(fresh_dynamo):
    eager = _nsm(ScriptableOnlineNSM, eta=0.05)
    model = _copy(eager)
    compiled = torch.compile(model, fullgraph=True, backend=_backend())
    for step in range(3):
        x = _input(seed=step)
        # Inductor may fuse the Hebbian arithmetic differently: compare closely.
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.W, eager.W, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(model.M, eager.M, rtol=1e-10, atol=1e-12)


def _opcheck(op, args, kwargs=None) -> None:
    result = torch.library.opcheck(op, args, kwargs or {})
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_sgd_step():
    params, grads, bufs = _sgd_case(momentum=0.9)
    _opcheck(torch.ops.torchiter.sgd_step_.default, (params, grads, [], 0.1))
    _opcheck(
        torch.ops.torchiter.sgd_step_.default,
        (params, grads, bufs, 0.1),
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
    )
    p64, g64, _ = _sgd_case(torch.float64)
    _opcheck(
        torch.ops.torchiter.sgd_step_.tensor_lr,
        (p64, g64, [], torch.tensor(0.1, dtype=F64)),
        {"shrink": 0.01, "min": -0.5, "max": 0.5},
    )


def test_opcheck_quadratic_descent():
    y0, A, b = _qd_case(spatial=(2, 2))
    _opcheck(torch.ops.torchiter.quadratic_descent.default, (y0, A, b, 0.3, 20), {"tol": 1e-6, "min": 0.0})
    y0, A, b = _qd_case(dtype=torch.float32)
    _opcheck(torch.ops.torchiter.quadratic_descent.default, (y0, A, b, 0.3, 20), {"check_every": 3, "shrink": 0.1})


def test_opcheck_quadratic_descent_with_lrs():
    y0, A, b = _qd_case(dtype=torch.float32)
    _opcheck(torch.ops.torchiter.quadratic_descent.default, (y0, A, b, 0.3, 20), {"lrs": torch.full((25,), 0.2)})


# ---------------------------------------------------------------- torch.export


def test_export_nsm_matches_eager():
    model = _nsm()
    x = _input()
    ep = torch.export.export(model, (x,))
    assert any(
        n.op == "call_function" and n.target is torch.ops.torchiter.quadratic_descent.default
        for n in ep.graph.nodes
    )
    assert torch.equal(ep.module()(x), model(x))
    # an exported program is specialised to the example's shapes; other inputs of that shape run
    x2 = _input(seed=7)
    assert torch.equal(ep.module()(x2), model(x2))


@pytest.mark.filterwarnings(  # from torch.export's own deep copy of the graph in torch 2.13
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)
def test_export_online_nsm_mutates_buffers_like_eager():
    eager = _nsm(ScriptableOnlineNSM, eta=0.05)
    x = _input()
    exported = torch.export.export(_copy(eager), (x,)).module()
    # functionalised: auto_functionalized plus buffer-mutation outputs
    decomposed_ep = torch.export.export(_copy(eager), (x,)).run_decompositions()
    assert set(decomposed_ep.graph_signature.buffers_to_mutate.values()) == {"W", "M"}
    decomposed = decomposed_ep.module()
    for _ in range(3):
        y = eager(x)
        assert torch.equal(exported(x), y)
        assert torch.equal(decomposed(x), y)
    for m in (exported, decomposed):
        assert torch.equal(m.W, eager.W) and torch.equal(m.M, eager.M)


def test_export_nsm_with_dynamic_batch():
    model = _nsm()
    ep = torch.export.export(model, (_input(),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    for batch in (1, 3, 11):
        x = _input(batch, seed=batch)
        assert torch.equal(ep.module()(x), model(x))


def test_compiled_quadratic_descent_with_dynamic_shapes(fresh_dynamo):
    def solve(y0: torch.Tensor, A: torch.Tensor, b: torch.Tensor):
        return torch.ops.torchiter.quadratic_descent(y0, A, b, 0.3, 30, 0.0, 1, None, 0.0, None, None)

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(solve, fullgraph=True, dynamic=True, backend=counter)
    for spatial in ((2,), (5,), (7,)):
        y0, A, b = _qd_case(spatial=spatial)
        y, n = compiled(y0, A, b)
        y_ref, n_ref = solve(y0, A, b)
        assert torch.equal(y, y_ref) and torch.equal(n, n_ref)
    assert counter.frame_count == 1  # one graph for every shape: no specialisation
