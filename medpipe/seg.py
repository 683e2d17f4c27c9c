"""2-D segmentation pieces for the bundles: checked image/label loading, CLAHE, resizing predictions back to the
label grid, and the ignite handler that writes metrics.json and the per-slice / per-volume CSVs.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from ignite.engine import Engine
from monai.transforms import MapTransform

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text
from medpipe.handlers import EpochCollector
from medpipe.imageio import load_grey_2d

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
    classes 0..num_classes-1 (a 0/255 mask given where 0/1/2 is expected, say).
    """

    def __init__(self, num_classes: int, image_key: str = "image", label_key: str = "label") -> None:
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.num_classes, self.image_key, self.label_key = num_classes, image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        out = dict(data)
        image = load_grey_2d(str(out[self.image_key]))
        out[self.image_key] = torch.from_numpy(image[None])
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


# ------------------------------------------------------------------------------------------------------------- CLAHE


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


# ----------------------------------------------------------------------------------------------------------- reports


def slice_statistics(
    pred: np.ndarray, true: np.ndarray, structures: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """Pixel counts and surface distances of each structure (a set of label values) for one slice."""
    from medpipe.metrics import surface_distances

    stats: dict[str, Any] = {}
    for name, values in structures.items():
        p, t = np.isin(pred, list(values)), np.isin(true, list(values))
        stats[f"{name}_inter"] = int(np.logical_and(p, t).sum())
        stats[f"{name}_pred"], stats[f"{name}_true"] = int(p.sum()), int(t.sum())
        stats[f"{name}_dist"] = surface_distances(p, t)
    return stats


def _rows_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    return buf.getvalue()


class SegmentationReport(EpochCollector):
    """Score every slice of one evaluator epoch and write metrics.json, per_slice.csv and per_volume.csv.

    `pred` must be a label map on the label's grid (see MatchSized + AsDiscreted(argmax)); `structures` maps a
    name to the label values it covers, e.g. {"lung": [1, 2], "infection": [2]}. Slices are grouped into volumes
    by `group_key` (volume_group).
    """

    def __init__(
        self,
        output_dir: str,
        structures: Mapping[str, Sequence[int]],
        n_boot: int = 1000,
        seed: int = 0,
        info: dict[str, Any] | None = None,
        pred_key: str = "pred",
        label_key: str = "label",
        path_key: str = "path",
        group_key: str = "volume_group",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.structures = {k: list(v) for k, v in structures.items()}
        self.n_boot, self.seed, self.info = n_boot, seed, info or {}
        self.pred_key, self.label_key, self.path_key, self.group_key = pred_key, label_key, path_key, group_key
        self.records: list[dict[str, Any]] = []  # one per slice: path, group and slice_statistics

    def _record(self, out: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
        pred = torch.as_tensor(out[self.pred_key]).detach().cpu().numpy().reshape(out[self.label_key].shape[-2:])
        true = torch.as_tensor(out[self.label_key]).detach().cpu().numpy().reshape(pred.shape)
        stats = slice_statistics(pred.astype(np.int64), true.astype(np.int64), self.structures)
        group = item.get(self.group_key, item[self.path_key])
        return {"path": str(item[self.path_key]), "group": str(group), **stats}

    def _write(self, engine: Engine) -> None:
        from medpipe.metrics import segmentation_report

        report, slice_rows, volume_rows = segmentation_report(
            self.records, list(self.structures), self.n_boot, self.seed
        )
        report = {
            **self.info,
            "structures": self.structures,
            "hd95_unit": "pixels of the label grid, in-plane (2-D); per volume the slices' distances are pooled",
            "empty_masks": "both empty: Dice 1, HD95 0; one empty: Dice 0, boundary points count the image diagonal",
            **report,
        }
        atomic_write_text(self.output_dir / "per_slice.csv", _rows_csv(slice_rows))
        atomic_write_text(self.output_dir / "per_volume.csv", _rows_csv(volume_rows))
        atomic_write_text(self.output_dir / "metrics.json", json.dumps(report, indent=2))
        per_volume = report["metrics"]["per_volume"]
        summary = ", ".join(f"{k} {v['value']}" for k, v in per_volume.items())
        logger.info(f"{report['n']} slices / {report['n_volumes']} volumes: {summary} -> {self.output_dir}")


# ------------------------------------------------------------------------------------------------ cross-validation


def summarize_cv(fold_dirs: Sequence[str | Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Pool the held-out volumes and slices of every fold (their per_volume.csv / per_slice.csv) into one table.

    Each volume is scored once, by the fold that held it out, so the pooled means with bootstrap CIs over volumes
    are the cross-validated figures (`medpipe cv` summarises classification keys only).
    """
    from medpipe.metrics import bootstrap_mean_ci

    def read(name: str) -> list[dict[str, str]]:
        rows = []
        for fold_dir in fold_dirs:
            path = Path(fold_dir) / name
            if not path.is_file():
                raise MedpipeError(f"'{path}' not found: evaluate every fold first")
            with path.open(newline="") as fh:
                rows += list(csv.DictReader(fh))
        return rows

    volumes, slices = read("per_volume.csv"), read("per_slice.csv")
    keys = [k for k in volumes[0] if k.startswith(("dice_", "hd95_"))]
    summary: dict[str, Any] = {"folds": len(fold_dirs), "n_volumes": len(volumes), "n_slices": len(slices)}
    for level, rows, clusters in (("per_volume", volumes, None), ("per_slice", slices, "volume_group")):
        groups = [r[clusters] for r in rows] if clusters else None
        summary[level] = {}
        for key in keys:
            values = [float(r[key]) for r in rows]
            ci = bootstrap_mean_ci(values, groups, n_boot, seed)
            summary[level][key] = {
                "value": round(float(np.mean(values)), 4),
                "ci95": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
            }
    summary["volumes"] = {r["volume_group"]: {k: round(float(r[k]), 4) for k in keys} for r in volumes}
    return summary
