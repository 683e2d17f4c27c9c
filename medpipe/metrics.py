"""Classification metrics with 95 % bootstrap confidence intervals, as written to `metrics.json`.

With two classes the second class is the positive one (sensitivity = recall of class 1); with more, every class
gets one-vs-rest sensitivity, specificity and ROC-AUC, and the macro-AUC is their mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

Metric = Callable[[np.ndarray, np.ndarray], float]


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half; NaN when only one class is present."""
    n_pos = int(is_positive.sum())
    n_neg = len(is_positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    return np.bincount(labels * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def _one_vs_rest(labels: np.ndarray, predicted: np.ndarray, cls: int) -> dict[str, float]:
    tp = float(np.sum((labels == cls) & (predicted == cls)))
    fn = float(np.sum((labels == cls) & (predicted != cls)))
    fp = float(np.sum((labels != cls) & (predicted == cls)))
    tn = float(np.sum((labels != cls) & (predicted != cls)))
    precision, sensitivity = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "sensitivity": sensitivity,
        "specificity": _ratio(tn, tn + fp),
        "precision": precision,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
    }


def point_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Scalar metrics for (N,) integer labels and (N, C) class probabilities; argmax decides the class."""
    num_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    out = {"accuracy": float(np.mean(predicted == labels))}
    if num_classes == 2:
        out |= _one_vs_rest(labels, predicted, 1)
        out["roc_auc"] = roc_auc(labels == 1, probs[:, 1])
        return out
    aucs = []
    for cls in range(num_classes):
        for name, value in _one_vs_rest(labels, predicted, cls).items():
            out[f"{name}/{cls}"] = value
        aucs.append(roc_auc(labels == cls, probs[:, cls]))
        out[f"roc_auc/{cls}"] = aucs[-1]
    out["macro_roc_auc"] = float(np.mean(aucs)) if not np.isnan(aucs).any() else float("nan")
    return out


def bootstrap_cis(
    labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """Percentile 95 % CI of every point metric over `n_boot` case resamples (undefined resamples skipped)."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        for name, value in point_metrics(labels[idx], probs[idx]).items():
            if not np.isnan(value):
                samples.setdefault(name, []).append(value)
    return {name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for name, v in samples.items()}


def _clean(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


def classification_report(
    labels: Sequence[int] | np.ndarray,
    probs: Sequence[Sequence[float]] | np.ndarray,
    class_names: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The metrics.json payload: every metric as {value, ci95}, plus n, class counts and the confusion matrix.

    Metrics that a one-class subset cannot define (AUC, specificity…) are null rather than made up.
    """
    labels_arr = np.asarray(labels, dtype=int)
    probs_arr = np.asarray(probs, dtype=float)
    if probs_arr.ndim == 1:  # a single sigmoid output is P(class 1)
        probs_arr = np.stack([1 - probs_arr, probs_arr], axis=1)
    if probs_arr.shape != (len(labels_arr), len(class_names)):
        raise ValueError(f"probs shape {probs_arr.shape} does not fit {len(labels_arr)} cases x {len(class_names)} classes")
    if len(labels_arr) == 0:
        raise ValueError("no cases to score")
    point = point_metrics(labels_arr, probs_arr)
    cis = bootstrap_cis(labels_arr, probs_arr, n_boot, seed) if n_boot else {}
    metrics: dict[str, Any] = {}
    for name, value in point.items():
        lo_hi = cis.get(name)
        entry = {"value": _clean(value), "ci95": [_clean(lo_hi[0]), _clean(lo_hi[1])] if lo_hi and not np.isnan(value) else None}
        # per-class keys "metric/<i>" become nested under the class name for readability
        if "/" in name:
            metric, cls = name.split("/")
            metrics.setdefault("per_class", {}).setdefault(class_names[int(cls)], {})[metric] = entry
        else:
            metrics[name] = entry
    return {
        "n": len(labels_arr),
        "class_names": list(class_names),
        "class_counts": np.bincount(labels_arr, minlength=len(class_names)).tolist(),
        "positive_class": class_names[1] if len(class_names) == 2 else None,
        "confusion_matrix": confusion_matrix(labels_arr, probs_arr.argmax(axis=1), len(class_names)).tolist(),
        "ci_method": f"percentile bootstrap over cases, {n_boot} resamples, seed {seed}",
        "metrics": metrics,
    }
