"""The paper's CNN, layer for layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medpipe.nets.paper_cnn import PaperCNN


def test_layers_match_the_paper() -> None:
    net = PaperCNN()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (4, 4)), (16, (4, 4)), (32, (4, 4)), (16, (3, 3))]
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 2
    # 128 -> 125 -> 122 -> pool 61 -> 58 -> 56 -> pool 28: Flatten 16*28*28 -> Dense 1
    assert net.classifier.in_features == 16 * 28 * 28 and net.classifier.out_features == 1


def test_forward_shape_and_size_check() -> None:
    net = PaperCNN()
    assert net(torch.rand(3, 1, 128, 128)).shape == (3, 1)
    with pytest.raises(ValueError, match="expects 128x128"):
        net(torch.rand(1, 1, 64, 64))


def test_keras_init_is_glorot_uniform_with_zero_biases() -> None:
    """The default init is Keras's (the paper's framework): weights within the Glorot bound, filling it, biases 0."""
    torch.manual_seed(0)
    for layer in (m for m in PaperCNN().modules() if isinstance(m, (nn.Conv2d, nn.Linear))):
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.9 * bound
        assert torch.count_nonzero(layer.bias) == 0


def test_torch_init_differs_and_unknown_init_fails() -> None:
    torch.manual_seed(0)
    dense = PaperCNN(init="torch").classifier
    assert torch.count_nonzero(dense.bias) > 0  # PyTorch draws biases; Keras zeroes them
    with pytest.raises(ValueError, match="'keras' or 'torch'"):
        PaperCNN(init="glorot")
