"""Similarity-matching clustering of scikit-learn's handwritten digits.

Demonstrates non-negative similarity matching (NSM): ``SimilarityMatching``
with a ReLU projection, whose inner loop (the lateral competition between the
output units, run as one ``torchiter.quadratic_descent`` call) makes a few
units win for each input. Trained with SGD on ``model.loss(x, y)``, the units
specialise on groups of similar digits, so ``argmax(y)`` is a clustering,
learned without labels. The labels are used only to score it: the adjusted
Rand index (ARI, 0 for chance, 1 for a perfect match) and the purity (share
of samples whose cluster's majority digit is theirs), next to k-means on the
same features for reference.

Saves a figure of the clusters: each unit's mean member image and its
encoder weights mapped back to pixels.

Run (scikit-learn and matplotlib needed; tqdm optional)::

    python examples/nsm_clustering.py              # about 10-20 s
    python examples/nsm_clustering.py --quick      # smoke run
    python examples/nsm_clustering.py --clusters 20 --epochs 60
"""

import _common
import torch

NAME = "nsm_clustering"


def main(argv=None) -> dict:
    p = _common.parser(__doc__, epochs=100, quick_epochs=3, lr=0.02)
    p.add_argument("--clusters", type=int, default=10, help="output units k (default 10)")
    p.add_argument("--pca", type=int, default=20, help="PCA components kept; 0 keeps all 64 pixels (default 20)")
    p.add_argument(
        "--scale", type=float, default=10.0, help="norm every input is scaled to (default 10; see the source)"
    )
    args = _common.parse(p, argv)
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    from torch import nn

    from torchiter.models import SimilarityMatching

    images, labels = load_digits(return_X_y=True)
    data = (images - images.mean(axis=0)) / (images.std(axis=0) + 1e-8)
    pca = None
    if args.pca:
        # Dropping the low-variance directions removes pixel noise that
        # otherwise blurs the similarities the units compete on.
        pca = PCA(args.pca, random_state=args.seed).fit(data)
        data = pca.transform(data)
    # NSM clusters by the sign of x·x' (centred inputs of equal norm, so
    # similar digits have positive similarity). The norm itself matters
    # because the encoder's weight penalty does not scale with the input:
    # at norm 1 the responses stay small and only 4 of 10 units ever win
    # (ARI 0.19 measured), at norm 3 to 10 all of them do (ARI about 0.5).
    data = args.scale * data / np.linalg.norm(data, axis=1, keepdims=True)
    x = torch.tensor(data, dtype=torch.float32)
    k = args.clusters

    # The clustering workload of the spec's table.
    model = SimilarityMatching(
        nn.Linear(x.shape[1], k),
        k,
        tau=0.5,
        max_iterations=200,
        iteration_lr=0.05,
        tol=1e-4,
        iteration_projection=nn.ReLU(),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    loss = _common.train(model, x, optimizer, args.epochs, args.batch_size, not args.no_progress)

    y = _common.outputs(model, x).numpy()
    assign = y.argmax(axis=1)
    silent = float(np.mean(y.max(axis=1) == 0))
    used = np.unique(assign)
    purity = sum(np.bincount(labels[assign == c]).max() for c in used) / len(labels)
    ari = adjusted_rand_score(labels, assign)
    kmeans = KMeans(k, n_init=10, random_state=args.seed).fit_predict(data)
    print(f"final training loss: {loss:.4f} ({args.epochs} epochs, last forward {model.iteration_idx + 1} iterations)")
    print(f"units used: {len(used)} of {k}; inputs with no active unit: {100 * silent:.1f}%")
    print(f"inner loop of the last forward: {model.iteration_stats}")
    print(
        f"adjusted Rand index: {ari:.3f}  purity: {purity:.3f}  "
        f"(k-means on the same features: ARI {adjusted_rand_score(labels, kmeans):.3f})"
    )

    plt = _common.pyplot()
    weights = model.encoder.weight.detach().numpy()
    if pca is not None:
        weights = weights @ pca.components_
    fig, axes = plt.subplots(2, k, figsize=(1.2 * k, 3.0), squeeze=False)
    for c in range(k):
        members = assign == c
        top, bottom = axes[0, c], axes[1, c]
        if members.any():
            top.imshow(images[members].mean(axis=0).reshape(8, 8), cmap="gray_r")
            counts = np.bincount(labels[members], minlength=10)
            top.set_title(f"'{counts.argmax()}' {counts.max()}/{members.sum()}", fontsize=8)
        else:
            top.set_title("empty", fontsize=8)
        bottom.imshow(weights[c].reshape(8, 8), cmap="RdBu_r")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mean member", fontsize=8)
    axes[1, 0].set_ylabel("encoder row", fontsize=8)
    fig.suptitle(f"NSM clusters of the digits: ARI {ari:.2f}, purity {purity:.2f}", fontsize=10)
    _common.save_figure(fig, args.out, NAME)
    return {"ari": ari, "purity": purity}


if __name__ == "__main__":
    main()
