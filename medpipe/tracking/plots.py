"""Plots logged with MLflow runs: learning curves, ROC, confusion matrix, segmentation overlays (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

_checked_uris: set[str] = set()


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure (closing matters: runs log several figures per job)."""
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _figure():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: list[dict[str, float]], path: Path) -> Path | None:
    """Loss (left) and every other per-epoch metric (right) against the epoch."""
    if not history:
        return None
    plt = _figure()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in sorted({k for h in history for k in h} - {"epoch"}):
        ax = ax_loss if "loss" in key else ax_metric
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", label=key)
    for ax, title in ((ax_loss, "loss"), (ax_metric, "metrics")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        if ax.lines:
            ax.legend()
    return _save(plt, fig, path)


def plot_roc(predictions_csv: Path, path: Path) -> Path | None:
    """ROC curve(s) from predictions.csv: the positive class for two classes, one-vs-rest for more."""
    import csv

    from sklearn.metrics import roc_curve

    if not predictions_csv.is_file():
        return None
    with predictions_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "label" not in rows[0]:
        return None
    classes = [k[len("prob_") :] for k in rows[0] if k.startswith("prob_")]
    labels = np.array([r["label"] for r in rows])
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 5))
    for cls in classes[1:] if len(classes) == 2 else classes:
        truth = labels == cls
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, [float(r[f"prob_{cls}"]) for r in rows])
        ax.plot(fpr, tpr, label=cls)
    ax.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC ({len(rows)} cases)")
    if ax.lines[:-1]:
        ax.legend()
    return _save(plt, fig, path)


def plot_confusion_matrix(metrics_json: Path, path: Path) -> Path | None:
    """The confusion matrix recorded in metrics.json (rows: true class, columns: predicted)."""
    if not metrics_json.is_file():
        return None
    report = json.loads(metrics_json.read_text())
    if "confusion_matrix" not in report:
        return None
    matrix = np.asarray(report["confusion_matrix"])
    names = report.get("class_names", [str(i) for i in range(len(matrix))])
    plt = _figure()
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="red")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _save(plt, fig, path)


def plot_overlays(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], path: Path) -> Path | None:
    """Segmentation overlays: each case's image with the predicted (red) and true (green) mask outlines."""
    if not cases:
        return None
    plt = _figure()
    fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 3), squeeze=False)
    for ax, (image, pred, label) in zip(axes[0], cases, strict=True):
        ax.imshow(image, cmap="gray")
        if label is not None and label.any():
            ax.contour(label, levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred, levels=[0.5], colors="red", linewidths=1)
        ax.axis("off")
    return _save(plt, fig, path)
