"""Crop a 2-D slice to its largest bright region (the head), padded to a square.

The brain MRI sets are screenshots and exports with very different framing: in the yes/no development set the
head's bounding box covers anywhere from a quarter to all of the picture, so after a plain resize the same anatomy
appears at very different scales. Cropping to the head first gives every image the same field of view; padding the
box to a square (with background zeros) keeps the head's aspect ratio through the resize that follows."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage


def largest_region_box(image: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right), bottom/right exclusive, of the largest connected region above `threshold`.

    `image` is one (rows, cols) channel scaled to [0, 1]. It is smoothed first (sigma 1 % of the short side) so
    that noise and thin text do not split or join regions. None when nothing exceeds the threshold.
    """
    sigma = max(1.0, 0.01 * min(image.shape))
    mask = ndimage.gaussian_filter(image.astype(np.float32), sigma) > threshold
    labels, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
    rows, cols = np.nonzero(labels == int(np.argmax(sizes)) + 1)
    return int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1


def square_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow `box` by `margin` (a fraction of its long side) on every side, then to a square about its centre."""
    top, bottom, left, right = box
    side = max(bottom - top, right - left)
    side = int(round(side * (1 + 2 * margin)))
    centre_row, centre_col = (top + bottom) // 2, (left + right) // 2
    top, left = centre_row - side // 2, centre_col - side // 2
    return top, top + side, left, left + side


def crop_square(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Cut `box` out of a (channels, rows, cols) tensor, zero-padding where the box leaves the image."""
    top, bottom, left, right = box
    _, rows, cols = image.shape
    out = image.new_zeros((image.shape[0], bottom - top, right - left))
    src_top, src_left = max(top, 0), max(left, 0)
    src_bottom, src_right = min(bottom, rows), min(right, cols)
    out[:, src_top - top : src_bottom - top, src_left - left : src_right - left] = image[
        :, src_top:src_bottom, src_left:src_right
    ]
    return out


class CropForegroundSquared(MapTransform):
    """MONAI dict transform: crop each (channels, rows, cols) image under `keys` to its head, squared.

    The box comes from the mean over channels; an image with no region above `threshold` passes unchanged.
    """

    def __init__(
        self,
        keys: str | Sequence[str],
        threshold: float = 0.1,
        margin: float = 0.02,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if margin < 0.0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.threshold = threshold
        self.margin = margin

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = torch.as_tensor(out[key])
            box = largest_region_box(image.float().mean(0).numpy(), self.threshold)
            if box is not None:
                out[key] = crop_square(image, square_box(box, self.margin))
        return out
