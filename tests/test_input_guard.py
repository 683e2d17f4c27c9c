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
    flags = [r.getMessage() for r in caplog.records if r.name == "medpipe.inference.input_guard"]
    assert flags == [f"{ct}: {verdict}"]  # one line per flagged case (a first-use fit may log its DICOM reading)
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


# ------------------------------------------------- the CT route: every real CT series passes, other modalities do not


def test_every_real_ct_series_passes_the_ct_route_guard() -> None:
    """Each real CT series in the shared data (DICOM from four scanners, as the CT route renders them, and each
    development volume group and the infnet crops as image files) is judged CT by the route's per-series verdict
    (benchmarks/guard_false_alarms.py prints the per-slice table)."""
    from medpipe.inference.guard_fit import CT_VOLUME_SERIES, _route_planes
    from medpipe.inference.input_guard import central_slices, file_features

    root = Path(real_dataset("covid_ct_seg")).parent
    guard = InputGuard("ct", log_flags=False)
    series = [name for name in CT_VOLUME_SERIES if (root / name).is_dir()]
    assert len(series) == len(CT_VOLUME_SERIES), series
    for name in series:
        assert guard.check_volume(_route_planes(str(root / name)), name)[1] == OK, name
    groups: dict[str, list[str]] = {}
    for item in json.loads((root / "covid_ct_seg" / "datalist.json").read_text())["training"]:
        groups.setdefault(item["volume_group"], []).append(str(root / "covid_ct_seg" / item["image"]))
    groups["extra_medseg_infnet"] = sorted(str(p) for p in (root / "covid_ct_seg/extra_medseg_infnet/images").iterdir())
    for group, files in groups.items():  # the route's rule: mean probabilities of central slices
        picked = [sorted(files)[i] for i in central_slices(len(files))]
        probs = guard.model.probabilities(np.stack([file_features(f) for f in picked])).mean(axis=0)
        assert probs[guard.model.classes.index("ct")] >= 0.5, (group, probs)


@pytest.mark.parametrize("modality", ["brain_mri", "chest_xray"])
def test_a_brain_mri_or_chest_xray_sent_to_the_ct_route_is_flagged(modality: str) -> None:
    """A held-out brain MRI or chest X-ray, stacked into an HU-ranged volume (so it passes the axial / HU checks),
    is flagged by the CT route's per-series verdict."""
    from medpipe.inference.guard_fit import _cxr
    from medpipe.inference.input_guard import ct_route_planes
    from medpipe.io.dicom import Volume
    from medpipe.io.images import load_grey_2d

    if modality == "brain_mri":
        path = _held_out_brain_image()
    else:
        root = Path(real_dataset("covid_cxr")).parent
        path = next(p for p, patient in sorted(_cxr(root)) if _held_out(patient))
    grey = load_grey_2d(path)
    # columns, rows, slices as a DICOM series stores them (x to the patient's left, y to the back: upright on screen)
    volume = Volume(np.repeat((grey.T * 2000.0 - 1000.0)[..., None], 8, axis=2), np.diag([-0.7, -0.7, 5.0, 1.0]))
    likely, verdict = InputGuard("ct", log_flags=False).check_volume(ct_route_planes(volume), "wrong")
    assert verdict != OK and "not a CT slice" in verdict, (likely, verdict)


def test_a_cached_fit_of_an_older_recipe_is_not_used(tmp_path: Path) -> None:
    from medpipe.inference.input_guard import GUARD_RECIPE, _current_recipe

    rng = np.random.default_rng(0)
    model = ModalityModel(["brain_mri", "chest_xray", "ct"], rng.random(5), rng.random(5) + 1, rng.normal(size=(3, 5)),
                          rng.normal(size=3))  # fmt: skip
    model.save(tmp_path / "old.npz", command="medpipe guard fit")
    model.save(tmp_path / "new.npz", command="medpipe guard fit", recipe=GUARD_RECIPE)
    assert not _current_recipe(tmp_path / "old.npz") and not _current_recipe(tmp_path / "missing.npz")
    assert _current_recipe(tmp_path / "new.npz")
