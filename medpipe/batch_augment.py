"""Random augmentation of a whole training batch at once, on the batch's device, as a trainer's `prepare_batch`.

Why: with MONAI's per-image random transforms in the data loader, the paper's small CNN spent more time on one
RandAffine per image than on its training step (2 CPU cores), and on a GPU the folds were bound by CPU workers. Here
every selected image of a batch is flipped, rotated, scaled and shifted by one `grid_sample` call and gamma-adjusted
in a few tensor ops. Per-image parameters are drawn like MONAI's RandFlipd / RandAffined / RandAdjustContrastd, from
torch's global generator (seeded by `set_determinism`), so runs repeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines.utils import default_prepare_batch


class BatchAugment:
    """`prepare_batch` for SupervisedTrainer: move the batch to `device`, then augment its images (N, C, H, W).

    flip_prob: chance of a left-right flip (the last axis) per image.
    affine_prob: chance of one random affine per image: rotation uniform in ±rotate_range (radians), isotropic scale
        1 + uniform ±scale_range, shift uniform ±translate_range pixels per axis; bilinear, zero padding.
    gamma_prob, gamma: chance and range of MONAI-style contrast change, min + range * ((x - min) / range) ** g.
    Labels pass through untouched: this is for image-level labels (classification).
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        affine_prob: float = 0.7,
        rotate_range: float = 0.26,
        scale_range: float = 0.1,
        translate_range: float = 8.0,
        gamma_prob: float = 0.3,
        gamma: Sequence[float] = (0.7, 1.5),
    ) -> None:
        for name, p in (("flip_prob", flip_prob), ("affine_prob", affine_prob), ("gamma_prob", gamma_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"BatchAugment: {name} must be in [0, 1], got {p}")
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"BatchAugment: gamma must be (low, high) with 0 < low <= high, got {gamma}")
        self.flip_prob, self.affine_prob, self.gamma_prob = flip_prob, affine_prob, gamma_prob
        self.rotate_range, self.scale_range, self.translate_range = rotate_range, scale_range, translate_range
        self.gamma = (float(gamma[0]), float(gamma[1]))

    def __call__(
        self, batchdata: Any, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        batch = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images, rest = batch[0], tuple(batch[1:])
        return (self.augment(images), *rest)

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"BatchAugment expects (N, C, H, W) images, got shape {tuple(images.shape)}")
        x = images.as_tensor() if hasattr(images, "as_tensor") else images  # plain tensor: no MetaTensor tracking
        x = x.float()
        # torch.where returns a new tensor, so the in-place writes below never touch the caller's batch
        x = torch.where(self._chosen(x, self.flip_prob)[:, None, None, None], x.flip(-1), x)
        picked = self._chosen(x, self.affine_prob).nonzero().flatten()
        if picked.numel():
            x[picked] = self._affine(x[picked])
        picked = self._chosen(x, self.gamma_prob).nonzero().flatten()
        if picked.numel():
            x[picked] = self._gamma(x[picked])
        return x

    @staticmethod
    def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(x.shape[0]).to(x.device) < p

    def _uniform(self, n: int, half_width: float, device: torch.device) -> torch.Tensor:
        return ((torch.rand(n) * 2 - 1) * half_width).to(device)

    def _affine(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        angle = self._uniform(n, self.rotate_range, x.device)
        scale = 1 + self._uniform(n, self.scale_range, x.device)
        # affine_grid works in [-1, 1] coordinates: a shift of t pixels is 2t / size
        shift = torch.stack([self._uniform(n, self.translate_range, x.device) * 2 / w,
                             self._uniform(n, self.translate_range, x.device) * 2 / h], 1)  # fmt: skip
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin * h / w, shift[:, 0]], 1),
                             torch.stack([sin * w / h, cos, shift[:, 1]], 1)], 1)  # fmt: skip
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        g = (self.gamma[0] + torch.rand(x.shape[0]) * (self.gamma[1] - self.gamma[0])).to(x.device)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - low
        scaled = ((x - low) / (span + 1e-7)).clamp_min(0) ** g[:, None, None, None]
        return scaled * span + low
