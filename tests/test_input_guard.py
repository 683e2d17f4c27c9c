"""Wrong-input guard: flags images of another modality, passes the bundle's own, ships a reproducible file."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from conftest import real_dataset
from medpipe.cli import main
from medpipe.errors import MedpipeError
from medpipe.evaluation.reports import ClassificationReport
from medpipe.inference.guard_fit import _held_out, fit_guard
from medpipe.inference.input_guard import OK, InputGuard, ModalityModel, default_guard_file, image_features


def _held_out_brain_image() -> str:
    """A brain MRI whose near-duplicate group the shipped guard was not fitted on."""
    root = real_dataset("brain_mri_yes_no")
    with (root / "MANIFEST.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if _held_out(r["near_duplicate_group"] or r["path"])]
    return str(root / rows[0]["path"])


def _held_out_ct_slice() -> str:
    root = real_dataset("covid_ct_seg")
    items = json.loads((root / "datalist.json").read_text())["training"]
    return str(root / next(i["image"] for i in items if _held_out(i["volume_group"])))


def test_guard_flags_a_ct_slice_given_to_the_brain_bundle_and_passes_a_brain_image(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = InputGuard("brain_mri")
    ct, brain = _held_out_ct_slice(), _held_out_brain_image()
    with caplog.at_level(logging.WARNING, logger="medpipe.inference.input_guard"):
        modality, verdict = guard.check(ct)
    assert modality == "ct" and verdict.startswith("input looks like a CT slice") and "not a brain MRI" in verdict
    assert [r.getMessage() for r in caplog.records] == [f"{ct}: {verdict}"]  # one line per flagged case
    assert guard.check(brain) == ("brain_mri", OK)
    assert InputGuard("ct").check(ct) == ("ct", OK)


def test_guard_column_in_predictions_csv(tmp_path: Path) -> None:
    """A classifier's inference run writes the guard's verdict per case beside the uncertainty columns."""
    paths = [_held_out_brain_image(), _held_out_ct_slice()]

    def step(engine: Engine, batch: list) -> list:
        return [{"pred": torch.tensor([0.7])} for _ in batch]

    engine = Engine(step)
    guard = InputGuard("brain_mri")
    ClassificationReport(str(tmp_path), ["no", "yes"], with_labels=False,
                         columns=[guard, None]).attach(engine)  # fmt: skip
    engine.run([[{"path": p}] for p in paths], max_epochs=1)
    with (tmp_path / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["input_modality"] for r in rows] == ["brain_mri", "ct"]
    assert rows[0]["input_guard"] == OK and "not trustworthy" in rows[1]["input_guard"]


def test_guard_handler_writes_input_guard_csv(tmp_path: Path) -> None:
    """As an ignite handler (the segmentation bundle has no ClassificationReport) it checks every batch item."""
    ct = _held_out_ct_slice()
    engine = Engine(lambda e, b: None)
    InputGuard("chest_xray", output_dir=tmp_path).attach(engine)
    engine.run([[{"path": ct}]], max_epochs=1)
    rows = (tmp_path / "input_guard.csv").read_text().splitlines()
    assert rows[0] == "path,input_modality,input_guard" and "not a chest X-ray" in rows[1]


def test_guard_cli_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["guard", "check", _held_out_brain_image(), "--expected", "brain_mri"]) == 0
    assert ": ok (most like brain_mri)" in capsys.readouterr().out
    assert main(["guard", "check", "x.png", "--expected", "knee"]) == 2


def test_bad_expected_modality_and_bad_file_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="not one of"):
        InputGuard("knee_xray")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(MedpipeError, match="medpipe guard fit"):
        InputGuard("ct", model_file=tmp_path / "broken.npz")


def test_model_file_round_trip_without_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = ModalityModel(["brain_mri", "chest_xray", "ct"], rng.random(5), rng.random(5) + 1, rng.normal(size=(3, 5)),
                          rng.normal(size=3))  # fmt: skip
    model.save(tmp_path / "g.npz", command="test")
    with np.load(tmp_path / "g.npz", allow_pickle=False) as data:
        assert list(data["meta"]) == ["command=test"]
    again = ModalityModel.load(tmp_path / "g.npz")
    x = rng.random((4, 5))
    assert np.allclose(again.probabilities(x), model.probabilities(x), atol=1e-5)
    assert image_features(rng.random((300, 200))).shape == (32 * 32 + 16,)


def test_guard_file_is_fitted_on_first_use_and_reproducible(tmp_path: Path) -> None:
    """The guard fitted on first use (cache folder) equals `medpipe guard fit` run again (same seed, same data)."""
    real_dataset("covid_cxr")
    shipped_path = default_guard_file(fit_if_missing=True)
    fit_guard(Path(real_dataset("brain_mri_yes_no")).parent, tmp_path / "refit.npz", measure_held_out=False)
    with np.load(shipped_path, allow_pickle=False) as shipped, np.load(tmp_path / "refit.npz") as refit:
        assert list(shipped["classes"]) == list(refit["classes"])
        for name in ("mean", "scale", "coef", "intercept"):
            assert np.allclose(shipped[name], refit[name], rtol=1e-4, atol=1e-5), name


def test_unfitted_guard_without_data_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's coefficients are never committed: with no cached fit and no shared data, say how to get one."""
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.delenv("MEDPIPE_DATA", raising=False)
    with pytest.raises(MedpipeError, match="not fitted yet.*medpipe guard fit.*--input_guard false"):
        InputGuard("ct")
    assert not (tmp_path / "empty_cache" / "input_guard.npz").exists()
