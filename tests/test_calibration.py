"""Temperature scaling, calibration figures and per-case uncertainty (issue 19)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from medpipe.cli import main
from medpipe.errors import MedpipeError
from medpipe.evaluation.calibration import (
    TemperatureScaledInferer,
    apply_temperature,
    calibrated_inferer,
    fit_temperature,
    load_temperature,
    log_probabilities,
    softmax,
)
from medpipe.evaluation.metrics import brier_score, expected_calibration_error, reliability_bins
from medpipe.evaluation.reports import ClassificationReport, predictions_csv
from medpipe.evaluation.uncertainty import (
    FLAG_TEXT,
    UncertaintyColumns,
    fit_threshold,
    flag_accuracy,
    member_spread,
    normalised_entropy,
)


def _sample(n: int, classes: int, t_true: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / t_true): a model reporting softmax(z) is miscalibrated by t_true."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p_true = softmax(z / t_true)
    labels = np.array([rng.choice(classes, p=row) for row in p_true])
    return z, labels


@pytest.mark.parametrize(("t_true", "classes"), [(2.0, 3), (0.6, 3), (1.7, 2)])
def test_fit_recovers_known_temperature(t_true: float, classes: int) -> None:
    z, labels = _sample(6000, classes, t_true)
    assert fit_temperature(z, labels) == pytest.approx(t_true, rel=0.08)
    # from probabilities as predictions.csv holds them: log p differs from z by a per-row constant only
    assert fit_temperature(log_probabilities(softmax(z)), labels) == pytest.approx(t_true, rel=0.08)


def test_temperature_never_changes_the_predicted_class() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([0.5, 0.5, 0.5], 500)
    for t in (0.05, 0.3, 1.0, 2.5, 20.0):
        assert (apply_temperature(probs, t).argmax(axis=1) == probs.argmax(axis=1)).all()
    logits = torch.randn(64, 1)  # one sigmoid logit, as brain_tumor_cls
    scaled = TemperatureScaledInferer(lambda x, net: net(x), 3.0)(logits, lambda x: x)
    assert torch.equal(torch.sigmoid(scaled) > 0.5, torch.sigmoid(logits) > 0.5)
    assert torch.allclose(scaled, logits / 3.0)


def test_binary_sigmoid_and_softmax_logits_agree() -> None:
    """softmax(log p / T) on two classes is sigmoid(logit(p1) / T): one fit serves both kinds of bundle."""
    p1 = np.array([0.02, 0.3, 0.5, 0.8, 0.999])
    expected = 1 / (1 + np.exp(-np.log(p1 / (1 - p1)) / 2.5))
    assert apply_temperature(p1, 2.5)[:, 1] == pytest.approx(expected, abs=1e-9)


def test_ece_matches_monai_metric_on_top_label_confidence() -> None:
    from monai.metrics import CalibrationErrorMetric

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    probs = rng.dirichlet([1, 1, 1], 400) + np.eye(3)[labels] * 0.4
    probs /= probs.sum(axis=1, keepdims=True)
    conf = torch.tensor(probs.max(axis=1), dtype=torch.float32)[None, None]
    correct = torch.tensor(probs.argmax(axis=1) == labels, dtype=torch.float32)[None, None]
    metric = CalibrationErrorMetric(num_bins=10, include_background=True)
    metric(conf, correct)
    assert expected_calibration_error(labels, probs) == pytest.approx(float(metric.aggregate()), abs=1e-5)
    bins = reliability_bins(labels, probs)
    assert sum(bins["counts"]) == 400 and len(bins["bin_edges"]) == 11
    assert all(a is None for a, c in zip(bins["accuracy"], bins["counts"], strict=True) if c == 0)


def test_brier_and_perfect_calibration() -> None:
    assert brier_score([0, 1], [0.2, 0.9]) == pytest.approx((0.2**2 + 0.1**2) / 2)
    assert brier_score([0, 1, 2], np.eye(3)) == 0.0
    assert expected_calibration_error([0, 1, 1], np.eye(2)[[0, 1, 1]]) == 0.0


def _write_run(run: Path, t_true: float = 2.5, n: int = 600) -> None:
    """A fake 2-fold CV run of an overconfident binary model, in ClassificationReport's predictions.csv format."""
    z, labels = _sample(n, 2, t_true, seed=5)
    probs = softmax(z)
    for fold, idx in enumerate(np.array_split(np.arange(n), 2)):
        (run / f"fold{fold}").mkdir(parents=True)
        text = predictions_csv([f"img{i}.png" for i in idx], probs[idx], ["no", "yes"], labels[idx].tolist())
        (run / f"fold{fold}" / "predictions.csv").write_text(text)
    (run / "splits.json").write_text(json.dumps({"folds": 2}))
    (run / "fold0" / "metrics.json").write_text(json.dumps({"network": "paper_cnn", "tta": True, "n": 300}))


def test_calibrate_verb_writes_calibration_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run")
    assert main(["calibrate", str(tmp_path / "run"), "--out", str(tmp_path / "cal.json")]) == 0
    cal = json.loads((tmp_path / "cal.json").read_text())
    assert cal["temperature"] == pytest.approx(2.5, rel=0.2) and cal["n"] == 600
    assert cal["ece_after"] < cal["ece_before"] and cal["brier_after"] < cal["brier_before"]
    assert cal["ece_after_cross_fitted"] < cal["ece_before"] and cal["brier_after_cross_fitted"] < cal["brier_before"]
    assert cal["activation"] == "sigmoid" and cal["class_names"] == ["no", "yes"]
    assert cal["fitted_on"]["splits"]["sha256"] and len(cal["fitted_on"]["predictions"]) == 2
    assert cal["fitted_on"]["scored_with"] == {"network": "paper_cnn", "tta": True}
    flags = cal["uncertainty_flagging"]
    assert flags["n_flagged"] == pytest.approx(60, abs=3)
    assert flags["accuracy_flagged"] < flags["accuracy_unflagged"]  # the flag is informative
    assert "ECE" in capsys.readouterr().out
    assert load_temperature(tmp_path / "cal.json") == cal["temperature"]


def test_calibrate_refuses_a_folder_without_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", str(tmp_path)]) == 2
    assert "no fold*/predictions.csv" in capsys.readouterr().err
    assert not (tmp_path / "calibration.json").exists()


def test_load_temperature_defaults_and_errors(tmp_path: Path) -> None:
    assert load_temperature(None) == 1.0 and load_temperature("null") == 1.0
    inferer = object()
    assert calibrated_inferer(inferer, None) is inferer
    (tmp_path / "bad.json").write_text('{"temperature": -1}')
    with pytest.raises(MedpipeError, match="outside"):
        load_temperature(tmp_path / "bad.json")
    with pytest.raises(MedpipeError, match="medpipe calibrate"):
        load_temperature(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text('{"temperature": 2.0, "fitted_on": {"scored_with": {"tta": false}}}')
    assert isinstance(calibrated_inferer(inferer, tmp_path / "ok.json"), TemperatureScaledInferer)


def test_calibration_fitted_without_tta_warns_when_applied_with_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "ok.json").write_text('{"temperature": 2.0, "fitted_on": {"scored_with": {"tta": false}}}')
    calibrated_inferer(object(), tmp_path / "ok.json", {"tta": False, "network": "x"})
    assert not caplog.records
    calibrated_inferer(object(), tmp_path / "ok.json", {"tta": True})
    assert "fitted with tta=False, this job scores with tta=True" in caplog.text


def test_uncertainty_values_in_unit_interval() -> None:
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([0.3] * 4, 300)
    u = normalised_entropy(probs)
    assert ((u >= 0) & (u <= 1)).all()
    assert normalised_entropy([[0.25] * 4, [1, 0, 0, 0]]) == pytest.approx([1.0, 0.0])
    assert normalised_entropy(np.array([0.5])) == pytest.approx([1.0])  # one sigmoid output
    spread = member_spread([rng.dirichlet([1, 1], 50) for _ in range(5)])
    assert spread.shape == (50,) and ((spread >= 0) & (spread <= 1)).all()
    assert member_spread([np.array([[0.9, 0.1]]), np.array([[0.6, 0.4]])]) == pytest.approx([0.3])
    assert fit_threshold(np.linspace(0, 1, 101), 0.1) == pytest.approx(0.9)


def test_flag_accuracy_counts() -> None:
    probs = np.array([[0.99, 0.01], [0.98, 0.02], [0.55, 0.45], [0.5, 0.5]])
    out = flag_accuracy([0, 0, 1, 1], probs, threshold=0.9)
    assert out["n_flagged"] == 2 and out["accuracy_flagged"] == 0.0 and out["accuracy_unflagged"] == 1.0


def test_report_writes_uncertainty_columns(tmp_path: Path) -> None:
    """predictions.csv of an evaluator run carries `uncertainty` in [0, 1] and the flag above the threshold."""
    import csv

    probs = [torch.sigmoid(torch.tensor([z])) for z in (4.0, 0.05, -3.0)]  # post-processed: one sigmoid output

    def step(engine: Engine, batch: list) -> list:
        return [{"pred": probs[i["i"]], "label": torch.tensor([1.0])} for i in batch]

    engine = Engine(step)
    ClassificationReport(str(tmp_path), ["no", "yes"], n_boot=0, columns=[UncertaintyColumns(0.5)]).attach(engine)
    engine.run([[{"i": i, "path": f"case{i}.png"}] for i in range(3)], max_epochs=1)
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    values = [float(r["uncertainty"]) for r in rows]
    assert all(0 <= v <= 1 for v in values) and values[1] > 0.99
    assert [r["flag"] for r in rows] == ["", FLAG_TEXT, ""]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"ece", "brier"} <= set(metrics["metrics"]) and "reliability" in metrics["calibration"]


def test_member_columns_for_an_ensemble() -> None:
    from medpipe.evaluation.uncertainty import member_columns

    members = [np.array([[0.95, 0.05], [0.9, 0.1]]), np.array([[0.97, 0.03], [0.2, 0.8]])]
    header, cells = member_columns(members, threshold=0.5)
    assert header == ["uncertainty", "member_spread", "flag"]
    assert cells[0][1] == "0.0200" and cells[0][2] == ""
    assert cells[1][1] == "0.7000" and cells[1][2] == FLAG_TEXT  # members disagree: mean 0.55/0.45 is uncertain
    assert all(0 <= float(c[0]) <= 1 for c in cells)


def test_member_spread_column_only_when_the_inferer_averages_members(tmp_path: Path) -> None:
    from medpipe.evaluation.calibration import TemperatureScaledInferer, report_columns
    from medpipe.inferers.mirror import MirrorAveragingInferer

    def plain(x: torch.Tensor, net: Any) -> torch.Tensor:
        return net(x)

    def headers(inferer: Any) -> list[str]:
        return [h for c in report_columns(None, None, inferer) for h in c.header]

    assert "member_spread" not in headers(plain)
    assert "member_spread" not in headers(TemperatureScaledInferer(plain, 2.0))  # a temperature alone has no members
    mirror = MirrorAveragingInferer(plain, activation="softmax")
    assert "member_spread" in headers(mirror) and "member_spread" in headers(TemperatureScaledInferer(mirror, 2.0))
    # the temperature-scaled column reads the mirror's members divided by T: its spread is the calibrated one
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 4), torch.nn.Flatten())  # (5, 1, 4, 4) images → (5, 3) logits
    x = torch.rand(5, 1, 4, 4)
    scaled = TemperatureScaledInferer(mirror, 2.0)
    column = next(c for c in report_columns(None, None, scaled) if c.header == ["member_spread"])
    with torch.no_grad():
        scaled(x, net)  # the mirror flips the images: the second member sees other pixels
    column.batch_scored(5)
    spreads = [float(column.cells("p", np.zeros(3))[0]) for _ in range(5)]
    members = torch.softmax(mirror.last_member_logits / 2.0, dim=2).numpy()
    chosen = members.mean(axis=0).argmax(axis=1)
    want = np.abs(members[0, np.arange(5), chosen] - members[1, np.arange(5), chosen])
    np.testing.assert_allclose(spreads, want, atol=1e-4)
