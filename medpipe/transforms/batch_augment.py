"""Random augmentation of a whole training batch at once, on the batch's device, as a trainer's `prepare_batch`.

Why: with MONAI's per-image random transforms in the data loader, the paper's small CNN spent more time on one
RandAffine per image than on its training step (2 CPU cores), and GPU folds looked bound by their CPU loaders. Here
every selected image of a batch is flipped, rotated, scaled and shifted by one `grid_sample` call and gamma-adjusted
in a few tensor ops. Per-image parameters are drawn like MONAI's RandFlipd / RandAffined / RandAdjustContrastd, from
torch's global generator (seeded by `set_determinism`), so runs repeat."""

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
    spatial_label: False (classification): labels pass through untouched. True (segmentation): labels (N, 1, H, W)
        get the same flip and affine, sampled nearest-neighbour so label values stay exact; no gamma.
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
        spatial_label: bool = False,
    ) -> None:
        for name, p in (("flip_prob", flip_prob), ("affine_prob", affine_prob), ("gamma_prob", gamma_prob)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"BatchAugment: {name} must be in [0, 1], got {p}")
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"BatchAugment: gamma must be (low, high) with 0 < low <= high, got {gamma}")
        self.flip_prob, self.affine_prob, self.gamma_prob = flip_prob, affine_prob, gamma_prob
        self.rotate_range, self.scale_range, self.translate_range = rotate_range, scale_range, translate_range
        self.gamma = (float(gamma[0]), float(gamma[1]))
        self.spatial_label = spatial_label

    def __call__(
        self, batchdata: Any, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> Any:
        batch = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        images, labels, rest = batch[0], batch[1], tuple(batch[2:])
        if self.spatial_label and labels is not None:
            return (*self.augment(images, labels), *rest)
        return (self.augment(images), labels, *rest)

    def augment(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """Augmented images, or (images, labels) when `labels` (N, 1, H, W) are given to follow the same warp."""
        x = _plain(images, "images").float()
        y = None if labels is None else _plain(labels, "labels")
        if y is not None and (y.shape[0] != x.shape[0] or y.shape[-2:] != x.shape[-2:]):
            raise ValueError(f"BatchAugment: labels {tuple(y.shape)} do not match images {tuple(x.shape)}")
        # torch.where returns new tensors, so the in-place writes below never touch the caller's batch
        flip = self._chosen(x, self.flip_prob)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
        y = None if y is None else torch.where(flip, y.flip(-1), y)
        picked = self._chosen(x, self.affine_prob).nonzero().flatten()
        if picked.numel():
            grid = self._affine_grid(x[picked])
            x[picked] = F.grid_sample(x[picked], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if y is not None:
                warped = F.grid_sample(y[picked].float(), grid, mode="nearest", align_corners=False)
                y[picked] = warped.to(y.dtype)  # zero padding: background outside the image
        picked = self._chosen(x, self.gamma_prob).nonzero().flatten()
        if picked.numel():
            x[picked] = self._gamma(x[picked])
        return x if labels is None else (x, y)

    @staticmethod
    def _chosen(x: torch.Tensor, p: float) -> torch.Tensor:
        return torch.rand(x.shape[0]).to(x.device) < p

    def _uniform(self, n: int, half_width: float, device: torch.device) -> torch.Tensor:
        return ((torch.rand(n) * 2 - 1) * half_width).to(device)

    def _affine_grid(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        angle = self._uniform(n, self.rotate_range, x.device)
        scale = 1 + self._uniform(n, self.scale_range, x.device)
        # affine_grid works in [-1, 1] coordinates: a shift of t pixels is 2t / size
        shift = torch.stack([self._uniform(n, self.translate_range, x.device) * 2 / w,
                             self._uniform(n, self.translate_range, x.device) * 2 / h], 1)  # fmt: skip
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin * h / w, shift[:, 0]], 1),
                             torch.stack([sin * w / h, cos, shift[:, 1]], 1)], 1)  # fmt: skip
        return F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        g = (self.gamma[0] + torch.rand(x.shape[0]) * (self.gamma[1] - self.gamma[0])).to(x.device)
        low = x.amin(dim=(1, 2, 3), keepdim=True)
        span = x.amax(dim=(1, 2, 3), keepdim=True) - low
        scaled = ((x - low) / (span + 1e-7)).clamp_min(0) ** g[:, None, None, None]
        return scaled * span + low


def _plain(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim != 4:
        raise ValueError(f"BatchAugment expects (N, C, H, W) {what}, got shape {tuple(t.shape)}")
    return t.as_tensor() if hasattr(t, "as_tensor") else t  # a plain tensor: no MetaTensor tracking per op
