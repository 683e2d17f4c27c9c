"""Find data sets and turn them into MONAI datalists with leakage-safe, group-aware folds.

A classification folder looks like `<root>/<class_name>/<image>` with an optional `<root>/MANIFEST.csv` whose
`near_duplicate_group` (or `group`) column ties copies of one image (or one patient) together, so that no group
ever lands on both sides of a split.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.imageio import is_image_file

GROUP_COLUMNS = ("near_duplicate_group", "group", "patient_id", "volume_group")
SPLIT_MODES = ("group", "random")


def data_root() -> Path:
    """The folder holding the data sets: `$MEDPIPE_DATA`."""
    root = os.environ.get("MEDPIPE_DATA")
    if not root:
        raise MedpipeError("MEDPIPE_DATA is not set: export MEDPIPE_DATA=/path/to/data or pass --dataset_dir")
    return Path(root)


def dataset_dir(name: str) -> str:
    """`$MEDPIPE_DATA/<name>`; the bundle configs' default `dataset_dir`."""
    return str(data_root() / name)


def _read_manifest_groups(root: Path) -> dict[str, str]:
    """Map relative path -> group id from MANIFEST.csv, when the folder has one with a group column."""
    manifest = root / "MANIFEST.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    column = next((c for c in GROUP_COLUMNS if rows and c in rows[0]), None)
    if column is None or "path" not in rows[0]:
        return {}
    return {row["path"]: row[column] for row in rows if row.get(column)}


def scan_class_folders(root: str | Path, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """List every image under `<root>/<class>/` as {image, label, path, group}; refuse anything ambiguous."""
    root = Path(root)
    if not root.is_dir():
        raise MedpipeError(f"dataset folder '{root}' does not exist; set --dataset_dir or MEDPIPE_DATA")
    unknown = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in class_names)
    if unknown:
        raise MedpipeError(f"'{root}' has folders {unknown} that are not classes {list(class_names)}")
    missing = [c for c in class_names if not (root / c).is_dir()]
    if missing:
        raise MedpipeError(
            f"'{root}' has no folder for class(es) {missing}: every class {list(class_names)} needs images"
        )
    groups = _read_manifest_groups(root)
    items: list[dict[str, Any]] = []
    for label, class_name in enumerate(class_names):
        files = sorted(p for p in (root / class_name).rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise MedpipeError(f"class folder '{root / class_name}' is empty")
        for path in files:
            if not is_image_file(path):
                raise MedpipeError(f"'{path}' is not an image file; remove it from the class folder")
            rel = path.relative_to(root).as_posix()
            items.append({"image": str(path), "label": label, "path": rel, "group": groups.get(rel, rel)})
    return items


def fold_indices(
    labels: Sequence[int], groups: Sequence[str], fold: int, num_folds: int, seed: int, mode: str = "group"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold `fold` of a stratified K-fold; mode 'group' keeps every group on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if mode not in SPLIT_MODES:
        raise MedpipeError(f"split_mode must be one of {SPLIT_MODES}, got '{mode}'")
    if not 0 <= fold < num_folds:
        raise MedpipeError(f"fold must be in 0..{num_folds - 1} (or -1 for all data), got {fold}")
    labels_arr, idx = np.asarray(labels), np.arange(len(labels))
    if mode == "group":
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        splits = splitter.split(idx, labels_arr, groups=np.asarray(groups))
    else:  # the paper's (leaky) protocol, kept to measure how much duplicates inflate scores
        splits = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(idx, labels_arr)
    for k, (train_idx, val_idx) in enumerate(splits):
        if k == fold:
            return train_idx, val_idx
    raise AssertionError("unreachable")


def split_items(
    items: list[dict[str, Any]], fold: int, num_folds: int = 5, seed: int = 0, mode: str = "group"
) -> dict[str, list[dict[str, Any]]]:
    """{'train': [...], 'val': [...]} for one fold; fold -1 trains on everything and validates on nothing."""
    if fold == -1:
        return {"train": list(items), "val": []}
    labels = [it["label"] for it in items]
    counts = np.bincount(labels)
    if len(counts) < 2 or counts.min() < num_folds:
        raise MedpipeError(
            f"{num_folds}-fold split needs at least {num_folds} images of every class (class counts {counts.tolist()})"
        )
    train_idx, val_idx = fold_indices(labels, [it["group"] for it in items], fold, num_folds, seed, mode)
    return {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}


def cap_items(items: list[dict[str, Any]], max_cases: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded, class-balanced subset of at most `max_cases` items (-1: all), for smoke tests and quick looks."""
    if max_cases < 0 or len(items) <= max_cases:
        return items
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[dict[str, Any]]] = {}
    for i in rng.permutation(len(items)):
        by_label.setdefault(items[i]["label"], []).append(items[i])
    per_class = max(1, max_cases // len(by_label))
    return [it for label in sorted(by_label) for it in by_label[label][:per_class]]


def class_folder_datalists(
    dataset_dir: str | Path, class_names: Sequence[str], fold: int, num_folds: int = 5, seed: int = 0,
    split_mode: str = "group", max_cases: int = -1,
) -> dict[str, list[dict[str, Any]]]:
    """Scan a class-folder data set and split it: what the classification bundles' `datalists` id holds."""
    items = cap_items(scan_class_folders(dataset_dir, class_names), max_cases, seed)
    return split_items(items, fold, num_folds, seed, split_mode)


def inference_items(inputs: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Images to predict: a folder (searched recursively), one file, or a list of files."""
    paths: list[Path] = []
    for entry in [inputs] if isinstance(inputs, (str, Path)) else list(inputs):
        entry = Path(entry)
        if entry.is_dir():
            paths += sorted(p for p in entry.rglob("*") if p.is_file() and is_image_file(p))
        elif entry.is_file():
            if not is_image_file(entry):
                raise MedpipeError(f"'{entry}' is not a supported image file")
            paths.append(entry)
        else:
            raise MedpipeError(f"input '{entry}' does not exist")
    if not paths:
        raise MedpipeError(f"no images found in {inputs}")
    return [{"image": str(p), "path": str(p)} for p in paths]
