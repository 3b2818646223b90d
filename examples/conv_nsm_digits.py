"""A convolutional similarity-matching feature layer on scikit-learn's digits.

Demonstrates ``SimilarityMatching`` with a convolutional encoder
(``nn.Conv2d(1, C, k, bias=False)``) and a ReLU projection: the competitor
``M`` mixes the channels at every pixel, and the inner loop (one
``torchiter.quadratic_descent`` call over the ``(B, C, H, W)`` state) makes
the channels compete, so unsupervised training on ``model.loss(x, y)`` learns
local stroke and edge filters. A linear read-out (softmax regression) trained
on the pooled features of a training split is then scored on a held-out test
split, next to the same read-out on raw pixels and on the untrained layer's
features (random ReLU filters are already good features for 8x8 digits, so
expect the trained layer to match them, and both to beat raw pixels).

Saves a figure of the learned filters.

Run (scikit-learn and matplotlib needed; tqdm optional)::

    python examples/conv_nsm_digits.py              # about 10 s
    python examples/conv_nsm_digits.py --quick      # smoke run
    python examples/conv_nsm_digits.py --channels 32 --kernel 4
"""

import _common
import torch

NAME = "conv_nsm_digits"


def readout_accuracy(train_x, train_y, test_x, test_y, steps: int = 300) -> float:
    """Test accuracy of softmax regression fitted on ``(train_x, train_y)``.

    Full-batch Adam with a little weight decay, on standardised features, so
    that the three feature sets compared are read out exactly alike.
    """
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    readout = torch.nn.Linear(train_x.shape[1], 10)
    optimizer = torch.optim.Adam(readout.parameters(), lr=0.01, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(readout(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return (readout(test_x).argmax(1) == test_y).float().mean().item()


def main(argv=None) -> dict:
    p = _common.parser(__doc__, epochs=20, quick_epochs=1, lr=0.05)
    p.add_argument("--channels", type=int, default=16, help="feature channels C (default 16)")
    p.add_argument("--kernel", type=int, default=4, help="filter size k (default 4)")
    p.add_argument("--tau", type=float, default=0.1, help="encoder / competitor rate ratio (default 0.1)")
    p.add_argument("--input-scale", type=float, default=0.5, help="std of the standardised pixels (default 0.5)")
    args = _common.parse(p, argv)
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch import nn

    from torchiter.models import SimilarityMatching

    images, labels = load_digits(return_X_y=True)
    train_img, test_img, train_lab, test_lab = train_test_split(
        images, labels, test_size=0.25, random_state=args.seed, stratify=labels
    )
    # One mean and scale for all pixels, from the training split only: a
    # per-pixel standardisation would distort the strokes the filters see.
    mean, std = train_img.mean(), train_img.std()

    def as_tensor(a):
        return torch.tensor(args.input_scale * (a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

    train_x, test_x = as_tensor(train_img), as_tensor(test_img)
    train_y, test_y = torch.tensor(train_lab), torch.tensor(test_lab)
    C = args.channels

    # The conv workload of the spec's table (40 iterations at rate 1.0, ReLU).
    model = SimilarityMatching(
        nn.Conv2d(1, C, args.kernel, bias=False),
        C,
        tau=args.tau,
        max_iterations=40,
        iteration_lr=1.0,
        iteration_projection=nn.ReLU(),
    )

    def features(x):
        # Pooling keeps the read-out small and tolerant to small shifts.
        y = _common.outputs(model, x)
        return nn.functional.avg_pool2d(y, 2, ceil_mode=True).flatten(1)

    untrained = readout_accuracy(features(train_x), train_y, features(test_x), test_y)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss = _common.train(model, train_x, optimizer, args.epochs, args.batch_size, not args.no_progress)
    # The inner loop's step 1.0 is stable only while M's eigenvalues stay
    # below 2; report the largest so a diverging setting is visible. M grows
    # like the square of the input scale (M = <y yᵀ> at equilibrium), which is
    # why the pixels are scaled to std 0.5: at std 1, M reaches 2.2.
    top_eig = torch.linalg.eigvalsh(model.competitor.weight.detach()).max().item()
    accuracy = readout_accuracy(features(train_x), train_y, features(test_x), test_y)
    pixels = readout_accuracy(train_x.flatten(1), train_y, test_x.flatten(1), test_y)

    print(f"final training loss: {loss:.4f} ({args.epochs} epochs; largest eigenvalue of M {top_eig:.2f})")
    print(f"inner loop of the last forward: {model.iteration_stats}")
    print(
        f"test accuracy: {100 * accuracy:.1f}% with the NSM features "
        f"(untrained layer {100 * untrained:.1f}%, raw pixels {100 * pixels:.1f}%, chance 10%)"
    )

    plt = _common.pyplot()
    filters = model.encoder.weight.detach()[:, 0].numpy()
    cols = min(C, 8)
    rows = (C + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i < C:
            lim = np.abs(filters[i]).max()
            ax.imshow(filters[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.axis("off")
    fig.suptitle(
        f"NSM conv filters ({C} x {args.kernel}x{args.kernel}); test accuracy {100 * accuracy:.1f}%", fontsize=9
    )
    _common.save_figure(fig, args.out, NAME)
    return {"accuracy": accuracy, "untrained": untrained, "pixels": pixels}


if __name__ == "__main__":
    main()
