"""Networks MONAI lacks: the survey paper's brain-tumour CNN (and, later, pretrained backbones)."""

from __future__ import annotations

import torch
from torch import nn


class PaperCNN(nn.Module):
    """The paper's custom CNN, layer for layer (Keras 'valid' padding, ReLU):

    Conv 32@4x4 -> Conv 16@4x4 -> MaxPool 2 -> Conv 32@4x4 -> Conv 16@3x3 -> MaxPool 2 -> Flatten -> Dense.
    It returns logits; the paper's final sigmoid lives in the loss (BCEWithLogits) and the post-processing.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, image_size: int = 128) -> None:
        super().__init__()
        self.image_size = image_size
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 4), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 4), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 4), nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, 3), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )  # fmt: skip
        side = ((image_size - 3 - 3) // 2 - 3 - 2) // 2
        if side < 1:
            raise ValueError(f"PaperCNN needs image_size >= 16, got {image_size}")
        self.classifier = nn.Linear(16 * side * side, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"PaperCNN expects {self.image_size}x{self.image_size} input, got {tuple(x.shape[-2:])}")
        return self.classifier(torch.flatten(self.features(x), 1))
