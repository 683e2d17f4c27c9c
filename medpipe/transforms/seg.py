"""2-D segmentation pieces for the bundles: checked image/label loading, CLAHE, resizing predictions back to the
label grid, and the ignite handler that writes metrics.json and the per-slice / per-volume CSVs."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from monai.transforms import MapTransform, Randomizable

from medpipe.errors import MedpipeError
from medpipe.io.images import load_grey_2d
from medpipe.transforms.infection_free import PIXELS_KEY
from medpipe.transforms.slice_context import VOLUME_SLICE_KEY

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------- loading


def load_label_2d(path: str | Path) -> np.ndarray:
    """A 2-D label map (PNG/TIFF/BMP of integer values) as an int64 (rows, cols) array, values untouched."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MedpipeError(f"cannot read label '{path}': {exc}") from exc
    if array.ndim != 2:
        raise MedpipeError(f"label '{path}' must be a single-channel label map, got shape {array.shape}")
    return array.astype(np.int64)


class LoadSegSliced(MapTransform):
    """Load an image (grey, [0, 1]) and its label map as (1, H, W) tensors, and check that they belong together.

    Refuses, in one line naming the file: an image and label of different sizes, and label values that are not
    classes 0..num_classes-1 (a 0/255 mask given where 0/1/2 is expected, say). An item with a `context` list
    (medpipe.transforms.slice_context) loads those slices as the channels instead: (k, H, W), the slice in the middle.
    An item cut from a 3-D volume (medpipe.data.layouts) is read by `volumes`, a
    medpipe.transforms.volume_slices.VolumeSliceReader: the same tensors, at the model's size already.
    """

    def __init__(
        self, num_classes: int, image_key: str = "image", label_key: str = "label", context_key: str = "context",
        volumes: Any = None,
    ) -> None:  # fmt: skip
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.num_classes, self.image_key, self.label_key = num_classes, image_key, label_key
        self.context_key, self.volumes = context_key, volumes

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if VOLUME_SLICE_KEY in out:
            if self.volumes is None:
                raise MedpipeError(f"'{out[self.image_key]}': a volume slice, but this loader reads 2-D slices only")
            return self.volumes(out)
        if PIXELS_KEY in out:  # an infection-free slice, already in model intensities (transforms.infection_free)
            out[self.image_key] = torch.as_tensor(np.asarray(out.pop(PIXELS_KEY), dtype=np.float32))
            out[self.label_key] = torch.as_tensor(np.asarray(out[self.label_key], dtype=np.uint8))
            return out
        image = load_grey_2d(str(out[self.image_key]))
        channels = [image]
        if out.get(self.context_key):
            channels = [
                load_grey_2d(str(p)) if str(p) != str(out[self.image_key]) else image for p in out.pop(self.context_key)
            ]
            for path, channel in zip(data[self.context_key], channels, strict=True):
                if channel.shape != image.shape:
                    raise MedpipeError(f"context slice '{path}' is {channel.shape}, its slice is {image.shape}")
        out[self.image_key] = torch.from_numpy(np.stack(channels))
        if self.label_key in out:
            path = str(out[self.label_key])
            label = load_label_2d(path)
            if label.shape != image.shape:
                image_path = data[self.image_key]
                raise MedpipeError(f"label '{path}' is {label.shape}, its image '{image_path}' is {image.shape}")
            bad = sorted(set(np.unique(label).tolist()) - set(range(self.num_classes)))
            if bad:
                raise MedpipeError(f"label '{path}' has values {bad[:5]} outside the classes 0..{self.num_classes - 1}")
            out[self.label_key] = torch.from_numpy(label[None].astype(np.uint8))
        return out


class MatchSized(MapTransform):
    """Resize predictions (C, h, w) to the spatial size of `ref_key` (e.g. the native-size label) before scoring."""

    def __init__(self, keys: str | Sequence[str], ref_key: str = "label", mode: str = "bilinear") -> None:
        super().__init__(keys)
        self.ref_key, self.mode = ref_key, mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        size = tuple(out[self.ref_key].shape[-2:])
        for key in self.key_iterator(out):
            pred = torch.as_tensor(out[key])
            if tuple(pred.shape[-2:]) != size:
                align = False if self.mode in ("bilinear", "bicubic") else None
                out[key] = F.interpolate(pred[None].float(), size=size, mode=self.mode, align_corners=align)[0]
        return out


def clahe(images: np.ndarray, clip_limit: float = 7.0, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of uint8 images (N, H, W) or (H, W), OpenCV's algorithm.

    Same steps as `cv2.createCLAHE(clipLimit, (tiles, tiles)).apply`: 256-bin histograms per tile clipped at
    clip_limit x (tile area / 256), the excess spread over all bins, per-tile lookup tables blended bilinearly
    between tile centres. The COVID CT slices were made with clipLimit 7 and 8x8 tiles, so volumes get the same.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise ValueError(f"clahe needs uint8 images, got {array.dtype}")
    single = array.ndim == 2
    batch = array[None] if single else array
    n, height, width = batch.shape
    pad_h, pad_w = -height % tiles, -width % tiles  # OpenCV pads to whole tiles with reflect-101 borders
    padded = np.pad(batch, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect") if pad_h or pad_w else batch
    tile_h, tile_w = padded.shape[1] // tiles, padded.shape[2] // tiles
    area = tile_h * tile_w
    # one histogram per (image, tile row, tile col)
    blocks = padded.reshape(n, tiles, tile_h, tiles, tile_w).transpose(0, 1, 3, 2, 4).reshape(-1, area)
    offsets = (np.arange(blocks.shape[0]) * 256)[:, None]
    hist = np.bincount((blocks.astype(np.int64) + offsets).ravel(), minlength=blocks.shape[0] * 256)
    hist = hist.reshape(-1, 256)
    limit = max(int(clip_limit * area / 256), 1)
    excess = np.maximum(hist - limit, 0).sum(axis=1)
    hist = np.minimum(hist, limit) + (excess // 256)[:, None]
    residual = excess % 256  # the last few counts go to every (256 // residual)-th bin, as OpenCV does
    step = np.maximum(256 // np.maximum(residual, 1), 1)[:, None]
    bins = np.arange(256)[None]
    hist += ((bins % step == 0) & (bins // step < residual[:, None])).astype(hist.dtype)
    # float32 arithmetic throughout, as OpenCV computes it, so results match cv2 bit for bit
    scale = np.float32(255.0) / np.float32(area)
    lut = np.clip(np.rint(np.cumsum(hist, axis=1).astype(np.float32) * scale), 0, 255).astype(np.float32)
    lut = lut.reshape(n, tiles, tiles, 256)
    # bilinear blend of the four nearest tiles' LUTs (tile centres at (t + 0.5) * tile size)
    f32 = np.float32
    ty = np.arange(height, dtype=f32) * (f32(1) / f32(tile_h)) - f32(0.5)
    tx = np.arange(width, dtype=f32) * (f32(1) / f32(tile_w)) - f32(0.5)
    y1, x1 = np.floor(ty).astype(int), np.floor(tx).astype(int)
    wy, wx = (ty - y1).astype(f32)[:, None], (tx - x1).astype(f32)[None, :]
    y2, x2 = np.minimum(y1 + 1, tiles - 1), np.minimum(x1 + 1, tiles - 1)
    y1, x1 = np.maximum(y1, 0), np.maximum(x1, 0)
    out = np.empty((n, height, width), dtype=np.uint8)
    for i in range(n):
        img, table = batch[i].astype(np.int64), lut[i]
        top = table[y1[:, None], x1[None, :], img] * (f32(1) - wx) + table[y1[:, None], x2[None, :], img] * wx
        bottom = table[y2[:, None], x1[None, :], img] * (f32(1) - wx) + table[y2[:, None], x2[None, :], img] * wx
        out[i] = np.clip(np.rint(top * (f32(1) - wy) + bottom * wy), 0, 255)
    return out[0] if single else out


class RandReverseContextd(Randomizable, MapTransform):
    """Reverse the order of the context channels (k neighbouring slices) with probability `prob`.

    Training slices and volumes need not run in the same head-foot direction; seeing both orders makes the model
    indifferent to it.
    """

    def __init__(self, keys: str | Sequence[str] = "image", prob: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        self.prob = prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        if self.R.random_sample() < self.prob:
            for key in self.key_iterator(out):
                out[key] = torch.flip(torch.as_tensor(out[key]), dims=(0,))
        return out


class PatchSampled(Randomizable, MapTransform):
    """Random square patches of `patch_size` from each (native-size) slice, centred on a voxel of class c with
    probability class_ratios[c] (nnU-Net-style foreground oversampling, MONAI's RandCropByLabelClassesd). A slice
    with no voxel of any class (an infection-free slice, labelled NO_INFECTION only) gets a uniformly placed patch.
    Returns a list of one item, as RandCropByLabelClassesd does."""

    def __init__(
        self, patch_size: int, class_ratios: Sequence[float], num_classes: int, keys: Sequence[str] = ("image", "label")
    ) -> None:
        from monai.transforms import RandCropByLabelClassesd, RandSpatialCropd

        MapTransform.__init__(self, list(keys))
        self.label_key, self.num_classes = keys[-1], int(num_classes)
        size = [int(patch_size)] * 2
        self.by_class = RandCropByLabelClassesd(
            keys=list(keys), label_key=self.label_key, spatial_size=size, ratios=list(class_ratios),
            num_classes=self.num_classes, num_samples=1, allow_smaller=True, warn=False,
        )  # fmt: skip
        self.uniform = RandSpatialCropd(keys=list(keys), roi_size=size, random_size=False)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> PatchSampled:
        super().set_random_state(seed, state)
        self.by_class.set_random_state(seed, state)  # labelled slices draw exactly as RandCropByLabelClassesd alone
        self.uniform.set_random_state(seed=None if seed is None else seed + 1, state=state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        label = torch.as_tensor(data[self.label_key])
        if bool((label < self.num_classes).any()):
            return list(self.by_class(data))
        return [self.uniform(data)]


def patch_sampling(
    patch_size: int, class_ratios: Sequence[float], num_classes: int, keys: Sequence[str] = ("image", "label")
) -> list[Any]:
    """[PatchSampled(...)] for the training chain; patch_size 0: whole slices, an empty list."""
    if int(patch_size) <= 0:
        return []
    if len(class_ratios) != num_classes or min(class_ratios) < 0 or sum(class_ratios) <= 0:
        raise MedpipeError(f"patch_class_ratios needs {num_classes} non-negative weights, got {list(class_ratios)}")
    return [PatchSampled(patch_size, class_ratios, num_classes, keys)]
