"""Classification metrics with 95 % bootstrap confidence intervals, as written to `metrics.json`.

With two classes the second class is the positive one (sensitivity = recall of class 1); with more, every class
gets one-vs-rest sensitivity, specificity and ROC-AUC, and the macro-AUC is their mean.

Calibration figures (top-label, as in Guo et al. 2017): a case's confidence is its highest class probability; cases
fall in N_BINS equal-width confidence bins [left, right) (the last holds 1.0, as monai.metrics.calibration_binning
does); ECE is the case-weighted mean |accuracy - mean confidence| over the bins. MONAI's CalibrationErrorMetric is
class-wise (each channel one-vs-rest), not the figure the literature reports, and runs per batch in torch; the
top-label figure is computed here in numpy (a test checks it equals MONAI's metric fed top-label confidence and
correctness)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

N_BINS = 10  # confidence bins of the reliability diagram and ECE
Metric = Callable[[np.ndarray, np.ndarray], float]
Metrics = Callable[[np.ndarray, np.ndarray], dict[str, float]]  # (labels, probs) -> {name: value}


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half (= sklearn's roc_auc_score); NaN when only one class is present.

    Written out because the bootstrap calls it 1000 times per class: one rank pass is ~20x faster than sklearn."""
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


def class_probabilities(probs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(N, C) float probabilities; a 1-D input is one sigmoid output per case, P(class 1)."""
    arr = np.asarray(probs, dtype=float)
    if arr.ndim == 1:  # one sigmoid output is P(class 1)
        arr = np.stack([1 - arr, arr], axis=1)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError(f"expected (N, C>=2) class probabilities, got shape {arr.shape}")
    return arr


def reliability_bins(
    labels: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray, n_bins: int = N_BINS
) -> dict[str, list]:
    """Reliability-diagram data: per confidence bin the case count, mean confidence and accuracy (null if empty)."""
    p = class_probabilities(probs)
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == np.asarray(labels, dtype=int)).astype(float)
    idx = np.clip((confidence * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct, minlength=n_bins)

    def per_bin(sums: np.ndarray) -> list[float | None]:
        return [round(float(s / c), 6) if c else None for s, c in zip(sums, counts, strict=True)]

    return {
        "bin_edges": [round(i / n_bins, 6) for i in range(n_bins + 1)],
        "counts": counts.tolist(),
        "mean_confidence": per_bin(conf_sum),
        "accuracy": per_bin(correct_sum),
    }


def expected_calibration_error(
    labels: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray, n_bins: int = N_BINS
) -> float:
    """Top-label ECE: sum over bins of (cases in bin / N) * |accuracy - mean confidence|."""
    bins = reliability_bins(labels, probs, n_bins)
    n = sum(bins["counts"])
    return float(sum(c / n * abs(a - m) for c, a, m in zip(bins["counts"], bins["accuracy"], bins["mean_confidence"],
                                                           strict=True) if c))  # fmt: skip


def brier_score(labels: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray) -> float:
    """Two classes: mean (p1 - y)^2, the usual binary Brier score in [0, 1]; more: mean over cases of the summed
    squared error over classes (Brier's original, in [0, 2])."""
    p = class_probabilities(probs)
    onehot = np.eye(p.shape[1])[np.asarray(labels, dtype=int)]
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - onehot[:, 1]) ** 2))
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration_point(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """{'ece', 'brier'} of one set of cases (what metrics.json bootstraps alongside the other metrics)."""
    return {"ece": expected_calibration_error(labels, probs), "brier": brier_score(labels, probs)}


def bootstrap_cis(
    labels: np.ndarray, probs: np.ndarray, n_boot: int = 1000, seed: int = 0, metrics: Metrics | None = None
) -> dict[str, tuple[float, float]]:
    """Percentile 95 % CI of every metric `metrics` (default point_metrics) returns, over `n_boot` case resamples
    (undefined resamples skipped)."""
    metrics = metrics or point_metrics
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    for _ in range(n_boot):
        idx = rng.integers(0, len(labels), len(labels))
        for name, value in metrics(labels[idx], probs[idx]).items():
            if not np.isnan(value):
                samples.setdefault(name, []).append(value)
    return {name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for name, v in samples.items()}


def _with_calibration(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """point_metrics plus ECE and Brier score, bootstrapped on the same resamples."""
    return point_metrics(labels, probs) | calibration_point(labels, probs)


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

    `metrics` also holds `ece` and `brier` (how far the probabilities are from observed frequencies), and
    `calibration.reliability` the reliability-diagram bins (count, mean confidence, accuracy per bin).

    Metrics that a one-class subset cannot define (AUC, specificity…) are null rather than made up.
    """
    labels_arr = np.asarray(labels, dtype=int)
    probs_arr = np.asarray(probs, dtype=float)
    if probs_arr.ndim == 1:  # a single sigmoid output is P(class 1)
        probs_arr = np.stack([1 - probs_arr, probs_arr], axis=1)
    if probs_arr.shape != (len(labels_arr), len(class_names)):
        raise ValueError(f"probs shape {probs_arr.shape} != ({len(labels_arr)}, {len(class_names)})")
    if len(labels_arr) == 0:
        raise ValueError("no cases to score")
    point = _with_calibration(labels_arr, probs_arr)
    cis = bootstrap_cis(labels_arr, probs_arr, n_boot, seed, _with_calibration) if n_boot else {}
    metrics: dict[str, Any] = {}
    for name, value in point.items():
        lo_hi = cis.get(name)
        ci95 = [_clean(lo_hi[0]), _clean(lo_hi[1])] if lo_hi and not np.isnan(value) else None
        entry = {"value": _clean(value), "ci95": ci95}
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
        "calibration": {
            "method": f"top-label confidence in {N_BINS} equal-width bins; ece = case-weighted mean |accuracy - "
                      "confidence|; brier: binary (p1 - y)^2, multi-class summed over classes",
            "reliability": reliability_bins(labels_arr, probs_arr, N_BINS),
        },
    }


def dice_score(pred: np.ndarray, true: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    total = int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, true).sum()) / total


def _boundary(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask, border_value=0)


def surface_distances(pred: np.ndarray, true: np.ndarray, empty_distance: float | None = None) -> np.ndarray:
    """Distances (pixels) from each boundary pixel of either mask to the other mask's boundary, both directions.

    Both empty: no distances. One empty: each boundary pixel of the other counts `empty_distance`
    (default: the image diagonal), so a missed or invented structure is penalised rather than ignored.
    """
    from scipy.ndimage import distance_transform_edt

    edge_pred, edge_true = _boundary(pred.astype(bool)), _boundary(true.astype(bool))
    if not edge_pred.any() and not edge_true.any():
        return np.zeros(0, dtype=np.float32)
    if not edge_pred.any() or not edge_true.any():
        penalty = float(np.hypot(*pred.shape[-2:])) if empty_distance is None else empty_distance
        return np.full(int(edge_pred.sum() + edge_true.sum()), penalty, dtype=np.float32)
    to_true = distance_transform_edt(~edge_true)[edge_pred]
    to_pred = distance_transform_edt(~edge_pred)[edge_true]
    return np.concatenate([to_true, to_pred]).astype(np.float32)


def hd95_from_distances(distances: np.ndarray) -> float:
    """95th percentile of pooled symmetric surface distances; 0.0 when there are none (both masks empty)."""
    return float(np.percentile(distances, 95)) if len(distances) else 0.0


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, clusters: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile 95 % CI of the mean; with `clusters`, whole clusters (volumes) are resampled, not single values.

    Slices of one volume are correlated, so resampling slices alone would make the interval too narrow.
    None when fewer than two clusters (or values) exist.
    """
    vals = np.asarray(values, dtype=float)
    keys = np.asarray(clusters if clusters is not None else np.arange(len(vals)).astype(str))
    names, inverse = np.unique(keys, return_inverse=True)
    if len(names) < 2:
        return None
    sums = np.bincount(inverse, weights=vals, minlength=len(names))
    counts = np.bincount(inverse, minlength=len(names)).astype(float)
    idx = np.random.default_rng(seed).integers(0, len(names), (n_boot, len(names)))
    means = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _entry(values: Sequence[float], clusters: Sequence[str] | None, n_boot: int, seed: int) -> dict[str, Any]:
    ci = bootstrap_mean_ci(values, clusters, n_boot, seed) if n_boot else None
    return {
        "value": _clean(float(np.mean(values))),
        "ci95": [_clean(ci[0]), _clean(ci[1])] if ci else None,
        "median": _clean(float(np.median(values))),
    }


def segmentation_report(
    slices: Sequence[dict[str, Any]], structures: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics.json payload, per-slice rows, per-volume rows) from per-slice statistics.

    Each slice dict holds `path`, `group` (its volume) and, for every structure s, `s_inter`, `s_pred`, `s_true`
    (pixel counts) and `s_dist` (surface distances). Per volume, the slices of a group are stacked: Dice pools their
    pixels and HD95 pools their in-plane surface distances. Means are reported with bootstrap CIs over volumes.
    """
    if not slices:
        raise ValueError("no slices to score")
    slice_rows, by_group = [], {}
    for s in slices:
        row: dict[str, Any] = {"path": s["path"], "volume_group": s["group"]}
        for name in structures:
            total = s[f"{name}_pred"] + s[f"{name}_true"]
            row[f"dice_{name}"] = 1.0 if total == 0 else 2.0 * s[f"{name}_inter"] / total
            row[f"hd95_{name}"] = hd95_from_distances(s[f"{name}_dist"])
            row[f"{name}_pixels_true"], row[f"{name}_pixels_pred"] = s[f"{name}_true"], s[f"{name}_pred"]
        slice_rows.append(row)
        by_group.setdefault(s["group"], []).append(s)
    volume_rows = []
    for group in sorted(by_group):
        members, row = by_group[group], {"volume_group": group, "slices": len(by_group[group])}
        for name in structures:
            inter, pred, true = (sum(m[f"{name}_{k}"] for m in members) for k in ("inter", "pred", "true"))
            row[f"dice_{name}"] = 1.0 if pred + true == 0 else 2.0 * inter / (pred + true)
            row[f"hd95_{name}"] = hd95_from_distances(np.concatenate([m[f"{name}_dist"] for m in members]))
            row[f"{name}_pixels_true"], row[f"{name}_pixels_pred"] = true, pred
        volume_rows.append(row)
    groups = [r["volume_group"] for r in slice_rows]
    keys = [f"{m}_{s}" for s in structures for m in ("dice", "hd95")]
    report = {
        "n": len(slice_rows),
        "n_volumes": len(volume_rows),
        "ci_method": (
            f"percentile bootstrap of the mean, {n_boot} resamples, seed {seed}; resampling volumes "
            "(per_slice: whole volumes' slices), so intervals are wide when few volumes are scored"
        ),
        "metrics": {
            "per_volume": {k: _entry([r[k] for r in volume_rows], None, n_boot, seed) for k in keys},
            "per_slice": {k: _entry([r[k] for r in slice_rows], groups, n_boot, seed) for k in keys},
        },
    }
    return report, slice_rows, volume_rows
