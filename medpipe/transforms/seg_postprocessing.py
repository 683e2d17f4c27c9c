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


class _PlaneFixd(MapTransform):
    """A dict transform applying `fix` (a (H, W) label map -> the same array when nothing changes, else a new one) to
    (1, H, W) or (H, W) label-map tensors (after argmax); `off`: pass the data through untouched."""

    off = False

    def fix(self, plane: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if self.off:
            return out
        for key in self.key_iterator(out):
            tensor = torch.as_tensor(out[key])
            plane = tensor.detach().cpu().numpy().reshape(tensor.shape[-2:])
            fixed = self.fix(plane)
            if fixed is not plane:
                out[key] = torch.as_tensor(fixed.reshape(tensor.shape), dtype=tensor.dtype)
        return out


class RelabelSmallComponentsd(_PlaneFixd):
    """Dict transform of `relabel_small_components` for (1, H, W) or (H, W) label-map tensors (after argmax)."""

    def __init__(
        self, keys: str | Sequence[str], min_fraction: float, label: int = INFECTION, into: int = LUNG
    ) -> None:
        super().__init__(keys)
        self.min_fraction, self.label, self.into = check_fraction(min_fraction), label, into
        self.off = self.min_fraction == 0.0

    def fix(self, plane: np.ndarray) -> np.ndarray:
        return relabel_small_components(plane, self.min_fraction, self.label, self.into)


def check_lung_fraction(value: Any) -> float:
    """The slice gate's threshold as a float in [0, 1]: infection pixels / lung pixels of a slice (0: off)."""
    try:
        fraction = float(value)
    except (TypeError, ValueError) as exc:
        raise MedpipeError(f"min_infection_lung_fraction {value!r}: give a number in [0, 1], e.g. 0.02") from exc
    if not 0.0 <= fraction <= 1.0:
        raise MedpipeError(f"min_infection_lung_fraction {fraction}: must be in [0, 1] (infection / lung per slice)")
    return fraction


def slice_infection_fractions(labels: np.ndarray, axis: int = 0) -> np.ndarray:
    """Per slice along `axis` of a label stack (or one (H, W) slice): infection pixels / lung pixels (labels >= 1);
    0 on a slice without lung. Unitless, so the 2-D development slices (no spacing) and DICOM volumes compare."""
    array = np.asarray(labels)
    stack = array[None] if array.ndim == 2 else np.moveaxis(array, axis, 0)
    lung = (stack >= LUNG).sum(axis=(1, 2)).astype(np.float64)
    infection = (stack == INFECTION).sum(axis=(1, 2)).astype(np.float64)
    return np.divide(infection, lung, out=np.zeros_like(lung), where=lung > 0)


def gate_infection_slices(labels: np.ndarray, min_lung_fraction: float, axis: int = 0) -> np.ndarray:
    """The slice gate: on every slice whose infection is under `min_lung_fraction` of its lung, infection becomes
    lung (the lung mask is unchanged). Off by default: with the default model no threshold told false infection on
    infection-free series from true infection (results log §10); for a model and series where one does. Returns the
    input itself when nothing changes."""
    threshold = check_lung_fraction(min_lung_fraction)
    array = np.asarray(labels)
    if threshold == 0.0 or not (array == INFECTION).any():
        return labels
    fractions = slice_infection_fractions(array, axis)
    weak = (fractions > 0) & (fractions < threshold)
    if not weak.any():
        return labels
    stack = (array[None] if array.ndim == 2 else np.moveaxis(array, axis, 0)).copy()
    planes = stack[weak]
    planes[planes == INFECTION] = LUNG
    stack[weak] = planes
    return stack[0] if array.ndim == 2 else np.moveaxis(stack, 0, axis)


class GateInfectionSliced(_PlaneFixd):
    """Dict transform of `gate_infection_slices` for one (1, H, W) or (H, W) label-map slice (after argmax)."""

    def __init__(self, keys: str | Sequence[str], min_lung_fraction: float) -> None:
        super().__init__(keys)
        self.min_lung_fraction = check_lung_fraction(min_lung_fraction)
        self.off = self.min_lung_fraction == 0.0

    def fix(self, plane: np.ndarray) -> np.ndarray:
        return gate_infection_slices(plane, self.min_lung_fraction)


# soft tissue, fat, skin and bone are above this HU; air and lung below it (as ct_intensity.MAX_MIN_HU)
BODY_HU = -500.0
# below any air or tissue: the padding outside a reconstruction's circular field of view (-2048, -3024), no image
PADDING_HU = -1500.0


def patient_region(hu: np.ndarray, axis: int = 2) -> np.ndarray:
    """Boolean mask, shaped like `hu`, of the patient's cross-section on each axial slice (slices along `axis`): the
    convex hull of the slice's largest piece of tissue (HU > BODY_HU) after an opening that cuts thin attachments
    (table, cables). A hull, not the filled outline: when a targeted reconstruction's field of view cuts through the
    chest, the outline is open where the lung meets the field's edge, but the hull still spans the lung; air around
    the patient and the table lie outside it."""
    from scipy import ndimage
    from scipy.spatial import ConvexHull, QhullError

    stack = np.moveaxis(np.asarray(hu), axis, 0)
    out = np.zeros(stack.shape, dtype=bool)
    rows = np.arange(stack.shape[1], dtype=np.float64)[:, None]
    cols = np.arange(stack.shape[2])[None, :]
    step = max(1, min(stack.shape[1:]) // 256)  # the outline on a ≤ 2x coarser grid: 4x faster, hull as good
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)  # slice by slice, in one call for the whole stack
    tissue = ndimage.binary_opening(stack[:, ::step, ::step] > BODY_HU, in_plane, iterations=max(1, 2 // step))
    pieces, _ = ndimage.label(tissue, in_plane)
    for k, plane in enumerate(pieces):
        sizes = np.bincount(plane.ravel())
        if len(sizes) < 2:
            continue  # no tissue on this slice: nothing is inside the patient
        body = plane == int(np.argmax(sizes[1:])) + 1
        # the hull of the body is the hull of each row's two outermost pixels: ≤ 2 x rows points for Qhull
        filled = np.flatnonzero(body.any(axis=1))
        first = body.argmax(axis=1)[filled]
        last = body.shape[1] - 1 - body[:, ::-1].argmax(axis=1)[filled]
        points = step * np.concatenate([np.stack([filled, first], 1), np.stack([filled, last], 1)]).astype(float)
        try:
            equations = ConvexHull(points).equations  # a*row + b*col + c <= 0 inside, per facet
        except QhullError:
            continue  # tissue on one line (a few pixels): no cross-section a lung could lie in
        a, b, c = (equations[:, i][None, :] for i in range(3))
        bound = -(c + a * rows) / np.where(b == 0, 1, b)  # per row and facet: the col limit that facet sets
        margin = step / 2 + 0.5  # half a coarse pixel, so the hull holds the outline's outer pixels
        low = np.max(np.where(b < 0, bound, -np.inf), axis=1, keepdims=True) - margin
        high = np.min(np.where(b > 0, bound, np.inf), axis=1, keepdims=True) + margin
        row_ok = np.all((b != 0) | (a * rows + c <= margin), axis=1, keepdims=True)  # facets parallel to the cols
        out[k] = row_ok & (cols >= low) & (cols <= high)
    return np.moveaxis(out, 0, axis)
