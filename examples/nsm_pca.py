"""Similarity-matching PCA on scikit-learn's handwritten digits.

Demonstrates that a linear similarity-matching network (``SimilarityMatching``
with no projection) learns the principal subspace of its input from local,
Hebbian / anti-Hebbian updates alone: the encoder ``W`` and the lateral
competitor ``M`` are trained by SGD on ``model.loss(x, y)``, and the network's
output ``y = M⁻¹·W·x`` (the fixed point of its inner loop, which runs as one
``torchiter.quadratic_descent`` call) spans the same 3-D subspace as PCA.

Prints the principal angles between the learned and PCA's subspaces and the
share of PCA's variance the learned subspace captures, and saves a figure of
the embedding colored by digit.

Run (scikit-learn and matplotlib needed; tqdm optional)::

    python examples/nsm_pca.py              # about 10 s
    python examples/nsm_pca.py --quick      # smoke run
    python examples/nsm_pca.py --epochs 200 --out /tmp/figs
"""

import _common
import torch

NAME = "nsm_pca"


def main(argv=None) -> dict:
    p = _common.parser(__doc__, epochs=60, quick_epochs=6, lr=0.01)
    p.add_argument("--components", type=int, default=3, help="output dimension k (default 3)")
    args = _common.parse(p, argv)
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from torch import nn

    from torchiter.models import SimilarityMatching

    images, labels = load_digits(return_X_y=True)
    # Centred (PCA is about the covariance) and scaled by one global number,
    # not per pixel: per-pixel standardisation would change which subspace
    # is principal and so what we compare against.
    data = images - images.mean(axis=0)
    data /= data.std()
    x = torch.tensor(data, dtype=torch.float32)
    k = args.components

    # The workload of the spec's table: tau 0.5, 100 iterations at rate 0.1, tol 1e-5.
    model = SimilarityMatching(
        nn.Linear(64, k, bias=False), k, tau=0.5, max_iterations=100, iteration_lr=0.1, tol=1e-5
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss = _common.train(model, x, optimizer, args.epochs, args.batch_size, not args.no_progress)

    y = _common.outputs(model, x).numpy()
    # The network is linear, so its filters are what maps x to y; reading them
    # off the outputs measures what it computes, converged or not.
    filters = np.linalg.lstsq(data, y, rcond=None)[0]  # (64, k)
    learned = np.linalg.qr(filters)[0]
    pca = PCA(k).fit(data)
    cosines = np.linalg.svd(learned.T @ pca.components_.T, compute_uv=False)
    angles = np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0)))
    captured = np.sum((data @ learned) ** 2) / np.sum(pca.transform(data) ** 2)

    print(f"final training loss: {loss:.4f} ({args.epochs} epochs, last forward {model.iteration_idx + 1} iterations)")
    print("principal angles to the PCA subspace (degrees): " + " ".join(f"{a:.2f}" for a in sorted(angles)))
    print(f"variance captured: {100 * captured:.2f}% of PCA's top-{k} variance")
    print(f"inner loop of the last forward: {model.iteration_stats}")

    plt = _common.pyplot()
    scores = pca.transform(data)
    # Similarity matching fixes the subspace but not a basis within it, so y
    # is rotated onto PCA's axes (orthogonal Procrustes) before plotting.
    u, _, vt = np.linalg.svd(y.T @ scores)
    aligned = y @ (u @ vt)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharex=True, sharey=True)
    nsm_title = f"similarity matching y (rotated onto PCA axes)\nprincipal angles {max(angles):.2f}° at most"
    for ax, emb, title in (
        (axes[0], aligned, nsm_title),
        (axes[1], scores, "scikit-learn PCA"),
    ):
        points = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
        ax.set_title(title)
        ax.set_xlabel("component 1")
    axes[0].set_ylabel("component 2")
    fig.colorbar(points, ax=axes, ticks=range(10), label="digit")
    _common.save_figure(fig, args.out, NAME)
    return {"angles": angles, "captured": captured}


if __name__ == "__main__":
    main()
