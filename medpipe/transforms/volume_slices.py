"""The axial slices of 3-D HU volumes (nnU-Net / MSD layouts, medpipe.data.layouts) as 2.5-D training and evaluation
inputs, and the HU normalisation fitted on them.

An item names a case's volume files and one slice (`slice`); the reader cuts that slice and its `context_slices`
neighbours from the volume (medpipe.transforms.slice_context.stack_context, ends repeated) after the volume went
through exactly what volumetric inference does with it (medpipe.transforms.ct_intensity.hu_model_slices: nnU-Net's CT
normalisation, display orientation, in-plane resampling to the model's grid), and the label slice with the same
resampling (nearest) after the table `label_classes` turned label values into the bundle's classes. A prepared volume
is kept while its slices are read one after another (CacheDataset reads items in order), so each volume is read once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpipe.errors import MedpipeError
from medpipe.io import ct
from medpipe.io.dicom import Volume
from medpipe.transforms.ct_intensity import (
    NORMALISATION_SCHEME,
    channel_scheme,
    check_axial_ct,
    fit_ct_normalisation,
    foreground_samples,
    hu_model_slices,
    is_hounsfield,
    per_volume_figures,
    read_normalisation,
)
from medpipe.transforms.slice_context import VOLUME_SLICE_KEY, check_context_slices, stack_context

# the item keys and layout name medpipe.data.layouts writes (data and transforms never import each other)
CLASSES_KEY = "label_classes"
CHANNEL_KEY = "channel"  # the data set's name of the image channel (nnU-Net's channel_names, MSD's modality)
PNG_LAYOUT = "png"


def _class_map(label: Volume, table: Mapping[str, int], path: str) -> np.ndarray:
    """The label volume's values turned into the bundle's class indexes (uint8) by `table`."""
    values = np.rint(np.asarray(label.array, dtype=np.float64)).astype(np.int64)
    lookup = np.zeros(max(int(values.max(initial=0)), max(map(int, table), default=0)) + 1, dtype=np.uint8)
    for value, index in table.items():
        lookup[int(value)] = int(index)
    unknown = sorted(set(np.unique(values).tolist()) - {int(v) for v in table} - {0})
    if values.min(initial=0) < 0 or unknown:
        raise MedpipeError(f"{path}: label values {unknown[:5]} have no class (the data set changed since its check?)")
    return lookup[values]


def read_case(
    image: str, label: str, table: Mapping[str, int], hounsfield: bool = True
) -> tuple[Volume, np.ndarray]:
    """(the CT volume, checked axial and, when `hounsfield`, in HU; its label as class indexes on the same grid)."""
    volume = ct.load_volume(image)
    check_axial_ct(volume, image, hounsfield)
    return volume, _class_map(ct.load_label(label, volume), table, label)


def _cases(items: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, tuple[tuple[str, int], ...]]]:
    """The distinct (image, label, class table) of the volume items, in order of first appearance."""
    seen: dict[tuple, None] = {}
    for item in items:
        if VOLUME_SLICE_KEY in item:
            seen.setdefault((str(item["image"]), str(item["label"]), tuple(sorted(item[CLASSES_KEY].items()))))
    return list(seen)


def fit_normalisation(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """nnU-Net's normalisation for the items' channel: for CT the figures from the training cases among `items` (the
    foreground is every voxel of a bundle class, label class > 0, 10,000 voxels sampled per case as nnU-Net samples
    them); for another channel name its per-volume scheme (medpipe.transforms.ct_intensity.channel_scheme)."""
    cases = _cases(items)
    if not cases:
        raise MedpipeError("HU normalisation: no volume among the training items to fit it on")
    channels = sorted({str(item.get(CHANNEL_KEY, "CT")) for item in items if VOLUME_SLICE_KEY in item})
    if len(channels) != 1:
        raise MedpipeError(f"volume normalisation: the training items name channels {channels}; one is expected")
    scheme = channel_scheme(channels[0])
    if scheme != NORMALISATION_SCHEME:
        return per_volume_figures(scheme, channels[0], len(cases))
    samples = []
    for image, label, table in cases:
        volume, classes = read_case(image, label, dict(table))
        samples.append(foreground_samples(volume.array, classes > 0))
    return fit_ct_normalisation(samples, len(cases))


def stored_normalisation(path: str | Path, layout: str) -> dict[str, Any] | None:
    """The figures stored beside a checkpoint, for evaluating it on `layout`: a volume layout needs them, the PNG
    slices must not have them (the model would be read with another input than it was trained on)."""
    figures = read_normalisation(path)
    if layout == PNG_LAYOUT and figures is not None:
        raise MedpipeError(f"{path}: this model was trained on volumes; evaluate it on a volume layout (nnU-Net, "
                           "MSD) as it was trained, not on the 8-bit PNG slices")  # fmt: skip
    if layout != PNG_LAYOUT and figures is None:
        raise MedpipeError(f"'{path}' not found: the checkpoint was not trained on HU volumes (or its HU "
                           "normalisation file was not kept beside it), so it cannot read this volume layout")
    return figures


class VolumeSliceReader:
    """Cut items' slices from their volumes: (context_slices, image_size, image_size) float32 images and
    (1, image_size, image_size) uint8 class labels, with nnU-Net's CT normalisation `normalisation`."""

    def __init__(
        self, image_size: int, context_slices: int, normalisation: Mapping[str, Any] | None, keep: int = 2
    ) -> None:
        if normalisation is None:
            raise MedpipeError("volume slices need HU normalisation figures (fitted on training, or stored beside "
                               "the checkpoint)")  # fmt: skip
        self.image_size, self.context_slices = int(image_size), check_context_slices(context_slices)
        self.normalisation, self.keep = dict(normalisation), int(keep)
        self.hounsfield = is_hounsfield(self.normalisation)
        self._prepared: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()  # CacheDataset may fill its cache from a thread pool

    def volume(self, image: str, label: str, table: Mapping[str, int]) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W) model-input slices and (N, H, W) class slices of one case, prepared once."""
        key = (image, label, tuple(sorted(table.items())))
        with self._lock:
            if key in self._prepared:
                self._prepared.move_to_end(key)
                return self._prepared[key]
            volume, classes = read_case(image, label, table, self.hounsfield)
            slices = hu_model_slices(volume, self.normalisation, self.image_size)
            labels = ct.display_slices(classes, volume.affine, size=self.image_size, mode="nearest-exact")
            self._prepared[key] = (slices, np.rint(labels).astype(np.uint8))
            while len(self._prepared) > self.keep:
                self._prepared.popitem(last=False)
            return self._prepared[key]

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        """The item with `image` and `label` replaced by its slice's tensors (its class table dropped)."""
        out = dict(item)
        out.pop(CHANNEL_KEY, None)
        slices, labels = self.volume(str(out["image"]), str(out["label"]), out.pop(CLASSES_KEY))
        k = int(out[VOLUME_SLICE_KEY])
        if not 0 <= k < len(slices):
            raise MedpipeError(f"{out['image']}: slice {k} of a volume of {len(slices)} axial slices")
        image = stack_context(slices, self.context_slices, np.array([k]))[0]
        out["image"] = torch.from_numpy(np.ascontiguousarray(image))
        out["label"] = torch.from_numpy(labels[k][None].copy())  # a copy: later transforms must not touch the cache
        return out
