"""The shipped covid_ct_seg PNG slices as an nnU-Net v2 raw folder (`medpipe dataset convert SRC DST --to nnunet`),
so that nnU-Net itself can train on the same data.

The slices of one volume group (`volume_group` of datalist.json) are stacked in `source_index` order into one volume
per case: `imagesTr/<group>_0000.nii.gz` (the 8-bit CLAHE values as they are: not HU) and `labelsTr/<group>.nii.gz`
(the combined label: 0 background, 1 lung not infected, 2 infection). The PNGs carry no spacing, so the voxels are
1 × 1 × 1 mm; the affine is LPS, so that medpipe.io.ct.display_slices gives each PNG back exactly as it was. The
source kept only the slices with infection, so a case's slices need not be neighbours in the scan: dataset.json keeps
each case's source indexes under `medpipe`. The folder is written whole or not at all.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.datalists import read_seg_datalist
from medpipe.errors import MedpipeError
from medpipe.io.ingest import save_nifti

TARGETS = ("nnunet",)
LABELS = {"background": 0, "lung_not_infected": 1, "infection": 2}  # the bundle's class names: they map by name
# nnU-Net picks its normalisation by channel name ("CT": HU percentiles); CLAHE-enhanced 8-bit slices are not HU,
# so the name leaves them to its default z-score
CHANNEL = "CLAHE"
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # array axes (columns, rows, slices) point Left, Posterior, Superior


def _read_png(path: str, what: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MedpipeError(f"{what} '{path}': unreadable ({exc})") from None
    if array.ndim != 2 or array.dtype != np.uint8:
        raise MedpipeError(f"{what} '{path}': expected a single-channel 8-bit PNG, got {array.shape} {array.dtype}")
    return array


def _volumes(items: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each volume group's items in source_index order; a slice without an index, or an index twice, is refused."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        try:
            index = float(item["source_index"])
        except (KeyError, TypeError, ValueError):
            raise MedpipeError(f"'{item['path']}': no numeric source_index, so its volume cannot be stacked") from None
        groups[str(item["group"])].append({**item, "source_index": index})
    for name, members in groups.items():
        members.sort(key=lambda it: it["source_index"])
        indexes = [it["source_index"] for it in members]
        twice = sorted({i for i in indexes if indexes.count(i) > 1})
        if twice:
            raise MedpipeError(f"volume group '{name}': source_index {twice[0]:g} is given to two slices")
    return dict(sorted(groups.items()))


def _stack(name: str, members: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(image, label) arrays of one volume, indexed (column, row, slice)."""
    images = [_read_png(it["image"], "image") for it in members]
    labels = [_read_png(it["label"], "label") for it in members]
    for item, image, label in zip(members, images, labels, strict=True):
        if image.shape != images[0].shape or label.shape != image.shape:
            raise MedpipeError(f"volume group '{name}': '{item['image']}' is {image.shape} and its label "
                               f"{label.shape}, the group's first slice {images[0].shape}: not one volume")
        bad = sorted(set(np.unique(label).tolist()) - set(LABELS.values()))
        if bad:
            raise MedpipeError(f"label '{item['label']}': values {bad[:5]} are not {sorted(LABELS.values())}")
    return np.stack(images).transpose(2, 1, 0), np.stack(labels).transpose(2, 1, 0)


def png_to_nnunet(src: str | Path, dst: str | Path, max_cases: int = -1) -> dict[str, Any]:
    """Write the nnU-Net v2 raw folder `dst` from the PNG data set `src` (its datalist.json `training` list);
    `max_cases` ≥ 0 takes the first volume groups by name only. Returns what was written."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MedpipeError(f"'{dst}' exists and is not an empty folder: convert into a new folder")
    volumes = _volumes(read_seg_datalist(src, "training"))
    if not volumes:
        raise MedpipeError(f"'{src / 'datalist.json'}' has no training slices to convert")
    if max_cases >= 0:
        volumes = dict(list(volumes.items())[:max_cases])
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.staging-", dir=dst.parent))
    try:
        for name, members in volumes.items():
            image, label = _stack(name, members)
            save_nifti(image, LPS, staging / "imagesTr" / f"{name}_0000.nii.gz")
            save_nifti(label, LPS, staging / "labelsTr" / f"{name}.nii.gz")
        description = {
            "channel_names": {"0": CHANNEL}, "labels": LABELS, "numTraining": len(volumes), "file_ending": ".nii.gz",
            "name": dst.name, "description": f"covid_ct_seg PNG slices of '{src}', stacked per volume group "
            "(medpipe dataset convert): 8-bit CLAHE values, not HU; spacing unknown, written as 1 mm",
            "medpipe": {"source": str(src), "source_index": {n: [m["source_index"] for m in members]
                                                             for n, members in volumes.items()}},
        }  # fmt: skip
        (staging / "dataset.json").write_text(json.dumps(description, indent=1))
        if dst.exists():
            dst.rmdir()
        staging.rename(dst)
    except OSError as exc:
        raise MedpipeError(f"writing '{dst}' failed ({exc.strerror or exc}); nothing was written") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"folder": str(dst), "cases": len(volumes), "slices": sum(len(m) for m in volumes.values())}


def convert_dataset(src: str | Path, dst: str | Path, to: str, max_cases: int = -1) -> dict[str, Any]:
    """`medpipe dataset convert`: the PNG slice data set `src` into layout `to` (nnunet) at `dst`."""
    if to not in TARGETS:
        raise MedpipeError(f"--to {to}: medpipe converts the PNG slices to {', '.join(TARGETS)}")
    return png_to_nnunet(src, dst, max_cases)
