"""Segmentation evaluation: the ignite handler that writes metrics.json and the per-slice / per-volume CSVs,
and the pooled summary of a cross-validation's folds."""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine

from medpipe.errors import MedpipeError
from medpipe.evaluation.reports import EpochCollector, write_report_files
from medpipe.files import atomic_write
from medpipe.values import flag

logger = logging.getLogger(__name__)


PREDICTIONS = "predictions.npz"


def slice_statistics(
    pred: np.ndarray, true: np.ndarray, structures: Mapping[str, Sequence[int]]
) -> dict[str, Any]:
    """Pixel counts and surface distances of each structure (a set of label values) for one slice."""
    from medpipe.evaluation.metrics import surface_distances

    stats: dict[str, Any] = {}
    for name, values in structures.items():
        p, t = np.isin(pred, list(values)), np.isin(true, list(values))
        stats[f"{name}_inter"] = int(np.logical_and(p, t).sum())
        stats[f"{name}_pred"], stats[f"{name}_true"] = int(p.sum()), int(t.sum())
        stats[f"{name}_dist"] = surface_distances(p, t)
    return stats


def pixel_calibration(
    samples: Sequence[tuple[np.ndarray, np.ndarray]], structures: Mapping[str, Sequence[int]], per_slice: int
) -> dict[str, Any]:
    """Calibration of the per-pixel class probabilities over sampled pixels: top-label ECE, Brier score and
    reliability bins over all classes, and the same for each structure as a two-class (in / out) problem."""
    from medpipe.evaluation.metrics import brier_score, expected_calibration_error, reliability_bins

    labels = np.concatenate([s[0] for s in samples])
    probs = np.concatenate([s[1] for s in samples]).astype(np.float64)
    probs /= probs.sum(axis=1, keepdims=True)
    out: dict[str, Any] = {
        "pixels": int(len(labels)),
        "sampling": f"{per_slice} seeded random pixels per slice, on the label grid",
        "all_classes": {
            "ece": round(expected_calibration_error(labels, probs), 6),
            "brier": round(brier_score(labels, probs), 6),
            "reliability": reliability_bins(labels, probs),
        },
    }
    for name, values in structures.items():
        p_in = probs[:, list(values)].sum(axis=1)
        two = np.stack([1.0 - p_in, p_in], axis=1)
        inside = np.isin(labels, list(values)).astype(int)
        out[name] = {
            "ece": round(expected_calibration_error(inside, two), 6),
            "brier": round(brier_score(inside, two), 6),
            "reliability": reliability_bins(inside, two),
        }
    return out


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
    by `group_key` (volume_group). When the output also holds the class probabilities (`prob_key`, (C, H, W) on
    the label grid), metrics.json gets pixel-level calibration figures from `pixels_per_slice` seeded random pixels
    of every slice (medpipe.evaluation.metrics: ECE, Brier score, reliability bins; all classes and infection-vs-rest).
    With `save_predictions`, the predicted label maps go to predictions.npz (`paths`, then `pred<i>` uint8 per slice,
    in that order): out-of-fold masks that post-processing can be chosen on (medpipe.evaluation.postprocessing_choice).
    """

    def __init__(
        self, output_dir: str, structures: Mapping[str, Sequence[int]], group_key: str = "volume_group",
        prob_key: str = "prob", pixels_per_slice: int = 2048, save_predictions: Any = False, **common: Any,
    ) -> None:  # fmt: skip
        super().__init__(output_dir, **common)
        self.save_predictions = flag(save_predictions)
        self.structures = {k: list(v) for k, v in structures.items()}
        self.group_key, self.prob_key, self.pixels_per_slice = group_key, prob_key, pixels_per_slice
        self.records: list[dict[str, Any]] = []  # one per slice: path, group and slice_statistics

    def _record(self, out: Mapping[str, Any], item: Mapping[str, Any]) -> dict[str, Any]:
        pred = torch.as_tensor(out[self.pred_key]).detach().cpu().numpy().reshape(out[self.label_key].shape[-2:])
        true = torch.as_tensor(out[self.label_key]).detach().cpu().numpy().reshape(pred.shape)
        stats = slice_statistics(pred.astype(np.int64), true.astype(np.int64), self.structures)
        group = item.get(self.group_key, item[self.path_key])
        record = {"path": str(item[self.path_key]), "group": str(group), **stats}
        if self.save_predictions:
            record["_pred"] = pred.astype(np.uint8)
        if out.get(self.prob_key) is not None:
            probs = torch.as_tensor(out[self.prob_key]).detach().float().cpu().numpy()
            probs = probs.reshape(probs.shape[0], -1)
            rng = np.random.default_rng([self.seed, len(self.records)])  # same pixels every run
            take = rng.choice(probs.shape[1], min(self.pixels_per_slice, probs.shape[1]), replace=False)
            record["_calibration"] = (true.reshape(-1)[take].astype(np.int64), probs[:, take].T)
        return record

    def _write(self, engine: Engine) -> None:
        from medpipe.evaluation.metrics import segmentation_report

        samples = [r.pop("_calibration") for r in self.records if "_calibration" in r]
        masks = [r.pop("_pred") for r in self.records if "_pred" in r]
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
        if samples:
            report["calibration"] = pixel_calibration(samples, self.structures, self.pixels_per_slice)
        files = {"per_slice.csv": _rows_csv(slice_rows), "per_volume.csv": _rows_csv(volume_rows)}
        written = []
        if masks:
            arrays = {f"pred{i}": m for i, m in enumerate(masks)}
            paths = np.array([r["path"] for r in self.records])
            atomic_write(self.output_dir / PREDICTIONS, lambda tmp: _savez(tmp, paths=paths, **arrays))
            written.append(PREDICTIONS)
        write_report_files(self.output_dir, files, report, written)
        per_volume = report["metrics"]["per_volume"]
        summary = ", ".join(f"{k} {v['value']}" for k, v in per_volume.items())
        logger.info(f"{report['n']} slices / {report['n_volumes']} volumes: {summary} -> {self.output_dir}")


def _savez(target: Path, **arrays: np.ndarray) -> None:
    with target.open("wb") as fh:  # a file object: np.savez would append .npz to the temporary name
        np.savez_compressed(fh, **arrays)


def read_predictions(folder: str | Path) -> dict[str, np.ndarray]:
    """{image path: predicted label map} from a folder's predictions.npz (evaluate with --save_predictions true)."""
    path = Path(folder) / PREDICTIONS
    if not path.is_file():
        raise MedpipeError(f"'{path}' not found: score the fold with --save_predictions true (e.g. medpipe cv_rescore)")
    with np.load(path, allow_pickle=False) as data:
        return {str(p): data[f"pred{i}"] for i, p in enumerate(data["paths"])}


def summarize_cv(fold_dirs: Sequence[str | Path], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Pool the held-out volumes and slices of every fold (their per_volume.csv / per_slice.csv) into one table.

    Each volume is scored once, by the fold that held it out, so the pooled means with bootstrap CIs over volumes
    are the cross-validated figures (`medpipe cv` summarises classification keys only).
    """
    from medpipe.evaluation.metrics import bootstrap_mean_ci

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
