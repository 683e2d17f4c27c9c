"""Slice-labelled real CT series: how well a volumetric segmentation's infection tracks radiologists' per-slice
labels (COVID-CT-MD style `slice_labels.csv`: file, infection 0/1), and how much infection it invents on slices and
scans that have none.

The scores are computed from the label mask on the volume's own grid (VolumeSegmenter.segment) and the DICOM file
of each slice, so no slice order has to be assumed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.evaluation.metrics import roc_auc
from medpipe.io import ct
from medpipe.io.slice_labels import read_slice_label_rows

INFECTION = 2


def read_slice_labels(path: str | Path) -> dict[str, int]:
    """{DICOM file name: 0/1} from a CSV with `file` and `infection` columns (file paths are matched by name)."""
    return {file.name: label for file, label in read_slice_label_rows(path)}


def per_slice_ml(mask: np.ndarray, affine: np.ndarray, label: int = INFECTION) -> np.ndarray:
    """mL of `label` in each slice k of a (i, j, k) mask."""
    return (np.asarray(mask) == label).sum(axis=(0, 1)) * ct.voxel_ml(affine)


def slice_label_figures(
    mask: np.ndarray, affine: np.ndarray, source_files: list[Path | None] | tuple, labels: Mapping[str, int]
) -> dict[str, Any]:
    """ROC-AUC of predicted infection mL per slice against the slice labels, and infection mL on the label-negative
    and label-positive slices. Every slice of the series must have a label (and every label a slice)."""
    names = [Path(f).name if f is not None else None for f in source_files]
    if None in names or len(names) != mask.shape[2]:
        raise MedpipeError("slice labels need a DICOM series with one file per slice (no filled gaps)")
    missing = sorted(set(names) - set(labels))
    extra = sorted(set(labels) - set(names))
    if missing or extra:
        raise MedpipeError(f"slice labels and series differ: unlabelled slices {missing[:3]}, labels without a slice "
                           f"{extra[:3]}")  # fmt: skip
    truth = np.array([labels[n] for n in names], dtype=bool)
    ml = per_slice_ml(mask, affine)
    predicted = ml > 0
    return {
        "slices": int(len(truth)),
        "positive_slices": int(truth.sum()),
        "slice_auc": round(roc_auc(truth, ml), 4),
        "sensitivity_any_infection": round(float(predicted[truth].mean()), 4) if truth.any() else None,
        "specificity_no_infection": round(float((~predicted[~truth]).mean()), 4) if (~truth).any() else None,
        "infection_ml_label_negative": round(float(ml[~truth].sum()), 2),
        "infection_ml_label_positive": round(float(ml[truth].sum()), 2),
        "infection_ml_total": round(float(ml.sum()), 2),
    }
