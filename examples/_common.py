"""Helpers shared by the digits examples (not an example itself).

Kept beside the scripts so that each one runs as ``python examples/<name>.py``
from a plain checkout: Python puts the script's folder on ``sys.path``.
"""

import os
import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import numpy as np
import torch

T = TypeVar("T")

DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def require(*modules: str) -> None:
    """Exits with a readable message when an optional dependency is missing."""
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        pip_names = {"sklearn": "scikit-learn"}
        names = " ".join(pip_names.get(m, m) for m in missing)
        sys.exit(f"this example needs {names}: pip install {names}")


def parser(doc: str, epochs: int, quick_epochs: int, lr: float) -> argparse.ArgumentParser:
    """The options every example takes; ``--quick`` overrides ``--epochs``.

    The help shows each default as it is when printed, after any ``set_defaults``.
    """
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("--epochs", type=int, default=epochs, help=f"passes over the training data (default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"outer SGD learning rate (default {lr})")
    p.add_argument("--batch-size", type=int, default=100, help="training batch size (default %(default)s)")
    p.add_argument(
        "--quick", action="store_true", help=f"a smoke run of {quick_epochs} epoch(s), for CI (a few seconds)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of torch and numpy (default %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for the figure (default {DEFAULT_OUT})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    p.set_defaults(quick_epochs=quick_epochs)
    return p


def parse(p: argparse.ArgumentParser, argv: Optional[list] = None) -> argparse.Namespace:
    """Parses the options, checks the dependencies and seeds the generators."""
    args = p.parse_args(argv)
    require("sklearn", "matplotlib")
    if args.quick:
        args.epochs = args.quick_epochs
    # The tensors are small (a batch of 100 digits), so more threads buy
    # little and, on a busy machine, cost a lot in OpenMP waits.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    return args


def _text_progress(items: Iterable[T], total: int, desc: str, mininterval: float = 0.0) -> Iterator[T]:
    """A minimal stand-in for tqdm: one line on stderr, redrawn in place (at most every ``mininterval`` s)."""
    width = 30
    start = last = time.perf_counter()
    for i, item in enumerate(items):
        yield item
        now = time.perf_counter()
        if now - last < mininterval and i + 1 < total:
            continue
        last = now
        done = (i + 1) * width // max(total, 1)
        sys.stderr.write(
            f"\r{desc} [{'#' * done}{'.' * (width - done)}] {i + 1}/{total} {time.perf_counter() - start:5.1f}s"
        )
        sys.stderr.flush()
    sys.stderr.write("\n")


def progress(items: Iterable[T], total: int, desc: str, enabled: bool = True, mininterval: float = 0.1) -> Iterator[T]:
    """``tqdm`` when it is installed, else a plain text bar; nothing if disabled.

    Redrawn at most every ``mininterval`` seconds (long runs logged to a file
    pass more than tqdm's 0.1).
    """
    if not enabled:
        return iter(items)
    try:
        from tqdm import tqdm
    except ImportError:
        return _text_progress(items, total, desc, mininterval)
    return iter(tqdm(items, total=total, desc=desc, leave=True, mininterval=mininterval))


def train_epoch(
    model: torch.nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    desc: str,
    show_progress: bool = True,
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> float:
    """One pass over ``x`` in a random order, training on ``model.loss(xb, forward(xb))``.

    ``forward`` (default: the model itself) runs the inner loop to its fixed
    point without autograd; the loss is then differentiable in the encoder
    and the competitor only, which is what makes the outer step Hebbian /
    anti-Hebbian. Returns the last batch's loss.
    """
    forward = model if forward is None else forward
    perm = torch.randperm(len(x))
    starts = range(0, len(x), batch_size)
    loss = torch.tensor(float("nan"))
    for start in progress(starts, len(starts), desc, show_progress):
        xb = x[perm[start : start + batch_size]]
        loss = model.loss(xb, forward(xb))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss became {loss.item()} ({desc})")
    return loss.detach().item()


def train(
    model: torch.nn.Module,
    x: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    show_progress: bool = True,
    after_step: Optional[Callable[[], None]] = None,
) -> float:
    """Trains an iteration module for ``epochs`` passes (:func:`train_epoch`); returns the last loss."""
    loss = float("nan")
    for epoch in range(epochs):
        desc = f"training {type(model).__name__}, epoch {epoch + 1}/{epochs}"
        loss = train_epoch(model, x, optimizer, batch_size, desc, show_progress, after_step=after_step)
    return loss


@torch.no_grad()
def outputs(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The model's outputs on all of ``x``, in batches to bound memory."""
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend: files only, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def filter_figure(weight: torch.Tensor, title: str, out_dir: Path, name: str, cols: int = 10) -> Path:
    """Saves a grid of a conv layer's filters (input channel 0), each on its own symmetric colour scale."""
    plt = pyplot()
    filters = weight.detach()[:, 0].cpu().numpy()
    rows = (len(filters) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols, 1.08 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < len(filters):
            lim = abs(filters[i]).max()
            ax.imshow(filters[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, out_dir, name)


def save_figure(fig, out_dir: Path, name: str) -> Path:
    """Saves ``fig`` as ``<out_dir>/<name>.png`` and says where."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"figure saved to {os.path.relpath(path)}")
    return path
