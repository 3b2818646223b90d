"""A training forward keeps its encoding for the loss of its output.

``y = model(x); model.loss(x, y)`` runs the encoders once where they are pure
(``torchiter.models._PURE_ENCODER_TYPES``, no hooks) and the loss gets the
same tensors: every value and gradient must equal those of a loss that encodes
again, and whatever breaks the conditions (an input or a parameter changed in
place, randomness, a buffer the encoder writes, a hook, no grad, a copy) must
give the original library's behaviour, the encoders run again.
"""

import copy
import gc
import pickle
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
from torch import nn

import torchiter.models
from torchiter.models import SimilarityMatching, SupervisedSimilarityMatching


@pytest.fixture(autouse=True)
def keep_small_inputs(monkeypatch):
    # The tests' inputs are small; the rule does not depend on the size.
    monkeypatch.setattr(torchiter.models, "_KEEP_MIN_NUMEL", 0)


@contextmanager
def conv_calls():
    """Records grad mode at each nn.Conv2d call (the class stays nn.Conv2d)."""
    calls = []
    original = nn.Conv2d._conv_forward

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    with mock.patch.object(nn.Conv2d, "_conv_forward", counting):
        yield calls


def conv_model(encoder=None, **kw):
    torch.manual_seed(3)
    enc = encoder if encoder is not None else nn.Conv2d(1, 6, 3, bias=False, dtype=torch.float64)
    model = SimilarityMatching(enc, 6, iteration_projection=nn.ReLU(), max_iterations=15, **kw).double()
    with torch.no_grad():
        model.competitor.weight.add_(0.05 * torch.randn(6, 6, dtype=torch.float64))
    return model


def images(seed=0, batch=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 9, 11, generator=g, dtype=torch.float64)


def step(model, *inputs, loss_inputs=None):
    """Forward, loss (on loss_inputs if given), backward; the loss and the gradients."""
    model.zero_grad()
    y = model(*inputs)
    loss = model.loss(*(loss_inputs if loss_inputs is not None else inputs), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("forwards", [1, 3], ids=["first-forward", "replayed-forwards"])
def test_one_encoder_call_and_the_same_numbers(forwards):
    model = conv_model()
    twin = copy.deepcopy(model)
    for i in range(forwards):
        x = images(i)
        with conv_calls() as calls:
            loss, grads = step(model, x)
        # The twin's loss gets a copy of x: it encodes again, as the original library does.
        with conv_calls() as twin_calls:
            twin_loss, twin_grads = step(twin, x, loss_inputs=(x.clone(),))
        assert calls == [True], calls
        assert len(twin_calls) == 2, twin_calls
        assert torch.equal(loss, twin_loss)
        for g, h in zip(grads, twin_grads):
            assert torch.equal(g, h)


def test_supervised_model_with_class_indices():
    torch.manual_seed(4)
    model = SupervisedSimilarityMatching(
        nn.Conv2d(1, 6, 3, bias=False, dtype=torch.float64), 3, 6, iteration_projection=nn.ReLU(), max_iterations=10
    ).double()
    twin = copy.deepcopy(model)
    x, labels = images(1), torch.tensor([0, 2, 1, 1, 0])
    summed = SupervisedSimilarityMatching._sum
    for _ in range(2):
        with conv_calls() as calls, mock.patch("torch.nn.modules.linear.F.linear", wraps=nn.functional.linear) as lin, \
                mock.patch.object(SupervisedSimilarityMatching, "_sum", wraps=summed) as sums:
            loss, grads = step(model, x, labels)
        # The two codes are added once: the loss takes the forward's sum too.
        assert calls == [True] and lin.call_count == 1 and sums.call_count == 1
        with mock.patch.object(SupervisedSimilarityMatching, "_sum", wraps=summed) as twin_sums:
            twin_loss, twin_grads = step(twin, x, labels, loss_inputs=(x.clone(), labels.clone()))
        assert twin_sums.call_count == 2
        assert torch.equal(loss, twin_loss)
        for g, h in zip(grads, twin_grads):
            assert torch.equal(g, h)


def test_changed_input_or_parameters_encode_again():
    model = conv_model()
    x = images(2)
    y = model(x)
    x.mul_(0.5)  # in place, after the forward
    with conv_calls() as calls:
        loss = model.loss(x, y)
    assert calls == [True]
    fresh = copy.deepcopy(model)
    assert torch.equal(loss, fresh.loss(x.clone(), y))

    y = model(x)
    with torch.no_grad():
        model.encoder.weight.add_(0.01)
    with conv_calls() as calls:
        loss = model.loss(x, y)
    assert calls == [True]
    assert torch.equal(loss, copy.deepcopy(model).loss(x.clone(), y))


def test_a_second_loss_of_the_same_output_encodes_again_and_both_backpropagate():
    model = conv_model()
    x = images(3)
    y = model(x)
    with conv_calls() as calls:
        first = model.loss(x, y)
        second = model.loss(x, y)
    assert calls == [True]
    assert torch.equal(first, second)
    (first + second).backward()
    twice = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.loss(x, y).backward()
    for g, h in zip(twice, model.parameters()):
        assert torch.allclose(g, 2 * h.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "encoder, calls_per_step",
    [
        (lambda: nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.Dropout(0.2)), 2),
        (lambda: nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6)), 2),
        (lambda: nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.ReLU()), 1),
    ],
    ids=["dropout", "batchnorm", "conv-relu"],
)
def test_only_pure_encoders_are_kept(encoder, calls_per_step):
    model = conv_model(encoder().double())
    x = images(4)
    with conv_calls() as calls:
        step(model, x)
        step(model, x)
    assert len(calls) == 2 * calls_per_step
    if isinstance(model.encoder[1], nn.BatchNorm2d):
        # Both calls of each step update the running statistics, as in the original library.
        assert int(model.encoder[1].num_batches_tracked) == 4


def test_dropout_draws_as_the_original_library():
    # Forward and loss each draw their own mask: the loss equals one computed
    # by hand from the same generator state.
    model = conv_model(nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.Dropout(0.5)).double())
    x = images(5)
    torch.manual_seed(11)
    y = model(x)
    loss = model.loss(x, y)
    twin = copy.deepcopy(model)
    torch.manual_seed(11)
    with torch.no_grad():
        twin.encoder(x)  # the forward's draw
    assert torch.equal(loss, twin.loss(x, y))


def test_hooked_encoder_runs_twice():
    model = conv_model()
    seen = []
    model.encoder.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    x = images(6)
    step(model, x)
    step(model, x)
    assert seen == [False, True, False, True]


def test_no_grad_forward_keeps_nothing():
    model = conv_model()
    x = images(7)
    with torch.no_grad():
        y = model(x)
    assert "_kept_encoding" not in model.__dict__
    with conv_calls() as calls:
        model.loss(x, y).backward()
    assert calls == [True]


def test_copies_and_pickles_after_a_training_forward():
    model = conv_model()
    x = images(8)
    y = model(x)
    assert "_kept_encoding" in model.__dict__
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_kept_encoding" not in other.__dict__
        assert torch.equal(other.loss(x, y), copy.deepcopy(model).loss(x.clone(), y))
    # The model's own loss still uses its encoding.
    with conv_calls() as calls:
        model.loss(x, y).backward()
    assert calls == []


def test_the_encoding_is_freed_with_the_output_and_by_the_next_forward():
    model = conv_model()
    x = images(9)
    y = model(x)
    assert "_kept_encoding" in model.__dict__
    del y
    gc.collect()
    assert "_kept_encoding" not in model.__dict__
    y = model(x)
    kept = model.__dict__["_kept_encoding"]
    y2 = model(x)
    assert model.__dict__["_kept_encoding"] is not kept
    with conv_calls() as calls:
        model.loss(x, y)  # the earlier output: encoded again
        model.loss(x, y2)
    assert calls == [True]


def test_torch_func_over_the_loss():
    model = conv_model()
    x = images(10)
    y = model(x)
    g = torch.func.grad(lambda t: model.loss(x, t))(y)
    y_leaf = y.clone().requires_grad_(True)
    model.loss(x, y_leaf).backward()
    assert torch.allclose(g, y_leaf.grad, rtol=1e-12, atol=1e-15)


def test_small_inputs_are_encoded_again(monkeypatch):
    monkeypatch.setattr(torchiter.models, "_KEEP_MIN_NUMEL", 496)
    model = conv_model()
    x = images(11)  # 495 elements
    with conv_calls() as calls:
        step(model, x)
    assert calls == [False, True]
    x = images(11, batch=6)
    with conv_calls() as calls:
        step(model, x)
    assert calls == [True]


def test_a_replaced_encoding_is_freed_without_the_garbage_collector():
    # Nothing may hold a kept encoding in a reference cycle: its graph and
    # outputs (a conv layer's: megabytes) would wait for a collection.
    import weakref

    model = conv_model()
    x = images(12)
    gc.collect()
    gc.disable()
    try:
        y = model(x)
        encoded = weakref.ref(model.__dict__["_kept_encoding"].Wx[0])
        y2 = model(x)  # replaces it while y is still alive
        assert encoded() is None
        encoded = weakref.ref(model.__dict__["_kept_encoding"].Wx[0])
        del y2
        assert encoded() is None
    finally:
        gc.enable()
    assert y is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_forward_output_is_the_same_with_a_kept_encoding(dtype):
    # The kept encoding is computed with autograd recording, the plain one
    # without: the loop must see the same values either way.
    model = conv_model().to(dtype)
    x = images(13, batch=7).to(dtype)
    kept = model(x)
    assert "_kept_encoding" in model.__dict__
    with torch.no_grad():
        plain = model(x)
    assert torch.equal(kept, plain)
