"""The shipped MNIST classifier: small, loads from the package alone, trained (recognises drawn digits)."""

import torch

from cm_lightning.nets.mnist_classifier import WEIGHTS, MNISTClassifier


def drawn(strokes: list[tuple[slice, slice]]) -> torch.Tensor:
    x = torch.full((1, 1, 32, 32), -1.0)
    for rows, cols in strokes:
        x[0, 0, rows, cols] = 1.0
    return x


def test_weights_ship_small_and_load_weights_only():
    assert WEIGHTS.is_file() and WEIGHTS.stat().st_size < 2_000_000
    model = MNISTClassifier.pretrained()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.zeros(3, 1, 32, 32)).shape == (3, MNISTClassifier.num_features)


def test_pretrained_classifier_reads_drawn_digits():
    model = MNISTClassifier.pretrained()
    one = drawn([(slice(8, 24), slice(15, 17))])
    seven = drawn([(slice(8, 10), slice(10, 22)), (slice(8, 24), slice(20, 22))])
    with torch.no_grad():
        assert model.logits(torch.cat([one, seven])).argmax(1).tolist() == [1, 7]
    assert model.logits(one).softmax(1).max() > 0.9  # an untrained net would sit near 0.1
