"""Choose segmentation post-processing by cross-validation, as nnU-Net's `determine_postprocessing` does.

Every candidate (medpipe.transforms.seg_postprocessing: infection components under a fraction of the slice area
become lung) is applied to the out-of-fold label maps of a CV run (each slice predicted by the fold model that
never saw its volume), and scored exactly as evaluation scores (per-volume Dice pooled over the volume's pixels,
HD95, bootstrap CIs over volumes). The rule, fixed before any score is seen: take the candidate with the highest
mean per-volume infection Dice (the smaller fraction on a tie), and keep it only if it beats no post-processing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.datalists import read_seg_datalist
from medpipe.errors import MedpipeError
from medpipe.evaluation.metrics import segmentation_report
from medpipe.evaluation.reports import FILES_SHA256, check_report_files
from medpipe.evaluation.seg_report import PREDICTIONS, read_predictions, slice_statistics
from medpipe.files import atomic_write_text
from medpipe.transforms.seg import load_label_2d
from medpipe.transforms.seg_postprocessing import check_fraction, relabel_small_components

# fractions of the slice area: at 256² about 0, 7, 13, 33, 66, 131 and 328 pixels
CANDIDATES = (0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
OUTPUT = "postprocessing.json"
TARGET = "infection"


def _fold_slices(fold_dir: Path) -> tuple[dict[str, Any], list[tuple[str, str, np.ndarray, np.ndarray]]]:
    """A fold's metrics.json and its (path, volume group, predicted labels, true labels) per slice."""
    metrics = check_report_files(fold_dir)  # also checks predictions.npz is the file the metrics came from
    applied = float(metrics.get("min_infection_fraction") or 0.0)
    if applied != 0.0:  # masks already post-processed: a smaller candidate could not be told from a larger one
        raise MedpipeError(f"{fold_dir} was scored with min_infection_fraction {applied:g}: choose on raw masks "
                           "(cv_rescore … --save_predictions true --min_infection_fraction 0)")  # fmt: skip
    if float(metrics.get("min_infection_lung_fraction") or 0.0) != 0.0:  # the slice gate also removed infection
        raise MedpipeError(f"{fold_dir} was scored with the slice gate on: choose on raw masks (cv_rescore … "
                           "--save_predictions true --min_infection_fraction 0 --min_infection_lung_fraction 0)")
    predictions = read_predictions(fold_dir)
    if PREDICTIONS not in (metrics.get(FILES_SHA256) or {}):  # left by an earlier scoring of this folder
        raise MedpipeError(f"'{fold_dir / PREDICTIONS}' is not from the scoring that wrote its metrics.json: rescore "
                           "with --save_predictions true --min_infection_fraction 0")  # fmt: skip
    dataset_dir = metrics.get("dataset_dir") or ""
    # the same reader evaluation used: labels resolved against the folder, `group` = the volume
    items = {i["path"]: i for section in ("training", "testing") for i in read_seg_datalist(dataset_dir, section)}
    slices = []
    for path, pred in predictions.items():
        if path not in items or "label" not in items[path]:
            raise MedpipeError(f"{fold_dir}: '{path}' has no label in {dataset_dir}/datalist.json: rescore this fold")
        true = load_label_2d(items[path]["label"])
        if true.shape != pred.shape:
            raise MedpipeError(f"{fold_dir}: '{path}' prediction {pred.shape} is not on its label's grid {true.shape}")
        slices.append((path, items[path]["group"], pred, true))
    return metrics, slices


def _score(
    slices: Sequence[tuple[str, str, np.ndarray, np.ndarray]], raw_stats: Sequence[dict[str, Any]],
    structures: dict[str, list[int]], fraction: float, n_boot: int, seed: int,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:  # fmt: skip
    records = []
    for (path, group, pred, true), raw in zip(slices, raw_stats, strict=True):
        fixed = relabel_small_components(pred, fraction)
        # most slices keep their masks under small fractions: reuse their statistics (surface distances are costly)
        stats = raw if np.array_equal(fixed, pred) else slice_statistics(fixed.astype(np.int64), true, structures)
        records.append({"path": path, "group": group, **stats})
    report, _, volume_rows = segmentation_report(records, list(structures), n_boot, seed)
    return report["metrics"]["per_volume"], volume_rows


def choose_postprocessing(
    run: str | Path, fractions: Sequence[float] = CANDIDATES, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Score every candidate on the out-of-fold masks of `run` (a `medpipe cv_rescore … --save_predictions true`
    folder) and write `<run>/postprocessing.json`: the table, the per-volume infection Dice and the choice."""
    from medpipe.evaluation.cv import read_run_summary

    run_dir = Path(run)
    summary = read_run_summary(run_dir)
    grid = sorted({check_fraction(f) for f in [0.0, *fractions]})
    slices, structures = [], None
    for fold in range(int(summary["folds"])):
        metrics, fold_slices = _fold_slices(run_dir / f"fold{fold}")
        structures = structures or {k: list(v) for k, v in metrics["structures"].items()}
        slices += fold_slices
    if TARGET not in (structures or {}):
        raise MedpipeError(f"{run_dir} has no '{TARGET}' structure: post-processing is chosen on it")
    rows, per_volume = [], {}
    raw_stats = [slice_statistics(pred.astype(np.int64), true, structures) for _, _, pred, true in slices]
    for fraction in grid:
        metrics, volume_rows = _score(slices, raw_stats, structures, fraction, n_boot, seed)
        rows.append({"min_infection_fraction": fraction, **metrics})
        per_volume[str(fraction)] = {r["volume_group"]: round(r[f"dice_{TARGET}"], 4) for r in volume_rows}
    key = f"dice_{TARGET}"
    best = max(rows, key=lambda r: (r[key]["value"], -r["min_infection_fraction"]))
    baseline = rows[0]
    chosen = best if best[key]["value"] > baseline[key]["value"] else baseline
    result = {
        "run": str(run_dir),
        "slices": len(slices),
        "volumes": len(per_volume[str(grid[0])]),
        "rule": "highest mean per-volume infection Dice over the candidates (smaller fraction on a tie), kept only "
        "if above no post-processing (nnU-Net's determine_postprocessing rule)",
        "candidates": rows,
        "per_volume_dice_infection": per_volume,
        "chosen": {"min_infection_fraction": chosen["min_infection_fraction"]},
    }
    atomic_write_text(run_dir / OUTPUT, json.dumps(result, indent=2))
    return result
