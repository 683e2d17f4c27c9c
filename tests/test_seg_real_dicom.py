"""covid_ct_seg on real clinical DICOM, through the bundle as a user runs it: a short training of the default recipe
on all development slices (no real series is in them), then volumetric inference of COVID-CT-MD patient P002 and
the pre-COVID RIDER series. Floors sit below what this short training measured (see the constants): they catch a
pipeline that turns real DICOM into noise again (the v1 model ranked P002's slices at ROC-AUC 0.33), not the
issue's goals, which the full model is measured against (benchmarks/ct_real_dicom.py, results log)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.evaluation.real_dicom import read_slice_labels, slice_label_figures
from medpipe.io import ct

BUNDLE = REPO / "bundles" / "covid_ct_seg"
EPOCHS = 15  # about 6 min on 2 threads
# measured with EPOCHS on 2 threads (tests run with OMP_NUM_THREADS=2): P002 slice AUC 0.734, RIDER 37.3 mL
# (6 epochs were too few: one series' lung came out at 21 mL); the default full model (fold 0, 80 epochs):
# 0.866 / 32.3 mL (results log §9)
MIN_P002_SLICE_AUC = 0.65
MAX_RIDER_INFECTION_ML = 60.0


@pytest.mark.slow
def test_short_trained_default_on_real_dicom(tmp_path: Path) -> None:
    data = real_dataset("covid_ct_seg")
    p002 = real_dataset("covid_ct_md") / "P002"
    rider = real_dataset("dicom") / "rider_pilot_chest_ct_0117"
    common = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "m"), "fold": -1}
    run_bundle(BUNDLE, "train", None, epochs=EPOCHS, val_interval=1000, output_dir=str(tmp_path / "t"), **common)
    out = tmp_path / "inference"
    run_bundle(BUNDLE, "inference", None, input=[str(p002), str(rider)], output_dir=str(out), **common)

    report = json.loads((out / "report.json").read_text())
    by_name = {Path(v["input"]).name: v for v in report["volumes"]}
    print({k: (v["lung_volume_ml"], v["infection_volume_ml"]) for k, v in by_name.items()})
    assert set(by_name) == {"P002", rider.name}
    assert "minmax_slice" in report["preprocessing"] and "relabelled lung" in report["preprocessing"]
    for entry in by_name.values():  # every series completes: masks and report; RIDER also its DICOM-SEG
        assert {"seg", "lung", "infection"} <= set(entry["files"])
        assert 500 < entry["lung_volume_ml"] < 9000
    assert by_name[rider.name]["files"]["dicom_seg"].endswith(".dcm")
    assert "no DICOM-SEG" in " ".join(by_name["P002"]["warnings"])

    volume = ct.load_volume(p002)
    mask = np.asarray(nib.load(out / by_name["P002"]["files"]["seg"]).dataobj)
    labels = read_slice_labels(p002.parent / "slice_labels.csv")
    figures = slice_label_figures(mask, volume.affine, volume.source_files, labels)
    print(f"P002 {figures}; RIDER infection {by_name[rider.name]['infection_volume_ml']} mL")
    assert figures["slice_auc"] >= MIN_P002_SLICE_AUC
    assert by_name[rider.name]["infection_volume_ml"] <= MAX_RIDER_INFECTION_ML
