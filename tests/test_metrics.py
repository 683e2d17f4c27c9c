"""metrics.json content: values agree with scikit-learn, CIs bracket them, undefined metrics are null."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from medpipe.evaluation.metrics import classification_report, roc_auc


def test_binary_report_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 80)
    probs = np.clip(labels * 0.35 + rng.random(80) * 0.65, 0, 1)
    report = classification_report(labels, probs, ["no", "yes"], n_boot=300)
    m = report["metrics"]
    assert m["roc_auc"]["value"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-6)
    assert m["f1"]["value"] == pytest.approx(f1_score(labels, probs >= 0.5), abs=1e-6)
    assert m["accuracy"]["value"] == pytest.approx(np.mean((probs >= 0.5) == labels), abs=1e-6)
    for name in ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc"):
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] <= hi and hi - lo > 0
    tn, fp = report["confusion_matrix"][0]
    assert m["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert report["n"] == 80 and sum(report["class_counts"]) == 80


def test_auc_ties_count_half() -> None:
    assert roc_auc(np.array([True, False]), np.array([0.5, 0.5])) == 0.5
    assert np.isnan(roc_auc(np.array([True, True]), np.array([0.1, 0.9])))


def test_one_class_subset_gives_null_not_invented_numbers() -> None:
    report = classification_report([1, 1, 1], [0.9, 0.8, 0.3], ["no", "yes"], n_boot=50)
    assert report["metrics"]["roc_auc"]["value"] is None
    assert report["metrics"]["specificity"]["value"] is None
    assert report["metrics"]["sensitivity"]["value"] == pytest.approx(2 / 3, abs=1e-6)


def test_multiclass_report_has_per_class_and_macro_auc() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90)
    probs = rng.dirichlet([1, 1, 1], 90) + np.eye(3)[labels] * 0.5
    probs /= probs.sum(1, keepdims=True)
    report = classification_report(labels, probs, ["covid19", "pneumonia", "normal"], n_boot=100)
    per_class = report["metrics"]["per_class"]
    assert set(per_class) == {"covid19", "pneumonia", "normal"}
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in range(3)])
    assert report["metrics"]["macro_roc_auc"]["value"] == pytest.approx(expected, abs=1e-6)
    assert np.asarray(report["confusion_matrix"]).sum() == 90


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="probs shape"):
        classification_report([0, 1], [[0.1, 0.9, 0.0]] * 2, ["a", "b"])


def test_report_has_calibration_figures_and_keeps_the_other_values() -> None:
    """ece, brier and the reliability bins are added; every other value and CI is what it was before them."""
    from medpipe.evaluation.metrics import bootstrap_cis, brier_score, expected_calibration_error, point_metrics

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 120)
    probs = rng.dirichlet([1, 1, 1], 120) + np.eye(3)[labels] * 0.3
    probs /= probs.sum(1, keepdims=True)
    report = classification_report(labels, probs, ["a", "b", "c"], n_boot=200, seed=7)
    m = report["metrics"]
    assert m["ece"]["value"] == pytest.approx(expected_calibration_error(labels, probs), abs=1e-6)
    assert m["brier"]["value"] == pytest.approx(brier_score(labels, probs), abs=1e-6)
    for name in ("ece", "brier"):
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] <= hi
    bins = report["calibration"]["reliability"]
    assert sum(bins["counts"]) == 120 and set(bins) == {"bin_edges", "counts", "mean_confidence", "accuracy"}
    old_cis = bootstrap_cis(labels, probs, 200, 7)  # the default metric set, as before calibration was added
    for name, value in point_metrics(labels, probs).items():
        entry = m[name] if "/" not in name else m["per_class"]["abc"[int(name[-1])]][name.split("/")[0]]
        assert entry["value"] == pytest.approx(value, abs=1e-6)
        assert entry["ci95"] == pytest.approx(list(old_cis[name]), abs=1e-6)
