"""The names README.md and docs/*.md use exist in the code, with the signatures they show.

- Every qualified name (``torchiter.ops.sgd_step_``, ``torch.ops.torchiter.quadratic_descent``,
  ``torchiter::quadratic_descent_backward``), in the text and in every code block, resolves;
  a code span that calls one with plain argument names (``torchiter.Clamp(min, max)``) names
  parameters it has.
- ```python signature listings and headings of the form ``## `Name(...)` `` equal
  ``inspect.signature`` of the class or function: parameter names, order, kinds and defaults.
- The schema listings of docs/ops.md equal the registered schemas.
- A code span that calls a bare name (``converged()``, ``step_size_hint(lr, L)``), assigns a
  keyword (``stats_trace=True``), reads an attribute of a module, model or statistics object
  (``module.iteration_stats``, ``iteration_stats.iterations``) or is a snake_case identifier
  (``last_iteration_loss``) names an attribute, method or parameter of torchiter's public API
  (or of the few torch objects the docs discuss), with the argument names it shows.
"""

import ast
import importlib
import inspect
import re
from functools import lru_cache
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import torch
from torch import nn

import torchiter
from _docs import DOC_FILES, ROOT, parse

_DOCS = [parse(p) for p in DOC_FILES]
_SPAN = re.compile(r"``?([^`\n]+?)``?")
# Placeholders the text uses for "any op" (torch.ops.torchiter.NAME).
_PLACEHOLDERS = {"NAME"}
# Identifiers the text uses for its own variables and notation, not for API names: a hook
# (``hook(module)``), a DDP-wrapped module (``ddp(x)``), a per-iteration rate ``lr_k``, the key
# torch.optim.SGD keeps its buffer under, torch's functionalisation wrapper, the programs
# examples/cpp builds and the CMake commands that build them.
_NOT_API = {"hook", "ddp", "lr_k", "momentum_buffer", "auto_functionalized", "torchiter_run", "torchiter_aoti_run",
            "add_library", "find_package"}
# torch modules whose functions the text names by their bare names.
_TORCH_MODULES = [torch, torch.distributed, torch._inductor, torch.export, nn.Module, torch.optim.Optimizer]
# torch callables whose arguments the text discusses beside torchiter's.
_TORCH_CALLABLES = [
    torch.compile,
    torch.nn.parallel.DistributedDataParallel,
    torch.optim.SGD,
    torch.export.export,
    torch.zeros,  # requires_grad=
]
_PUBLIC_MODULES = ["torchiter", "torchiter.ops", "torchiter.models", "torchiter.stats", "torchiter.implicit",
                   "torchiter.scripting", "torchiter.projections", "torchiter.optim", "torchiter.compiled"]


def _ids(doc) -> str:
    return str(doc.path.relative_to(ROOT))


# ----------------------------------------------------------------------------- the API


class _Lsq(torchiter.IterationLossModule):
    def __init__(self) -> None:
        super().__init__(max_iterations=3, iteration_lr=0.1)
        self.register_buffer("y", torch.zeros(2))

    def iteration_parameters(self):
        return [self.y]

    def iteration_loss(self, b):
        return ((self.y - b) ** 2).sum()


@lru_cache(maxsize=None)
def _api() -> Dict[str, Any]:
    """Objects the docs talk about, after a forward (attributes such as iteration_stats exist then)."""
    module = _Lsq()
    module(torch.ones(2))
    model = torchiter.models.SimilarityMatching(nn.Linear(3, 2, bias=False), 2, iteration_lr=0.5)
    model(torch.randn(4, 3))
    coder = torchiter.models.SparseCoding(3, 4, iteration_lr=0.5)
    coder(torch.randn(2, 4))
    return {"module": module, "model": model, "coder": coder, "stats": module.iteration_stats}


@lru_cache(maxsize=None)
def _callables() -> List[Callable]:
    """Every public class, function and method of torchiter, and the torch callables above."""
    found: List[Callable] = list(_TORCH_CALLABLES)
    for name in _PUBLIC_MODULES:
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if inspect.isclass(obj):
                found.append(obj)
                found.extend(f for _, f in inspect.getmembers(obj, callable) if not _.startswith("__"))
            elif callable(obj):
                found.append(obj)
    return found


def _signature(obj: Any) -> Optional[inspect.Signature]:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _accepts(obj: Any, positional: List[str], keywords: List[str]) -> bool:
    """Whether ``obj``'s parameters include these names (any name where it takes ``*args``/``**kwargs``)."""
    sig = _signature(obj)
    if sig is None:
        return True
    params = sig.parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    var_pos = any(p.kind == p.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind == p.VAR_KEYWORD for p in params)
    return all(n in names or var_pos for n in positional) and all(n in names or var_kw for n in keywords)


@lru_cache(maxsize=None)
def _op_names() -> Dict[str, List[str]]:
    """Each registered torchiter op's name and its arguments' names (all overloads)."""
    ops: Dict[str, List[str]] = {}
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("torchiter::"):
            ops.setdefault(schema.name.removeprefix("torchiter::"), []).extend(a.name for a in schema.arguments)
    return ops


def _resolve(dotted: str) -> Any:
    """The object a qualified name refers to (AttributeError / ImportError when there is none)."""
    parts = dotted.split(".")
    if dotted.startswith("torch.ops.torchiter."):
        obj = torch.ops.torchiter
        rest = parts[3:]
    else:
        obj = importlib.import_module(parts[0])
        rest = parts[1:]
    for part in rest:
        if part in _PLACEHOLDERS:
            break
        if not hasattr(obj, part) and inspect.ismodule(obj):
            # A submodule its package does not import.
            obj = importlib.import_module(f"{obj.__name__}.{part}")
        else:
            obj = getattr(obj, part)
    return obj


def _call_args(text: str) -> Optional[Tuple[List[str], List[str]]]:
    """Plain argument names and keywords of ``text`` (``a, b, c=1``), or None when it is not that."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        return None
    positional = []
    for a in call.args:
        if isinstance(a, ast.Starred):
            continue
        if not isinstance(a, ast.Name):
            return None
        positional.append(a.id)
    return positional, [k.arg for k in call.keywords if k.arg is not None]


# ----------------------------------------------------------------------------- what the docs say


def _spans(doc) -> Iterator[str]:
    for m in _SPAN.finditer(doc.text):
        yield m.group(1).strip()


def _all_text(doc) -> str:
    """The prose and every code block."""
    return doc.text + "\n" + "\n".join(b.source for b in doc.blocks)


_QUALIFIED = re.compile(r"(?<![\w./])((?:torch\.ops\.)?torchiter(?:\.\w+)+)(\(([^()`]*)\))?")
_CPP_OP = re.compile(r"\btorchiter::(\w+)")


@pytest.mark.parametrize("doc", _DOCS, ids=_ids)
def test_qualified_names_exist(doc):
    missing = [m.group(1) for m in _QUALIFIED.finditer(_all_text(doc)) if not _exists(m.group(1))]
    missing += [m.group(0) for m in _CPP_OP.finditer(_all_text(doc)) if m.group(1) not in _op_names()]
    # Calls in code blocks run (test_docs.py); those in the text must name the parameters.
    wrong_args = []
    for span in _spans(doc):
        for m in _QUALIFIED.finditer(span):
            args = _call_args(m.group(3)) if m.group(2) and _exists(m.group(1)) else None
            if args is not None and not _accepts(_resolve(m.group(1)), *args):
                wrong_args.append(m.group(0))
    assert not missing and not wrong_args, (
        f"{_ids(doc)} names what does not exist: {sorted(set(missing))}; "
        f"calls with arguments the code does not have: {wrong_args}"
    )


def _exists(dotted: str) -> bool:
    try:
        _resolve(dotted)
    except (AttributeError, ImportError, RuntimeError):
        return False
    return True


def _known_name(name: str) -> bool:
    """``name`` is an attribute of the API objects, a parameter of a public callable, or an op or op argument."""
    if name in _NOT_API:
        return True
    api = _api()
    if any(hasattr(obj, name) for obj in [*api.values(), torch.Tensor, *_TORCH_MODULES]):
        return True
    for mod in _PUBLIC_MODULES:
        if hasattr(importlib.import_module(mod), name):
            return True
    for obj in _callables():
        if getattr(obj, "__name__", None) == name:
            return True
        sig = _signature(obj)
        if sig is not None and name in sig.parameters:
            return True
    ops = _op_names()
    return name in ops or any(name in args for args in ops.values())


def _candidates(name: str) -> List[Any]:
    """What a bare ``name(...)`` may call: public callables and API objects' methods of that name."""
    found = [obj for obj in _callables() if getattr(obj, "__name__", None) == name]
    found += [getattr(obj, name) for obj in _api().values() if callable(getattr(obj, name, None))]
    if callable(getattr(torch.Tensor, name, None)):
        found.append(getattr(torch.Tensor, name))
    return found


_BARE_CALL = re.compile(r"([a-z_][a-z0-9_]*)\((.*)\)")
_KEYWORD = re.compile(r"([a-z_][a-z0-9_]*)=(?!=)")
_ATTRIBUTE = re.compile(r"(?<![\w/.])(module|model|self|iteration_stats|stats)\.([a-z_][a-z0-9_]*)")
_SNAKE = re.compile(r"_?[a-z]+(?:_[a-z]+)+_?")


@pytest.mark.parametrize("doc", _DOCS, ids=_ids)
def test_documented_api_names_exist(doc):
    unknown = []
    for span in _spans(doc):
        m = _BARE_CALL.fullmatch(span)
        if m and m.group(1) not in _NOT_API:
            args = _call_args(m.group(2))
            cands = _candidates(m.group(1))
            if not cands or (args is not None and not any(_accepts(c, *args) for c in cands)):
                unknown.append(span)
            continue
        # Only a span that is nothing but keywords (`stats_trace=True, divergence="warn"`): keywords
        # inside a call are checked with the call.
        args = _call_args(span) if _KEYWORD.match(span) else None
        names = args[1] if args is not None and not args[0] else []
        if re.fullmatch(r"[a-z_]\w*=", span):  # `lrs=`: an argument named on its own
            names.append(span[:-1])
        names += [a.group(2) for a in _ATTRIBUTE.finditer(span)]
        if _SNAKE.fullmatch(span):
            names.append(span)
        unknown += [f"{span} ({n})" for n in names if not _known_name(n)]
    assert not unknown, f"{_ids(doc)} names what the code does not have: {unknown}"


def test_iteration_stats_fields_documented():
    """The field table of docs/iteration-modules.md lists IterationStats' attributes, and the page names them all."""
    doc = next(d for d in _DOCS if d.path.name == "iteration-modules.md")
    rows = re.findall(r"^\| (`[^|]+`) \|", doc.text, re.M)
    listed = [m.group(1) for row in rows for m in _SPAN.finditer(row)]
    assert {"iterations", "change", "growth"} <= set(listed), "the field table was not found"
    stats = _api()["stats"]
    assert all(hasattr(stats, f) for f in listed), [f for f in listed if not hasattr(stats, f)]
    fields = {k for k in vars(stats) if not k.startswith("_")} | {"noise", "diverging"}
    named = set(_spans(doc))
    assert fields <= named, f"IterationStats attributes the page does not name: {sorted(fields - named)}"


# ----------------------------------------------------------------------------- signatures


_HEADING_SIGNATURE = re.compile(r"^#+ `(\w+)\((.*)\)`$", re.M)


def _listed_signatures(doc) -> Iterator[Tuple[str, str, str]]:
    """(name, parameter list, where) of every signature listing and signature heading."""
    for b in doc.blocks:
        if b.language == "python" and "signature" in b.attributes:
            # One listing per statement: a line that starts a name, with its continuation lines.
            source = re.sub(r"#[^\n]*", "", b.source)
            for m in re.finditer(r"^(\w+)\((.*?)\)\s*$", source, re.M | re.S):
                yield m.group(1), m.group(2), b.where
    for m in _HEADING_SIGNATURE.finditer(doc.text):
        yield m.group(1), m.group(2), f"{_ids(doc)} heading {m.group(0)!r}"


def _scope_object(name: str) -> Any:
    for mod in _PUBLIC_MODULES:
        obj = getattr(importlib.import_module(mod), name, None)
        if obj is not None:
            return obj
    raise AssertionError(f"{name} is not in torchiter's public modules")


def _documented_parameters(params: str) -> List[Tuple[str, Any, Any]]:
    """(name, kind, default) of a listed parameter list, with defaults evaluated."""
    fn = ast.parse(f"def f({params}): pass").body[0]
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(a.defaults)) + list(a.defaults)
    env = {"torch": torch, "nn": nn}

    def value(node):
        return node if node is inspect.Parameter.empty else eval(compile(ast.Expression(node), "<doc>", "eval"), env)

    for p, d in zip(positional, defaults):
        out.append((p.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, value(d)))
    if a.vararg:
        out.append((a.vararg.arg, inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.empty))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((p.arg, inspect.Parameter.KEYWORD_ONLY, value(d) if d is not None else inspect.Parameter.empty))
    if a.kwarg:
        out.append((a.kwarg.arg, inspect.Parameter.VAR_KEYWORD, inspect.Parameter.empty))
    return out


def _same_default(want: Any, got: Any) -> bool:
    if inspect.isclass(want) or want is None or inspect.Parameter.empty in (want, got):
        return want is got
    return isinstance(got, type(want)) and want == got


_LISTINGS = [(n, p, w) for doc in _DOCS for n, p, w in _listed_signatures(doc)]


@pytest.mark.parametrize("name, params, where", _LISTINGS, ids=[f"{w.split()[0]}:{n}" for n, _, w in _LISTINGS])
def test_signature_listing_matches(name, params, where):
    obj = _scope_object(name)
    actual = [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]
    listed = _documented_parameters(params)
    assert [(n, k) for n, k, _ in listed] == [(n, k) for n, k, _ in actual], (
        f"{where}: {name}({params}) lists other parameters than the code's {name}{inspect.signature(obj)}"
    )
    for (n, _, want), (_, _, got) in zip(listed, actual):
        assert _same_default(want, got), f"{where}: {name} parameter {n} defaults to {got!r}, the text says {want!r}"


def test_listings_found():
    # The parser must see the listings the docs have; a format change must not silently check nothing.
    names = {n for n, _, _ in _LISTINGS}
    assert {"MultiSimilarityMatching", "SimilarityMatching", "SupervisedSimilarityMatching", "SparseCoding",
            "IterationModule", "IterationLossModule"} <= names


# ----------------------------------------------------------------------------- op schemas


def _normalise_schema(s: str) -> str:
    s = " ".join(s.split())
    return re.sub(r"\s*([(),\[\]])\s*", r"\1", s).replace(",", ", ")


def _schema_listings() -> List[Tuple[str, str, str]]:
    """(op name, listed schema, where) from the schema blocks of docs/ops.md."""
    doc = next(d for d in _DOCS if d.path.name == "ops.md")
    out = []
    for b in doc.blocks:
        if b.language != "":
            continue
        source = re.sub(r"#[^\n]*", "", b.source)
        for m in re.finditer(r"^([a-z_]+(?:\.\w+)?)\((.*?)\)\s*->\s*(\(.*?\)|\w+)\s*$", source, re.M | re.S):
            out.append((m.group(1), _normalise_schema(m.group(0)), b.where))
    return out


_SCHEMAS = _schema_listings()


@pytest.mark.parametrize("op, listed, where", _SCHEMAS, ids=[s[0] for s in _SCHEMAS])
def test_schema_listing_matches(op, listed, where):
    name, _, overload = op.partition(".")
    schema = getattr(getattr(torch.ops.torchiter, name), overload or "default")._schema
    actual = _normalise_schema(str(schema).removeprefix("torchiter::"))
    if "..." in listed:
        # An abbreviated overload: the arguments it does show are the op's.
        shown = re.search(r"\((.*)\)\s*->", listed).group(1).split(", ")
        args = re.search(r"\((.*)\)\s*->", actual).group(1).split(", ")
        assert all(a == "..." or a in args for a in shown), f"{where}: {listed} against {actual}"
    else:
        assert listed == actual, f"{where}: the listing\n  {listed}\nis not the registered schema\n  {actual}"


def test_every_public_op_is_listed():
    listed = {op for op, _, _ in _SCHEMAS}
    public = {name for name in _op_names() if not name.startswith("_")}
    assert {"sgd_step_", "quadratic_descent"} <= public
    documented = {op.partition(".")[0] for op in listed}
    assert public <= documented, f"ops without a schema listing in docs/ops.md: {sorted(public - documented)}"
