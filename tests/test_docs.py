"""The ```python blocks of README.md and docs/*.md run as written and print what the text says.

Conventions of the Markdown files (kept deliberately small):

- A ```python block is runnable. The runnable blocks of one file run in order in
  one namespace, each with the names the blocks before it defined; the text says
  where a block relies on an earlier one. Each file runs in its own empty
  namespace, in a temporary working directory (blocks may write files).
- ```python signature marks a listing that is not code (a signature, a schema):
  it is not run, and test_doc_names.py compares it with the code.
- ```python gpu (needs CUDA) and ```python aoti (compiles an AOTInductor
  package, about a minute) run alone, each as its own test in a fresh namespace,
  so they must not rely on earlier blocks nor later blocks on them. Without a
  GPU the gpu blocks are skipped; the aoti ones carry the ``aoti`` marker.
- A ```text block that follows a runnable block with only blank lines between
  them is that block's output: what it prints, and every warning of torchiter's
  own categories as a line ``CategoryName: message``, in the order they came.
  Whitespace (line breaks included) is compared as single spaces, ``...``
  matches any text, integers must be equal and other numbers agree to 1 % or
  1e-6 (the last printed digit and float rounding vary with the CPU kernel
  variant). A runnable block without a ```text block must print nothing.
- Any other warning fails the test, except torch's deprecation warnings for
  TorchScript (``torch.jit.script`` etc.; the docs show TorchScript on purpose).
- For a block that calls ``torch.distributed.init_process_group()`` the
  environment holds what ``torchrun`` sets for a one-process world, so the
  block runs in a one-process gloo group (its rendezvous through a file store,
  with a two-minute timeout).
"""

import contextlib
import datetime
import io
import os
import socket
import warnings

import pytest
import torch

import torchiter
from _docs import ATTRIBUTES, DOC_FILES, ROOT, Block, numbers_agree, output_mismatch, parse, parse_text
from _util import JIT_WARNINGS

_STANDALONE = ("gpu", "aoti")
_DOCS = [parse(p) for p in DOC_FILES]

# Warnings torch itself raises on the way through the documented calls.
TORCH_WARNINGS = [
    *JIT_WARNINGS,
    # torch.export's deep copy of the graph, torch 2.13: about torch's own pytree API.
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
    # torch.export on a model: its state is a plain attribute (model.y, model.codes) that the
    # forward replaces; the exported program returns the state and leaves the attribute alone,
    # as the README says.
    r"ignore:The tensor attribute self\.(y|codes) was assigned during export:UserWarning",
]

_TORCHITER_WARNINGS = tuple(
    c for c in vars(torchiter).values() if isinstance(c, type) and issubclass(c, Warning)
)


def _id(doc) -> str:
    return str(doc.path.relative_to(ROOT))


def _standalone(block: Block) -> bool:
    return any(a in block.attributes for a in _STANDALONE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def doc_env(tmp_path, monkeypatch):
    """A temporary working directory and torchrun's environment for a one-process world.

    The rendezvous goes through a file store rather than torchrun's TCP store: a
    sandbox's loopback networking is not something the docs test should depend on,
    and a rendezvous that never completes would otherwise wait out gloo's
    30-minute default instead of failing.
    """
    monkeypatch.chdir(tmp_path)
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(k, v)
    if torch.distributed.is_available():
        init = torch.distributed.init_process_group

        def one_process_init(*args, **kwargs):
            if not args[1:] and "init_method" not in kwargs and "store" not in kwargs:
                kwargs.update(init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
            kwargs.setdefault("timeout", datetime.timedelta(seconds=120))
            return init(*args, **kwargs)

        monkeypatch.setattr(torch.distributed, "init_process_group", one_process_init)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_block(block: Block, namespace: dict) -> None:
    """Runs one block in ``namespace`` and checks its output against the quoted one."""
    out = io.StringIO()

    def show(message, category, filename, lineno, file=None, line=None):
        out.write(f"{category.__name__}: {message}\n")

    # Padding keeps the line numbers of tracebacks those of the Markdown file.
    code = compile("\n" * block.line + block.source, str(block.path), "exec")
    with warnings.catch_warnings(), contextlib.redirect_stdout(out):
        warnings.simplefilter("error")
        for w in TORCH_WARNINGS:
            warnings.filterwarnings(*_split_filter(w))
        for category in _TORCHITER_WARNINGS:
            warnings.filterwarnings("always", category=category)
        warnings.showwarning = show
        exec(code, namespace)
    actual = out.getvalue()
    if block.output is None:
        assert actual == "", f"{block.where}: the block printed {actual!r}, but the text quotes no output"
        return
    why = output_mismatch(block.output, actual)
    assert why is None, (
        f"{block.where}: the output differs from the text at line {block.output_line} ({why}).\n"
        f"--- the text:\n{block.output}--- printed:\n{actual}"
    )


def _split_filter(spec: str):
    action, message, category = spec.split(":")
    return action, message, {"DeprecationWarning": DeprecationWarning, "FutureWarning": FutureWarning,
                             "UserWarning": UserWarning}[category]


@pytest.mark.parametrize("doc", _DOCS, ids=_id)
def test_doc_runs(doc, doc_env):
    blocks = [b for b in doc.runnable if not _standalone(b)]
    if not blocks:
        pytest.skip("no runnable blocks")
    namespace = {"__name__": "__main__"}
    for block in blocks:
        run_block(block, namespace)


_STANDALONE_BLOCKS = [
    pytest.param(
        b,
        id=f"{b.where}[{','.join(b.attributes)}]",
        marks=[
            *([pytest.mark.aoti] if "aoti" in b.attributes else []),
            *([pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")] if "gpu" in b.attributes else []),
        ],
    )
    for doc in _DOCS
    for b in doc.runnable
    if _standalone(b)
]


@pytest.mark.parametrize("block", _STANDALONE_BLOCKS)
def test_standalone_block_runs(block, doc_env):
    run_block(block, {"__name__": "__main__"})


def test_blocks_are_classified():
    """Every block is a known language, its attributes known, output only after runnable code."""
    known = {"python", "text", "bash", "cpp", "cmake", ""}
    for doc in _DOCS:
        for b in doc.blocks:
            assert b.language in known, f"{b.where}: unknown block language {b.language!r}"
            if b.language == "python":
                unknown = set(b.attributes) - ATTRIBUTES
                assert not unknown, f"{b.where}: unknown attributes {sorted(unknown)} (known: {sorted(ATTRIBUTES)})"
            assert b.language != "text", f"{b.where}: a text block that follows no runnable block"


def test_every_page_has_runnable_blocks():
    assert len(_DOCS) >= 4
    for doc in _DOCS:
        assert doc.runnable, f"{_id(doc)}: no runnable ```python block"


def test_standalone_blocks_are_collected():
    """A gpu or aoti block becomes a test of its own, skipped or marked as its attributes say."""
    doc = parse_text("```python gpu\nx = 1\n```\n\n```python aoti\ny = 2\n```\n```text\n\n```\n")
    gpu, aoti = doc.runnable
    assert _standalone(gpu) and _standalone(aoti) and aoti.output == "\n"
    [param] = [p for p in _STANDALONE_BLOCKS if "aoti" in p.values[0].attributes]
    assert any(m.name == "aoti" for m in param.marks)


@pytest.mark.parametrize(
    "expected, actual, ok",
    [
        ("IterationStats(500 iterations, loss 7.11516)", "IterationStats(500 iterations, loss 7.11517)", True),
        ("IterationStats(500 iterations, loss 7.11516)", "IterationStats(499 iterations, loss 7.11516)", False),
        ("grew by a factor 1.23", "grew by a factor 1.24", True),
        ("grew by a factor 1.23", "grew by a factor 1.5", False),
        ("last change 4.66e-09", "last change 3.1e-09", True),
        ("a wrapped\n  line", "a wrapped line", True),
        ("shape (100, 50)", "shape (100, 51)", False),
        ("Warning: ... (L ≈ 40.9)", "Warning: anything here (L ≈ 40.9)", True),
        ("tensor(True)", "tensor(False)", False),
        ("printed", "printed twice", False),
    ],
)
def test_output_comparison(expected, actual, ok):
    assert (output_mismatch(expected, actual) is None) == ok


def test_numbers_agree():
    assert numbers_agree("3", "3") and not numbers_agree("3", "3.0") and not numbers_agree("500", "501")
    assert numbers_agree("0.0489", "0.049") and not numbers_agree("0.0489", "0.05")
