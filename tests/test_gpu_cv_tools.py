"""tools/gpu_cv: the staged copies keep what the bundles read (sizes, label values, paths), and the fold plan."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "gpu_cv"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _grey(path: Path, shape: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def test_stage_ct_resizes_images_and_labels_and_keeps_classes(tmp_path: Path) -> None:
    stage = _load("stage_data")
    src, dst = tmp_path / "src", tmp_path / "dst"
    entries = []
    for i in range(3):
        _grey(src / f"images/v{i}_0.png", (256, 256), i)
        label = np.zeros((256, 256), np.uint8)
        label[60:200, 40:220] = 1
        label[100:140, 100:160] = 2
        (src / "labels/combined").mkdir(parents=True, exist_ok=True)
        Image.fromarray(label).save(src / f"labels/combined/v{i}_0.png")
        entries.append({"image": f"images/v{i}_0.png", "label": f"labels/combined/v{i}_0.png",
                        "lung": "labels/lung/missing.png", "volume_group": f"v{i}"})  # fmt: skip
    (src / "datalist.json").write_text(json.dumps({"training": entries}))
    stage.stage_ct(src, dst, size=128)
    staged = json.loads((dst / "datalist.json").read_text())["training"]
    assert [e["volume_group"] for e in staged] == ["v0", "v1", "v2"] and "lung" not in staged[0]
    image = np.array(Image.open(dst / staged[0]["image"]))
    label = np.array(Image.open(dst / staged[0]["label"]))
    assert image.shape == label.shape == (128, 128) and image.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1, 2}
    assert label[60, 60] == 2 and label[0, 0] == 0  # nearest keeps the structures where they were


def test_stage_cxr_writes_png_and_rewrites_labels_csv(tmp_path: Path) -> None:
    stage = _load("stage_data")
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "images").mkdir(parents=True)
    ramp = np.tile(np.linspace(0, 255, 260).astype(np.uint8), (300, 1))
    Image.fromarray(ramp).save(src / "images/a.jpg", quality=95)
    with (src / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([["image", "label", "patient_id"], ["images/a.jpg", "normal", "p1"]])
    stage.stage_cxr(src, dst, size=224)
    rows = list(csv.DictReader((dst / "labels.csv").open()))
    assert rows == [{"image": "images/a.png", "label": "normal", "patient_id": "p1"}]
    image = np.array(Image.open(dst / "images/a.png"))
    assert image.shape == (224, 224) and image.min() <= 5 and image.max() >= 250
    assert (np.diff(image[112].astype(int)) >= -3).all()  # still a left-to-right ramp


def test_fold_plan_runs_longest_jobs_first_and_smoke_runs_one_fold() -> None:
    run = _load("run_device")
    specs = run.fold_specs(smoke=False, folds=5)
    assert len(specs) == 5 * len(run.JOBS)
    costs = [s["cost"] for s in specs]
    assert costs == sorted(costs, reverse=True)
    smoke = run.fold_specs(smoke=True, folds=5)
    assert len(smoke) == len(run.JOBS) and all(s["overrides"]["epochs"] == 1 for s in smoke)


def test_refuses_to_replace_finished_results(tmp_path: Path, monkeypatch) -> None:
    run = _load("run_device")
    job = run.JOBS[0]["name"]
    (tmp_path / job).mkdir(parents=True)
    (tmp_path / job / "cv_summary.json").write_text("{}")
    monkeypatch.setattr(run, "RESULTS", tmp_path)
    monkeypatch.setattr("sys.argv", ["run_device.py", "--out", str(tmp_path / "out"), "--only", job, "--skip_bench"])
    with pytest.raises(SystemExit, match="holds finished results"):
        run.main()
    assert (tmp_path / job / "cv_summary.json").is_file()
