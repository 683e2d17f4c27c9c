"""covid_cxr_cls specifics: labels.csv checks, 16-bit PNG / DICOM input, source-aware metrics, Grad-CAM inference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.data.datalists import class_weights, labels_csv_datalists, read_labels_csv
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.evaluation.source_reports import (
    pooled_source_report,
    source_aware_report,
    source_controlled_auc,
    task_spec,
)
from medpipe.io.images import load_grey_2d

BUNDLE = REPO / "bundles" / "covid_cxr_cls"
THREE = ["covid19", "pneumonia", "normal"]
TWO_MAP = {"covid19": "covid19", "pneumonia": "non_covid", "normal": "non_covid"}


def _grey(seed: int, size: int = 40) -> np.ndarray:
    """A uint8 test picture with a full 0..255 range, so min-max scaling is the identity up to /255."""
    img = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    img[0, 0], img[0, 1] = 0, 255
    return img


def _write_dataset(root: Path, rows: list[tuple[str, str, str, str]], images: bool = True) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "label", "patient_id", "source"])
        for i, (name, label, patient, source) in enumerate(rows):
            writer.writerow([name, label, patient, source])
            if images and not (root / name).exists():
                Image.fromarray(_grey(i)).save(root / name)
    return root


def _good_rows(n_per_class: int = 4) -> list[tuple[str, str, str, str]]:
    return [
        (f"images/{label}_{i}.png", label, f"p_{label}_{i}", "ieee8023" if label != "normal" else "nih")
        for label in THREE for i in range(n_per_class)
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad_row,message",
    [
        (("images/absent.png", "covid19", "px", "ieee8023"), r"row 14: image 'images/absent.png' not found"),
        (("images/covid19_0.png", "normal", "px", "nih"), r"row 14: image 'images/covid19_0.png' is listed twice"),
        (("images/extra.png", "tuberculosis", "px", "nih"), r"row 14: unknown label 'tuberculosis'"),
    ],
    ids=["missing-image", "duplicate-image", "unknown-label"],
)
def test_labels_csv_bad_row_is_one_line_error(tmp_path: Path, bad_row: tuple, message: str) -> None:
    root = _write_dataset(tmp_path, _good_rows(), images=True)
    if bad_row[0] == "images/extra.png":
        Image.fromarray(_grey(99)).save(root / bad_row[0])
    with (root / "labels.csv").open("a", newline="") as fh:
        csv.writer(fh).writerow(bad_row)
    with pytest.raises(MedpipeError, match=message) as info:
        read_labels_csv(root, THREE)
    assert "\n" not in str(info.value) and "labels.csv" in str(info.value)


def test_labels_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path, _good_rows(), images=True)
    text = (root / "labels.csv").read_text()
    (root / "labels.csv").write_text(text, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    items = read_labels_csv(root, THREE)
    assert len(items) == len(_good_rows()) and items[0]["path"] == "images/covid19_0.png"


def test_bad_labels_csv_stops_the_bundle_in_one_line(tmp_path: Path) -> None:
    rows = _good_rows() + [("images/absent.png", "covid19", "px", "ieee8023")]
    root = _write_dataset(tmp_path / "data", rows[:-1])
    _write_dataset(root, rows, images=False)
    with pytest.raises(Exception) as info:
        run_bundle(BUNDLE, "train", dataset_dir=str(root), ckpt_dir=str(tmp_path / "m"), epochs=1, image_size=32)
    err = find_medpipe_error(info.value)
    assert err is not None and "absent.png" in str(err)


def test_two_class_task_maps_labels_and_keeps_finding(tmp_path: Path) -> None:
    root = _write_dataset(tmp_path, _good_rows())
    spec = task_spec(json.loads((BUNDLE / "configs" / "train.json").read_text())["tasks"], "2class")
    assert spec["label_map"] == TWO_MAP
    items = read_labels_csv(root, spec["class_names"], spec["label_map"])
    by_finding = {(it["finding"], it["label"]) for it in items}
    assert by_finding == {("covid19", 1), ("pneumonia", 0), ("normal", 0)}
    assert class_weights(items, 2) == pytest.approx([12 / (2 * 8), 12 / (2 * 4)])
    with pytest.raises(MedpipeError, match="unknown task 'four'"):
        task_spec({"3class": {}}, "four")


def test_sixteen_bit_png_and_dicom_load_like_the_8bit_picture(tmp_path: Path) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    grey8 = _grey(0)
    Image.fromarray(grey8).save(tmp_path / "x8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "x16.png")  # full 16-bit range
    assert Image.open(tmp_path / "x16.png").mode.startswith("I")

    def dicom(name: str, pixels: np.ndarray, photometric: str, window: tuple[int, int] | None = None) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "DX"
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        ds.save_as(tmp_path / name, enforce_file_format=True)
        return tmp_path / name

    expected = grey8.astype(np.float32) / 255
    twelve_bit = grey8.astype(np.uint16) * 16
    np.testing.assert_allclose(load_grey_2d(tmp_path / "x8.png"), expected, atol=1e-6)
    np.testing.assert_allclose(load_grey_2d(tmp_path / "x16.png"), expected, atol=1e-6)
    np.testing.assert_allclose(load_grey_2d(dicom("m2.dcm", twelve_bit, "MONOCHROME2")), expected, atol=1e-6)
    np.testing.assert_allclose(load_grey_2d(dicom("m1.dcm", 4080 - twelve_bit, "MONOCHROME1")), expected, atol=1e-6)
    # a VOI window narrower than the data clips outside it: the window, not the raw range, sets the 0..1 scale
    windowed = load_grey_2d(dicom("w.dcm", twelve_bit, "MONOCHROME2", window=(2040, 1020)))
    assert windowed.min() == 0.0 and windowed.max() == 1.0
    assert (windowed[grey8 < 64] == 0).all() and (windowed[grey8 > 192] == 1).all()


def test_source_controlled_auc_sees_through_a_source_shortcut() -> None:
    """A 'model' that only recognises the source scores a high macro-AUC but 0.5 within one source."""
    findings = ["covid19"] * 30 + ["pneumonia"] * 10 + ["pneumonia"] * 30 + ["normal"] * 30
    sources = ["ieee8023"] * 40 + ["nih"] * 60
    labels = [THREE.index(f) for f in findings]
    rng = np.random.default_rng(0)
    probs = np.array([[0.8, 0.1, 0.1] if s == "ieee8023" else [0.05, 0.475, 0.475] for s in sources])
    probs[40:, 1:] += rng.uniform(-0.2, 0.2, (60, 1)) * np.array([1, -1])  # pneumonia/normal: uninformative noise
    report = source_aware_report(labels, probs, sources, findings, THREE, n_boot=200)
    assert report["metrics"]["per_class"]["covid19"]["roc_auc"]["value"] > 0.9
    sc = report["source_controlled"]
    assert (sc["n_covid19"], sc["n_pneumonia"]) == (30, 10)
    assert sc["roc_auc"]["value"] == pytest.approx(0.5)
    lo, hi = sc["roc_auc"]["ci95"]
    assert lo <= 0.5 <= hi
    assert set(report["per_source"]) == {"ieee8023", "nih"}
    assert report["per_source"]["nih"]["class_counts"] == [0, 30, 30]
    # one class only: the AUC is null, not invented
    assert source_controlled_auc(["covid19"], ["ieee8023"], [0.9])["roc_auc"]["value"] is None


def test_pooled_report_reads_fold_predictions(tmp_path: Path) -> None:
    header = ["path", "prob_covid19", "prob_pneumonia", "prob_normal", "predicted", "source", "finding", "label"]
    cases = [("covid19", "ieee8023", [0.9, 0.05, 0.05]), ("pneumonia", "ieee8023", [0.2, 0.7, 0.1]),
             ("pneumonia", "nih", [0.1, 0.6, 0.3]), ("normal", "nih", [0.1, 0.2, 0.7])]  # fmt: skip
    files = []
    for fold in range(2):
        path = tmp_path / f"fold{fold}.csv"
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for i, (finding, source, p) in enumerate(cases):
                writer.writerow([f"f{fold}_{i}", *p, finding, source, finding, finding])
        files.append(path)
    report = pooled_source_report(files, n_boot=50)
    assert report["n"] == 8 and report["metrics"]["accuracy"]["value"] == 1.0
    assert report["source_controlled"]["roc_auc"]["value"] == 1.0


def test_inference_on_16bit_png_and_dicom_writes_probabilities_and_gradcam(tmp_path: Path) -> None:
    """Train a tiny model on synthetic pictures, then predict a 16-bit PNG and a DICOM: both must just work."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    root = _write_dataset(tmp_path / "data", _good_rows(3))
    common = {"dataset_dir": str(root), "ckpt_dir": str(tmp_path / "m"), "epochs": 1, "image_size": 32,
              "num_folds": 3, "fold": 0}  # fmt: skip
    run_bundle(BUNDLE, "train", output_dir=str(tmp_path / "t"), **common)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    Image.fromarray(_grey(5).astype(np.uint16) * 257).save(inputs / "cxr16.png")
    meta = FileMetaDataset()
    meta.TransferSyntaxUID, meta.MediaStorageSOPInstanceUID = ExplicitVRLittleEndian, generate_uid()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    ds = pydicom.Dataset()
    ds.file_meta, ds.Rows, ds.Columns, ds.SamplesPerPixel = meta, 40, 40, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        "MONOCHROME2", 16, 16, 15, 0)
    ds.PixelData = (_grey(6).astype(np.uint16) * 257).tobytes()
    ds.save_as(inputs / "cxr.dcm", enforce_file_format=True)

    run_bundle(BUNDLE, "inference", output_dir=str(tmp_path / "infer"), input=str(inputs), **common)
    with (tmp_path / "infer" / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(Path(r["path"]).name for r in rows) == ["cxr.dcm", "cxr16.png"]
    for r in rows:
        probs = [float(r[f"prob_{c}"]) for c in THREE]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4) and r["predicted"] in THREE
    overlays = sorted(p.name for p in (tmp_path / "infer" / "gradcam").glob("*.png"))
    assert sorted(n.split("_gradcam_")[0] for n in overlays) == ["cxr", "cxr16"]
    with Image.open(tmp_path / "infer" / "gradcam" / overlays[0]) as img:
        assert img.mode == "RGB" and img.size == (32, 32)


def test_real_folds_are_patient_disjoint_and_cover_every_image() -> None:
    data = real_dataset("covid_cxr")
    spec = task_spec(json.loads((BUNDLE / "configs" / "train.json").read_text())["tasks"], "3class")
    seen: list[str] = []
    for fold in range(5):
        split = labels_csv_datalists(data, spec["class_names"], spec["label_map"], fold)
        train_groups = {it["group"] for it in split["train"]}
        assert not train_groups & {it["group"] for it in split["val"]}
        seen += [it["path"] for it in split["val"]]
    assert len(seen) == len(set(seen)) == 1275


def _labels_csv(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """A small labels.csv set: (label, source, patient) per row, one 32×32 grey JPEG each."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    lines = ["image,label,patient_id,source"]
    for i, (label, source, patient) in enumerate(rows):
        Image.fromarray(np.full((32, 32), 40 * i % 255, dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        lines.append(f"images/{i}.jpg,{label},{patient},{source}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def test_leave_one_source_out_trains_on_the_others_and_refuses_a_missing_class(tmp_path: Path) -> None:
    rows = [("covid19", "a", "p1"), ("normal", "a", "p2"), ("pneumonia", "b", "p3"), ("covid19", "b", "p4"),
            ("normal", "c", "p5"), ("pneumonia", "c", "p6")]  # fmt: skip
    root = _labels_csv(tmp_path / "cxr", rows)
    names = ["covid19", "pneumonia", "normal"]
    split = labels_csv_datalists(root, names, None, fold=0, held_out_source="b")
    assert {it["source"] for it in split["train"]} == {"a", "c"} and {it["source"] for it in split["val"]} == {"b"}
    assert len(split["train"]) + len(split["val"]) == len(rows)
    only_a = _labels_csv(tmp_path / "only_a", [("covid19", "a", "p1"), ("normal", "b", "p2"), ("pneumonia", "b", "p3")])
    with pytest.raises(MedpipeError, match=r"holding out 'a' leaves no training images of class \['covid19'\]"):
        labels_csv_datalists(only_a, names, None, fold=0, held_out_source="a")
    with pytest.raises(MedpipeError, match="is not a source of this data set"):
        labels_csv_datalists(root, names, None, fold=0, held_out_source="nowhere")


def test_grad_cam_hooks_do_not_pile_up_batch_after_batch() -> None:
    """monai's GradCAM leaves its hooks on the network: one per network and layer, reused, not one per batch."""
    from medpipe.inference.gradcam import grad_cam

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2)).eval()  # fmt: skip
    images = torch.rand(2, 1, 16, 16)
    first, classes = grad_cam(net, images, "1")
    hooks = (len(net[1]._forward_hooks), len(net[1]._backward_hooks))
    for _ in range(3):
        again, again_classes = grad_cam(net, images, "1")
    assert (len(net[1]._forward_hooks), len(net[1]._backward_hooks)) == hooks
    assert np.allclose(first, again) and (classes == again_classes).all()
