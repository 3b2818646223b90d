"""Task-driven sparse coding on scikit-learn's digits: backprop through the inner loop.

A ``SparseCoding`` layer (ISTA: its inner loop is one
``torchiter.quadratic_descent`` call) encodes each 8x8 digit as non-negative
sparse codes over a learned dictionary, and a linear classifier reads the
codes. Two copies of the same model are trained side by side from the same
start, with the same data order, on ``cross-entropy + reconstruction loss``:

* ``backprop``: ``fixed_point_gradient=FixedPointGradient("implicit")``, so
  the classification loss reaches the dictionary through the codes (the op's
  implicit backward at the fixed point, an exact solve on each sample's
  active set, memory independent of the inner iterations);
* ``detached``: the codes are constants for the outer step, as in plain
  dictionary learning: the dictionary only learns to reconstruct.

Prints the test accuracy and the training time of both and saves a figure of
test accuracy per epoch.

Run (scikit-learn and matplotlib needed; tqdm optional)::

    python examples/sparse_coding_backprop_digits.py            # about 20 s
    python examples/sparse_coding_backprop_digits.py --quick    # smoke run
"""

import time

import _common
import torch

NAME = "sparse_coding_backprop_digits"


class Classifier(torch.nn.Module):
    """Sparse codes of a learned dictionary, then a linear read-out."""

    def __init__(self, atoms: int, sparsity: float, iterations: int, backprop: bool) -> None:
        super().__init__()
        from torchiter.implicit import FixedPointGradient
        from torchiter.models import SparseCoding

        self.coder = SparseCoding(
            atoms, 64, sparsity=sparsity, nonnegative=True, max_iterations=iterations, iteration_lr=0.1,
            fixed_point_gradient=FixedPointGradient("implicit") if backprop else None,
        )
        self.readout = torch.nn.Linear(atoms, 10)

    def forward(self, x: torch.Tensor):
        codes = self.coder(x)
        return self.readout(codes), codes


def accuracy(model: Classifier, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x)[0].argmax(1) == labels).float().mean())


def main(argv=None) -> dict:
    p = _common.parser(__doc__, epochs=30, quick_epochs=2, lr=0.05)
    p.add_argument("--atoms", type=int, default=32, help="dictionary size (default 32)")
    p.add_argument("--sparsity", type=float, default=0.5, help="L1 weight of the codes (default 0.5)")
    p.add_argument("--iterations", type=int, default=100, help="ISTA iterations per forward (default 100)")
    args = _common.parse(p, argv)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    data = images / 16.0
    xtr, xte, ytr, yte = train_test_split(data, labels, test_size=0.3, random_state=0, stratify=labels)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    models = {}
    for name, backprop in (("backprop", True), ("detached", False)):
        torch.manual_seed(args.seed)  # the same initial dictionary and read-out
        models[name] = Classifier(args.atoms, args.sparsity, args.iterations, backprop)
    optims = {k: torch.optim.Adam(m.parameters(), lr=args.lr / 10) for k, m in models.items()}
    seconds = {k: 0.0 for k in models}
    history = {k: [] for k in models}
    n = len(xtr)
    bar = _common.progress(range(args.epochs), args.epochs, "training both models", not args.no_progress)
    for _ in bar:
        perm = torch.randperm(n)
        for start in range(0, n, args.batch_size):
            idx = perm[start : start + args.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            for name, model in models.items():
                t0 = time.perf_counter()
                logits, codes = model(xb)
                loss = torch.nn.functional.cross_entropy(logits, yb) + model.coder.loss(xb, codes)
                optims[name].zero_grad()
                loss.backward()
                optims[name].step()
                model.coder.normalize_dictionary_()
                seconds[name] += time.perf_counter() - t0
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{name}: the training loss became {loss.item()}")
        for name, model in models.items():
            history[name].append(accuracy(model, xte, yte))

    results = {}
    for name in models:
        results[name] = (100 * history[name][-1], seconds[name])
        print(
            f"{name:>8}: test accuracy {100 * history[name][-1]:.2f}%  training time {seconds[name]:.2f} s"
            f"  ({args.epochs} epochs, {args.iterations} ISTA iterations per forward)"
        )
        print(f"{name:>8}: inner loop of the last forward: {models[name].coder.iteration_stats}")
    print(
        f"test accuracy: {results['backprop'][0]:.2f}% with backprop through the inner loop, "
        f"{results['detached'][0]:.2f}% detached"
    )

    plt = _common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in history.items():
        ax.plot(range(1, len(accs) + 1), [100 * a for a in accs], marker="o", label=f"{name} ({seconds[name]:.1f} s)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"sparse coding ({args.atoms} atoms) + linear read-out on digits")
    ax.legend()
    _common.save_figure(fig, args.out, NAME)
    return results


if __name__ == "__main__":
    main()
