"""The survey paper's brain-tumour CNN."""

from __future__ import annotations

import torch
from torch import nn


class PaperCNN(nn.Module):
    """The paper's custom CNN, layer for layer (Keras 'valid' padding, ReLU):

    Conv 32@4x4 -> Conv 16@4x4 -> MaxPool 2 -> Conv 32@4x4 -> Conv 16@3x3 -> MaxPool 2 -> Flatten -> Dense.
    It returns logits; the paper's final sigmoid lives in the loss (BCEWithLogits) and the post-processing.
    freeze_features: train only the Dense layer (the conv stack keeps its pretrained weights), the paper's frozen-base
    transfer mode applied to its own CNN.
    init: "keras" (default) starts from the paper's framework's defaults, Glorot-uniform weights and zero biases;
    "torch" keeps PyTorch's, whose weights are 0.4-0.7x as large in every layer after the first, so the signal
    shrinks through this normalisation-free stack and training is slower to fit.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        image_size: int = 128,
        freeze_features: bool = False,
        init: str = "keras",
    ) -> None:
        super().__init__()
        self.image_size = int(image_size)
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
        if init == "keras":
            for layer in self.modules():
                if isinstance(layer, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)
        elif init != "torch":
            raise ValueError(f"PaperCNN init must be 'keras' or 'torch', got '{init}'")
        self.features.requires_grad_(not freeze_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compared side by side (not as a shape tuple) so that torch.jit.script compiles it: MONAI's ckpt_export
        # scripts `network_def` by default
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            size = self.image_size
            raise ValueError(f"PaperCNN expects {size}x{size} input, got {x.shape[-2]}x{x.shape[-1]}")
        return self.classifier(torch.flatten(self.features(x), 1))
