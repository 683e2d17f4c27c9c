"""covid_ct_seg trained, evaluated and applied from 3-D volume layouts (medpipe.data.layouts): the real CIP chest CT
(`ct_volumes/cip_ct64`) and its mirror image laid out by the test as an nnU-Net v2 raw folder and as an MSD datalist
folder. Both layouts give the same slices in the same geometry and, with one seed, the same weights; the HU
normalisation is fitted on the training case, stored beside the model and applied by evaluation and volumetric
inference; a bad data set is refused in one line before training. The CIP DICOM series with a DICOM-SEG gives the
nnU-Net layout's slices voxel for voxel. Last, the shipped PNG slices converted to an nnU-Net raw folder pass the data
set check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cip_layouts import dicom_seg, msd, nnunet, read_cip, two_cases

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.data.convert import convert_dataset
from medpipe.data.integrity import bundle_classes, check_dataset, format_report
from medpipe.data.layouts import segmentation_datalists
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.io import ct
from medpipe.transforms.ct_intensity import channel_scheme, normalise_hu, normalise_volume
from medpipe.transforms.volume_slices import VolumeSliceReader

BUNDLE = REPO / "bundles" / "covid_ct_seg"
# fold 0 of 2: one case trains, the other is held out; a lung-only data set, so infection is declared absent
COMMON = {"image_size": 32, "patch_size": 0, "batch_size": 16, "absent_structures": "infection", "tta": False,
          "num_folds": 2, "fold": 0, "seed": 0}  # fmt: skip
FIGURES = {"scheme": "nnunet_ct", "clip_low": -1000.0, "clip_high": -300.0, "mean": -870.0, "std": 120.0}


@pytest.fixture(scope="module")
def cip() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return read_cip()


@pytest.fixture(scope="module")
def folders(cip: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    cases = two_cases(cip)
    return {"nnunet": nnunet(root / "nnunet", cip, cases=cases), "msd": msd(root / "msd", cip, cases=cases)}


@pytest.fixture(scope="module")
def trained(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checkpoint folder of each layout, trained 2 epochs with the same seed."""
    models = {}
    for layout, folder in folders.items():
        models[layout] = tmp_path_factory.mktemp(f"models_{layout}")
        run_bundle(BUNDLE, "train", dataset_dir=str(folder), ckpt_dir=str(models[layout]), epochs=2, val_interval=1,
                   **COMMON)  # fmt: skip
    return models


def refusal(job: str, **overrides: object) -> str:
    """The one line a bundle job run in this process is refused with (MONAI wraps it; the CLI prints it alone)."""
    with pytest.raises(Exception) as info:
        run_bundle(BUNDLE, job, **overrides)
    error = find_medpipe_error(info.value)
    assert error is not None, info.value
    assert "\n" not in str(error)
    return str(error)


def _datalists(folder: Path) -> dict[str, list[dict]]:
    classes = bundle_classes(BUNDLE)
    return segmentation_datalists(folder, "auto", 0, 2, 0, bundle="covid_ct_seg", class_names=classes["class_names"],
                                  structures=classes["structures"], absent_structures="infection")  # fmt: skip


# ------------------------------------------------------------------------------------------------ same data, same net


def test_both_layouts_give_the_same_slices_in_the_same_geometry(cip: tuple, folders: dict[str, Path]) -> None:
    nn, md = _datalists(folders["nnunet"]), _datalists(folders["msd"])
    keys = ("path", "group", "slice")
    for part in ("train", "val"):
        assert [[it[k] for k in keys] for it in nn[part]] == [[it[k] for k in keys] for it in md[part]]
    # folds keep a case whole: one case trains, the other is held out, 79 axial slices each
    assert {it["group"] for it in nn["train"]} | {it["group"] for it in nn["val"]} == {"cip", "cipmirror"}
    assert len({it["group"] for it in nn["val"]}) == 1 and len(nn["train"]) == len(nn["val"]) == 79
    assert nn["train"][0]["label_classes"] == {"0": 0, "1": 1}  # lung -> lung not infected (infection absent)

    # at the native in-plane size nothing is resampled: the slices are the CIP voxels, in display orientation
    ct_hu, lung, affine = cip
    reader = VolumeSliceReader(64, 3, FIGURES)
    expected_image = ct.display_slices(normalise_hu(ct_hu, FIGURES), affine, size=None)
    expected_label = ct.display_slices(lung, affine, size=None)
    for nn_item, md_item in zip(nn["train"] + nn["val"], md["train"] + md["val"], strict=True):
        a, b = reader(nn_item), reader(md_item)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        if nn_item["group"] == "cip":
            k = nn_item["slice"]
            np.testing.assert_array_equal(a["label"][0].numpy(), expected_label[k])
            np.testing.assert_array_equal(a["image"][1].numpy(), expected_image[k])  # the middle of 3 channels
            np.testing.assert_array_equal(a["image"][0].numpy(), expected_image[max(k - 1, 0)])
    lung_voxels = sum(int(reader(it)["label"].sum()) for it in nn["train"] + nn["val"] if it["group"] == "cip")
    assert lung_voxels == 65_624  # the README's count of wholeLung-64.nrrd


def test_same_seed_same_weights_and_the_normalisation_stored_beside_the_model(trained: dict[str, Path]) -> None:
    weights = {k: torch.load(v / "model.pt", weights_only=True) for k, v in trained.items()}
    assert weights["nnunet"].keys() == weights["msd"].keys()
    assert all(torch.equal(weights["nnunet"][k], weights["msd"][k]) for k in weights["nnunet"])
    figures = {k: json.loads((v / "model.normalisation.json").read_text()) for k, v in trained.items()}
    assert figures["nnunet"] == figures["msd"]
    stored = figures["nnunet"]
    # nnU-Net's CT scheme on the one training case's lung: the README gives mean HU -874 inside the lung mask
    assert stored["scheme"] == "nnunet_ct" and stored["cases"] == 1 and abs(stored["mean"] + 874) < 5
    assert -1008 <= stored["clip_low"] < stored["mean"] < stored["clip_high"] < 0 and stored["std"] > 0
    assert len(json.loads((trained["nnunet"] / "model.trained_on.json").read_text())) == 1  # one volume file


def test_evaluate_scores_the_held_out_case_with_the_stored_normalisation(
    trained: dict[str, Path], folders: dict[str, Path], tmp_path: Path
) -> None:
    run_bundle(BUNDLE, "evaluate", dataset_dir=str(folders["nnunet"]), ckpt_dir=str(trained["nnunet"]),
               output_dir=str(tmp_path / "eval"), **COMMON)  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 79 and metrics["n_volumes"] == 1 and metrics["dataset_layout"] == "nnunet"
    assert 0.0 <= metrics["metrics"]["per_volume"]["dice_lung"]["value"] <= 1.0

    (trained["nnunet"] / "model.normalisation.json").rename(tmp_path / "kept.json")  # a model without its figures
    try:
        message = refusal("evaluate", dataset_dir=str(folders["nnunet"]), ckpt_dir=str(trained["nnunet"]),
                          output_dir=str(tmp_path / "eval2"), **COMMON)  # fmt: skip
    finally:
        (tmp_path / "kept.json").rename(trained["nnunet"] / "model.normalisation.json")
    assert "model.normalisation.json' not found: the checkpoint was not trained on HU volumes" in message
    assert not (tmp_path / "eval2").exists()


def test_inference_applies_the_stored_normalisation(trained: dict[str, Path], folders: dict[str, Path],
                                                     tmp_path: Path) -> None:  # fmt: skip
    ckpt, volume = trained["nnunet"], folders["nnunet"] / "imagesTr" / "cip_0000.nii.gz"
    infer = {"input": str(volume), "ckpt_dir": str(ckpt), "image_size": 32, "tta": False, "input_guard": False}
    run_bundle(BUNDLE, "inference", output_dir=str(tmp_path / "a"), **infer)
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    stored = json.loads((ckpt / "model.normalisation.json").read_text())
    assert report["normalisation"] == stored and report["preprocessing"].startswith("HU clipped to")

    # other figures beside the same weights give another segmentation: inference reads the file
    changed = {**stored, "mean": stored["mean"] + 400.0}
    (ckpt / "model.normalisation.json").write_text(json.dumps(changed))
    try:
        run_bundle(BUNDLE, "inference", output_dir=str(tmp_path / "b"), **infer)
    finally:
        (ckpt / "model.normalisation.json").write_text(json.dumps(stored))
    masks = [ct.load_nifti(tmp_path / d / "cip_0000_seg.nii.gz").array for d in ("a", "b")]
    assert not np.array_equal(masks[0], masks[1])

    message = refusal("inference", output_dir=str(tmp_path / "c"), window="lung", **infer)
    assert "trained on HU volumes and reads their stored normalisation; use --window hu_ct" in message
    assert not (tmp_path / "c").exists()


def test_dicom_seg_gives_the_nnunet_layouts_slices_voxel_for_voxel(cip: tuple, tmp_path: Path) -> None:
    """The CIP DICOM series with a SEG of its lung mask (medpipe's own writer) against the same CT and mask as an
    nnU-Net folder: the same items (all training, fold -1), the same image and label slices."""
    classes = bundle_classes(BUNDLE)
    lists = {
        name: segmentation_datalists(folder, "auto", -1, 2, 0, bundle="covid_ct_seg",
                                     class_names=classes["class_names"], structures=classes["structures"],
                                     absent_structures="infection")["train"]
        for name, folder in [("seg", dicom_seg(tmp_path, cip)), ("nnunet", nnunet(tmp_path, cip))]
    }  # fmt: skip
    keys = ("path", "volume_group", "slice", "label_classes")
    assert [[it[k] for k in keys] for it in lists["seg"]] == [[it[k] for k in keys] for it in lists["nnunet"]]
    assert len(lists["seg"]) == 79 and lists["seg"][0]["label"].endswith("cip/lung.seg.dcm")
    # folds group the DICOM case by its patient (the SEG's PatientID); the nnU-Net folder names no patient
    import pydicom

    patient = str(pydicom.dcmread(lists["seg"][0]["label"], stop_before_pixels=True).PatientID)
    assert patient and {it["group"] for it in lists["seg"]} == {patient}
    assert {it["group"] for it in lists["nnunet"]} == {"cip"}
    reader = VolumeSliceReader(64, 3, FIGURES)
    lung_voxels = 0
    for seg_item, nn_item in zip(lists["seg"], lists["nnunet"], strict=True):
        a, b = reader(seg_item), reader(nn_item)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        lung_voxels += int(a["label"].sum())
    assert lung_voxels == 65_624


# ------------------------------------------------------------------------------------------------------- refusals


def test_a_bad_layout_is_refused_in_one_line_before_training(cip: tuple, tmp_path: Path) -> None:
    label = cip[1].copy()
    label[30:34, 30:34, 40] = 2  # a value dataset.json does not declare
    folder = nnunet(tmp_path / "bad", cip, label=label)
    models = tmp_path / "models"
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(BUNDLE / "configs" / "train.json"), "--dataset_dir", str(folder), "--ckpt_dir", str(models),
               "--epochs", "1", "--fold", "-1", "--image_size", "32", "--absent_structures", "infection"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medpipe error:") and "the data set check found 1 problem(s), first: case cip: " \
        "labelsTr/cip.nii.gz: label values [2] not declared in dataset.json labels" in last, result.stderr[-2000:]
    assert not models.exists()


WITH_INFECTION = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1, "infection": 2},
                  "numTraining": 1, "file_ending": ".nii.gz"}  # fmt: skip


@pytest.mark.parametrize(
    ("description", "overrides", "message"),
    [(None, {}, "class 'infection' has no label in this data set (missing: infection); map one with --label_map"),
     (WITH_INFECTION, {"absent_structures": "infection"},
      "--absent_structures names 'infection', but label(s) infection (2) map onto it"),
     (None, {"absent_structures": "liver"}, "--absent_structures: 'liver' is not a structure of covid_ct_seg"),
     (None, {"label_map": {"lung": ["lungs"]}}, "--label_map: 'lungs' is not a label of the data set (background"),
     (None, {"absent_structures": "infection", "infection_free": "."}, "--infection_free adds slices in the PNG"),
     (None, {"absent_structures": "infection", "dataset_layout": "msd"}, "'training' must be a list")],
)  # fmt: skip
def test_labels_that_cannot_be_mapped_are_refused(
    cip: tuple, tmp_path: Path, description: dict | None, overrides: dict, message: str
) -> None:
    folder = nnunet(tmp_path, cip, description=description)
    refused = refusal("train", dataset_dir=str(folder), ckpt_dir=str(tmp_path / "models"), epochs=1, fold=-1,
                      image_size=32, **overrides)  # fmt: skip
    assert message in refused
    assert not (tmp_path / "models").exists()


def test_label_map_on_the_png_layout_is_refused() -> None:
    with pytest.raises(MedpipeError, match="map the labels of a volume layout"):
        segmentation_datalists(real_dataset("covid_ct_seg"), "auto", 0, absent_structures="infection")


def test_absent_structure_maps_lung_onto_lung_not_infected(cip: tuple, tmp_path: Path) -> None:
    report = check_dataset(nnunet(tmp_path, cip), None, bundle_classes(BUNDLE), {}, ["infection"])
    assert report.ok and report.class_values == {0: 0, 1: 1}
    assert "covid_ct_seg infection <- none: declared absent (--absent_structures)" in report.notes
    named = nnunet(tmp_path / "b", cip, description=WITH_INFECTION)
    assert check_dataset(named, None, bundle_classes(BUNDLE)).class_values == {0: 0, 1: 1, 2: 2}


def test_a_patients_cases_stay_in_one_fold(cip: tuple, tmp_path: Path) -> None:
    """Three MSD cases, two of them one patient's (`patient` in their entries): every fold keeps that patient's
    cases together and the check's summary says so; an nnU-Net-style splits_final.json of cases is taken, and one
    that splits the patient is refused."""
    ct_hu, lung, _ = cip
    root = msd(tmp_path, cip, cases={**two_cases(cip), "cipagain": (ct_hu, lung)})
    description = json.loads((root / "dataset.json").read_text())
    patients = {"cip": "p1", "cipagain": "p1", "cipmirror": "p2"}
    for entry in description["training"]:
        entry["patient"] = patients[Path(entry["image"]).name.split(".")[0]]
    (root / "dataset.json").write_text(json.dumps(description))
    classes = bundle_classes(BUNDLE)
    assert "by patient: 2 patient(s) over 3 case(s)" in format_report(check_dataset(root, None, classes))

    def held_out(fold: int, splits_file: str | None = None) -> set[str]:
        lists = segmentation_datalists(root, "auto", fold, 2, 0, bundle="covid_ct_seg", splits_file=splits_file,
                                       class_names=classes["class_names"], structures=classes["structures"],
                                       absent_structures="infection")  # fmt: skip
        return {it["volume_group"] for it in lists["val"]}

    assert sorted(map(sorted, (held_out(0), held_out(1)))) == [["cip", "cipagain"], ["cipmirror"]]
    cases = [{"train": ["cip", "cipagain"], "val": ["cipmirror"]}, {"train": ["cipmirror"], "val": ["cip", "cipagain"]}]
    (root / "splits_final.json").write_text(json.dumps(cases))
    assert held_out(0, str(root / "splits_final.json")) == {"cipmirror"}
    (root / "splits_final.json").write_text(json.dumps([{"train": ["cip", "cipmirror"], "val": ["cipagain"]},
                                                        {"train": ["cipagain"], "val": ["cip", "cipmirror"]}]))
    with pytest.raises(MedpipeError, match="fold 0 has group 'p1' on both sides"):
        held_out(0, str(root / "splits_final.json"))


def test_the_channel_name_picks_nnunets_normalisation() -> None:
    """As nnU-Net maps channel names (casefolded) to its normalisation schemes; any other name is a z-score."""
    names = {"CT": "nnunet_ct", "ct": "nnunet_ct", "noNorm": "nnunet_nonorm", "rescale_to_0_1": "nnunet_rescale_to_0_1",
             "CLAHE": "nnunet_zscore", "T2": "nnunet_zscore"}  # fmt: skip
    assert {name: channel_scheme(name) for name in names} == names
    volume = np.array([[[0.0, 10.0], [20.0, 30.0]]], dtype=np.float32)
    scaled = normalise_volume(volume, {"scheme": "nnunet_rescale_to_0_1"})
    np.testing.assert_allclose(scaled.ravel(), [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)
    np.testing.assert_array_equal(normalise_volume(volume, {"scheme": "nnunet_nonorm"}), volume)


# ----------------------------------------------------------------------------------------- PNG slices -> nnU-Net raw


def medpipe_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medpipe", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip


def test_png_slices_convert_to_an_nnunet_folder_that_passes_the_check(tmp_path: Path) -> None:
    from PIL import Image

    source = real_dataset("covid_ct_seg")
    target = tmp_path / "Dataset601_CovidCT"
    result = medpipe_cli("dataset", "convert", str(source), str(target), "--to", "nnunet", "--max_cases", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote 2 case(s) (279 slices) to {target}"  # coronacases_001 (159) and 002 (120)
    result = medpipe_cli("dataset", "check", str(target), "--bundle", "covid_ct_seg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cases         2 training" in result.stdout and "covid_ct_seg infection <- infection (2)" in result.stdout

    # each case's volume gives its PNGs back, in source_index order, in medpipe's display orientation
    entries = [e for e in json.loads((source / "datalist.json").read_text())["training"]
               if e["volume_group"] == "coronacases_002"]  # fmt: skip
    entries.sort(key=lambda e: e["source_index"])
    for file, key in [("imagesTr/coronacases_002_0000.nii.gz", "image"), ("labelsTr/coronacases_002.nii.gz", "label")]:
        volume = ct.load_nifti(target / file)
        planes = ct.display_slices(volume.array, volume.affine, size=None)
        pngs = np.stack([np.asarray(Image.open(source / e[key])) for e in entries])
        np.testing.assert_array_equal(planes, pngs)
    assert volume.spacing == pytest.approx((1.0, 1.0, 1.0))

    # the converted folder trains and evaluates through the volume path: channel `CLAHE` is not HU, so each volume is
    # z-scored (nnU-Net's scheme for such a name), and nnU-Net's splits_final.json (cases) gives the folds
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["coronacases_001"], "val": ["coronacases_002"]},
                                  {"train": ["coronacases_002"], "val": ["coronacases_001"]}]))
    models = tmp_path / "models"
    common = {"dataset_dir": str(target), "ckpt_dir": str(models), "image_size": 32, "patch_size": 0, "tta": False,
              "num_folds": 2, "fold": 0, "splits_file": str(splits)}  # fmt: skip
    run_bundle(BUNDLE, "train", epochs=1, batch_size=32, val_interval=1000, **common)
    stored = json.loads((models / "model.normalisation.json").read_text())
    assert stored["scheme"] == "nnunet_zscore" and stored["channel"] == "CLAHE" and stored["cases"] == 1
    zscored = normalise_volume(ct.load_nifti(target / "imagesTr" / "coronacases_002_0000.nii.gz").array, stored)
    assert abs(float(zscored.mean())) < 1e-4 and abs(float(zscored.std()) - 1.0) < 1e-3
    run_bundle(BUNDLE, "evaluate", output_dir=str(tmp_path / "eval"), **common)
    scored = (tmp_path / "eval" / "per_volume.csv").read_text().splitlines()
    assert len(scored) == 2 and scored[1].startswith("coronacases_002,120,")
    # such a model reads no HU, so it is not run on CT series
    message = refusal("inference", input=str(target / "imagesTr" / "coronacases_002_0000.nii.gz"),
                      ckpt_dir=str(models), output_dir=str(tmp_path / "infer"))  # fmt: skip
    assert "trained on the 'CLAHE' channel of its data set, not on CT in HU" in message
    assert not (tmp_path / "infer").exists()

    with pytest.raises(MedpipeError, match="exists and is not an empty folder: convert into a new folder"):
        convert_dataset(source, target, "nnunet")
    with pytest.raises(MedpipeError, match="--to msd: medpipe converts the PNG slices to nnunet"):
        convert_dataset(source, tmp_path / "Task01_CovidCT", "msd")
    assert not (tmp_path / "Task01_CovidCT").exists()
