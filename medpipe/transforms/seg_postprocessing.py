"""Post-processing of segmentation label maps, applied the same way at CV scoring and at volumetric inference.

Small infection components become lung: infection lies inside the lung (label 1 = lung without infection), so
relabelling keeps the lung mask (labels >= 1) exactly as it was: post-processing never removes lung. Components
are 2-D (8-connected, per axial slice) because the development slices have no spacing and gaps between slices;
their size is a fraction of the slice's area, so a 256² training slice and a 512² DICOM slice of the same field
of view drop the same lesions. Whether to use it, and the size, is chosen by cross-validation
(medpipe.evaluation.postprocessing_choice), as nnU-Net's `determine_postprocessing` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from medpipe.errors import MedpipeError

INFECTION, LUNG = 2, 1


def check_fraction(min_fraction: Any) -> float:
    """A component-size threshold as a float in [0, 1): the fraction of a slice's area (0: off)."""
    try:
        value = float(min_fraction)
    except (TypeError, ValueError) as exc:
        raise MedpipeError(f"min_infection_fraction {min_fraction!r}: give a number in [0, 1), e.g. 0.0005") from exc
    if not 0.0 <= value < 1.0:
        raise MedpipeError(f"min_infection_fraction {value}: must be in [0, 1) (a fraction of the slice area; 0 = off)")
    return value


def relabel_small_components(
    labels: np.ndarray, min_fraction: float, label: int = INFECTION, into: int = LUNG, axis: int = 0
) -> np.ndarray:
    """`labels` (H, W) or a stack of slices along `axis`, with every 8-connected 2-D component of `label` smaller
    than `min_fraction` of the slice area set to `into`. Returns the input itself when nothing changes."""
    from scipy import ndimage

    min_fraction = check_fraction(min_fraction)
    array = np.asarray(labels)
    if min_fraction == 0.0 or not (array == label).any():
        return labels
    stack = array[None] if array.ndim == 2 else np.moveaxis(array, axis, 0)
    min_pixels = min_fraction * stack.shape[1] * stack.shape[2]
    out = stack.copy()
    structure = np.ones((3, 3), dtype=bool)
    for k, plane in enumerate(stack):
        target = plane == label
        if not target.any():
            continue
        components, count = ndimage.label(target, structure=structure)
        small = np.bincount(components.ravel(), minlength=count + 1) < min_pixels
        small[0] = False
        out[k][small[components]] = into
    return out[0] if array.ndim == 2 else np.moveaxis(out, 0, axis)


class RelabelSmallComponentsd(MapTransform):
    """Dict transform of `relabel_small_components` for (1, H, W) or (H, W) label-map tensors (after argmax)."""

    def __init__(
        self, keys: str | Sequence[str], min_fraction: float, label: int = INFECTION, into: int = LUNG
    ) -> None:
        super().__init__(keys)
        self.min_fraction, self.label, self.into = check_fraction(min_fraction), label, into

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if self.min_fraction == 0.0:
            return out
        for key in self.key_iterator(out):
            tensor = torch.as_tensor(out[key])
            plane = tensor.detach().cpu().numpy().reshape(tensor.shape[-2:])
            fixed = relabel_small_components(plane, self.min_fraction, self.label, self.into)
            if fixed is not plane:
                out[key] = torch.as_tensor(fixed.reshape(tensor.shape), dtype=tensor.dtype)
        return out
