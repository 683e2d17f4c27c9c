"""Cross-validation summaries are rebuilt from the fold files: mean ± sd over folds and pooled out-of-fold CIs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medpipe.cli.commands import cv_report_command
from medpipe.errors import MedpipeError
from medpipe.evaluation.cv import write_summary
from medpipe.evaluation.metrics import classification_report


def _fold(folder: Path, labels: list[int], probs: list[float]) -> None:
    folder.mkdir(parents=True)
    report = classification_report(labels, probs, ["no", "yes"], n_boot=20)
    (folder / "metrics.json").write_text(json.dumps(report))
    with (folder / "predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "prob_no", "prob_yes", "predicted", "label"])
        for i, (y, p) in enumerate(zip(labels, probs, strict=True)):
            writer.writerow([f"img{i}.png", 1 - p, p, "yes" if p >= 0.5 else "no", ["no", "yes"][y]])


def test_summary_mean_sd_and_pooled(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fold(tmp_path / "fold0", [0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])  # accuracy 0.75
    _fold(tmp_path / "fold1", [0, 1, 1, 0], [0.2, 0.8, 0.9, 0.3])  # accuracy 1.0
    summary = write_summary(tmp_path, {"network": "toy"})
    assert summary["accuracy"]["mean"] == pytest.approx(0.875)
    assert summary["accuracy"]["sd"] == pytest.approx(np.std([0.75, 1.0], ddof=1), abs=1e-4)
    pooled = summary["pooled_out_of_fold"]
    assert pooled["n"] == 8 and pooled["metrics"]["accuracy"]["value"] == pytest.approx(7 / 8)
    assert json.loads((tmp_path / "cv_summary.json").read_text())["network"] == "toy"
    cv_report_command(str(tmp_path))  # rebuilds from the files, keeping the run info
    assert json.loads((tmp_path / "cv_summary.json").read_text())["network"] == "toy"
    assert "2 folds" in capsys.readouterr().out


def test_summary_without_folds_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="no fold"):
        write_summary(tmp_path, {})


def test_parallel_folds_write_every_fold_and_the_summary(tmp_path: Path) -> None:
    from medpipe.data.synthetic import make_synthetic_set
    from medpipe.evaluation.cv import run_cv

    data = make_synthetic_set(tmp_path / "data", per_class=6, size=64)
    summary = run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(tmp_path / "cv"), parallel=2,
                     dataset_dir=str(data), epochs=1)  # fmt: skip
    assert summary["parallel"] == 2 and summary["folds"] == 2 and summary["n"] == 12
    splits = json.loads((tmp_path / "cv" / "splits.json").read_text())
    for fold in (0, 1):  # every fold job scored exactly the images splits.json holds out for it
        with (tmp_path / "cv" / f"fold{fold}" / "predictions.csv").open(newline="") as fh:
            scored = [row["path"] for row in csv.DictReader(fh)]
        assert sorted(scored) == sorted(splits["folds"][fold]["val"]) and scored


def test_a_failing_fold_in_a_worker_process_fails_the_cv(tmp_path: Path) -> None:
    from medpipe.evaluation.cv import run_cv

    with pytest.raises(MedpipeError, match="missing_folder"):
        run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(tmp_path / "cv"), parallel=2,
               dataset_dir=str(tmp_path / "missing_folder"), epochs=1)  # fmt: skip
    with pytest.raises(MedpipeError, match="parallel"):
        run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(tmp_path / "cv"), parallel=0)
