"""covid_ct_seg: segmentation metrics, CLAHE, volume-grouped folds, bad input (in-process and through the CLI),
and whole-volume inference on the real RIDER chest-CT series."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, real_dataset
from medpipe.data.datalists import read_seg_datalist, seg_datalists
from medpipe.errors import MedpipeError
from medpipe.evaluation.metrics import (
    bootstrap_mean_ci,
    dice_score,
    hd95_from_distances,
    segmentation_report,
    surface_distances,
)
from medpipe.evaluation.seg_report import slice_statistics
from medpipe.inference.ct_volume import VolumeSegmenter, keep_lung_components
from medpipe.io.dicom import Volume
from medpipe.transforms.ct_intensity import check_axial_ct
from medpipe.transforms.seg import LoadSegSliced, clahe

BUNDLE = REPO / "bundles" / "covid_ct_seg"
STRUCTURES = {"lung": [1, 2], "infection": [2]}


# ------------------------------------------------------------------------------------------------------- metrics


def square(offset: int = 0, size: int = 10, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[20 + offset : 20 + offset + size, 20 : 20 + size] = True
    return mask


def test_dice_and_hd95_on_known_shapes() -> None:
    assert dice_score(square(), square()) == 1.0
    assert dice_score(square(), square(5)) == pytest.approx(2 * 50 / 200)
    assert hd95_from_distances(surface_distances(square(), square())) == 0.0
    assert hd95_from_distances(surface_distances(square(), square(3))) == pytest.approx(3.0)


def test_empty_masks_are_handled_explicitly() -> None:
    empty = np.zeros((64, 64), dtype=bool)
    assert dice_score(empty, empty) == 1.0  # nothing there, nothing predicted: correct
    assert hd95_from_distances(surface_distances(empty, empty)) == 0.0
    assert dice_score(square(), empty) == 0.0
    assert hd95_from_distances(surface_distances(square(), empty)) == pytest.approx(np.hypot(64, 64))  # penalised


def test_segmentation_report_pools_slices_per_volume() -> None:
    labels = np.zeros((64, 64), dtype=np.int64)
    labels[square()] = 2
    small = np.zeros_like(labels)
    small[20:25, 20:30] = 2  # half of the square predicted
    slices = [
        {"path": "a0", "group": "a", **slice_statistics(labels, labels, STRUCTURES)},
        {"path": "a1", "group": "a", **slice_statistics(small, labels, STRUCTURES)},
        {"path": "b0", "group": "b", **slice_statistics(np.zeros_like(labels), np.zeros_like(labels), STRUCTURES)},
    ]
    report, slice_rows, volume_rows = segmentation_report(slices, list(STRUCTURES), n_boot=200)
    assert report["n"] == 3 and report["n_volumes"] == 2
    assert [r["dice_infection"] for r in slice_rows] == pytest.approx([1.0, 2 * 50 / 150, 1.0])
    pooled = 2 * (100 + 50) / ((100 + 50) + (100 + 100))  # pixels pooled over volume a, not a mean of slices
    assert volume_rows[0]["dice_infection"] == pytest.approx(pooled)
    per_volume = report["metrics"]["per_volume"]["dice_infection"]
    assert per_volume["value"] == pytest.approx((pooled + 1.0) / 2)
    lo, hi = per_volume["ci95"]
    assert lo <= per_volume["value"] <= hi


def test_cv_summary_pools_the_held_out_volumes_of_every_fold(tmp_path: Path) -> None:
    from medpipe.evaluation.seg_report import _rows_csv, summarize_cv

    for fold, (group, dice) in enumerate([("a", 0.8), ("b", 0.6)]):
        rows = [{"path": f"{group}{i}", "volume_group": group, "dice_lung": dice, "hd95_lung": 2.0} for i in range(3)]
        (tmp_path / f"fold{fold}").mkdir()
        (tmp_path / f"fold{fold}" / "per_slice.csv").write_text(_rows_csv(rows))
        (tmp_path / f"fold{fold}" / "per_volume.csv").write_text(_rows_csv([{**rows[0], "slices": 3}]))
    summary = summarize_cv([tmp_path / "fold0", tmp_path / "fold1"], n_boot=200)
    assert summary["n_volumes"] == 2 and summary["n_slices"] == 6
    assert summary["per_volume"]["dice_lung"]["value"] == pytest.approx(0.7)
    assert summary["per_volume"]["dice_lung"]["ci95"] == pytest.approx([0.6, 0.8])
    with pytest.raises(MedpipeError, match="evaluate every fold"):
        summarize_cv([tmp_path / "fold9"])


def test_cluster_bootstrap_is_wider_than_pretending_slices_are_independent() -> None:
    values = [0.9] * 50 + [0.5] * 50
    clusters = ["a"] * 50 + ["b"] * 50
    naive, grouped = bootstrap_mean_ci(values), bootstrap_mean_ci(values, clusters)
    assert grouped[1] - grouped[0] > 3 * (naive[1] - naive[0])
    assert bootstrap_mean_ci([0.5, 0.7], ["a", "a"]) is None  # one volume: no interval


# --------------------------------------------------------------------------------------------------------- CLAHE


def test_clahe_matches_opencv_bit_for_bit() -> None:
    i, j = np.mgrid[0:96, 0:80]
    image = ((i * 2 + j + (i * j * 7919) % 61) % 256).astype(np.uint8)
    # sha256 of cv2.createCLAHE(clipLimit=7.0).apply(image) with opencv-python-headless 5.0.0 (default 8x8 tiles)
    reference = "b764a9ebb7b001bc159a9321b275193696032443b9de2bed12ab284f226bb7c8"
    assert hashlib.sha256(clahe(image, clip_limit=7.0).tobytes()).hexdigest() == reference


def test_clahe_shapes_and_batches() -> None:
    rng = np.random.default_rng(0)
    batch = (rng.random((3, 37, 50)) * 255).astype(np.uint8)  # not a multiple of the tile grid: padded inside
    out = clahe(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[1], clahe(batch[1]))
    with pytest.raises(ValueError, match="uint8"):
        clahe(batch.astype(np.float32))


# ---------------------------------------------------------------------------------------------- data and folds


def test_folds_never_split_a_volume_and_cover_every_slice() -> None:
    data = real_dataset("covid_ct_seg")
    n = len(read_seg_datalist(data))
    seen: list[str] = []
    for fold in range(5):
        split = seg_datalists(data, fold)
        train_groups, val_groups = {it["group"] for it in split["train"]}, {it["group"] for it in split["val"]}
        assert not train_groups & val_groups
        assert len(split["train"]) + len(split["val"]) == n
        seen += [it["path"] for it in split["val"]]
    assert sorted(seen) == sorted(it["path"] for it in read_seg_datalist(data))


def write_case(root: Path, name: str, image: np.ndarray, label: np.ndarray, group: str = "vol_1") -> dict:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{name}.png")
    Image.fromarray(label).save(root / "labels" / f"{name}.png")
    return {"image": f"images/{name}.png", "label": f"labels/{name}.png", "volume_group": group}


def tiny_dataset(root: Path, label_value: int = 2, label_size: int = 32, entries: int = 6) -> Path:
    """A datalist folder of `entries` 32x32 slices in 3 volumes; the last label is size/value-corrupted as asked."""
    items = []
    for k in range(entries):
        image = (np.arange(32 * 32).reshape(32, 32) % 251).astype(np.uint8)
        size = label_size if k == entries - 1 else 32
        label = np.zeros((size, size), dtype=np.uint8)
        label[8:20, 8:20] = 1
        label[10:14, 10:14] = label_value if k == entries - 1 else 2
        items.append(write_case(root, f"s{k}", image, label, group=f"vol_{k % 3}"))
    (root / "datalist.json").write_text(json.dumps({"training": items}))
    return root


def test_load_seg_slice_refuses_size_mismatch_and_unknown_labels(tmp_path: Path) -> None:
    root = tiny_dataset(tmp_path / "size", label_size=30)
    item = read_seg_datalist(root)[-1]
    with pytest.raises(MedpipeError, match=r"is \(30, 30\), its image .* is \(32, 32\)"):
        LoadSegSliced(num_classes=3)(item)
    root = tiny_dataset(tmp_path / "values", label_value=255)
    with pytest.raises(MedpipeError, match=r"values \[255\] outside the classes 0..2"):
        LoadSegSliced(num_classes=3)(read_seg_datalist(root)[-1])
    good = LoadSegSliced(num_classes=3)(read_seg_datalist(root)[0])
    assert good["image"].shape == good["label"].shape == (1, 32, 32)
    assert set(torch.unique(good["label"]).tolist()) == {0, 1, 2}


def test_empty_or_missing_datalist_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(MedpipeError, match="empty 'training' list"):
        seg_datalists(tmp_path, fold=0)
    with pytest.raises(MedpipeError, match="datalist.json' not found"):
        seg_datalists(tmp_path / "nowhere", fold=0)


# ------------------------------------------------------------------------------------------- volumes (synthetic)


def synthetic_ct(affine: np.ndarray, shape: tuple[int, int, int] = (48, 48, 6)) -> Volume:
    """A body (0 HU) in air (-1000 HU) with two dark 'lungs' (-850 HU)."""
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[6:42, 8:40, :] = 0
    hu[10:22, 12:36, :] = -850
    hu[26:38, 12:36, :] = -850
    return Volume(hu, affine)


def test_non_axial_and_non_hu_volumes_are_refused() -> None:
    check_axial_ct(synthetic_ct(np.diag([0.7, 0.7, 2.0, 1.0])), "axial")
    sagittal = np.array([[0, 0, 2.0, 0], [0, 0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])  # voxel axis 0 runs S
    with pytest.raises(MedpipeError, match="not an axial volume"):
        check_axial_ct(synthetic_ct(sagittal), "sagittal")
    not_hu = Volume(np.full((8, 8, 4), 100, dtype=np.int16), np.eye(4))
    with pytest.raises(MedpipeError, match="Hounsfield"):
        check_axial_ct(not_hu, "png-like")


def test_keep_lung_components_drops_edge_and_small_pieces() -> None:
    mask = np.zeros((40, 40, 5), dtype=np.uint8)
    mask[5:15, 5:35, :] = 1  # right lung
    mask[8:10, 8:12, 2] = 2  # infection inside it
    mask[25:35, 5:35, :] = 1  # left lung
    mask[18:20, 18:20, 2] = 1  # a small third piece
    mask[0:3, 0:40, :] = 1  # air outside the patient, touching the image edge (bigger than a lung)
    cleaned = keep_lung_components(mask, keep=2)
    assert cleaned[0:3].sum() == 0 and cleaned[18:20, 18:20].sum() == 0
    np.testing.assert_array_equal(cleaned[5:15], mask[5:15])
    np.testing.assert_array_equal(cleaned[25:35], mask[25:35])
    np.testing.assert_array_equal(keep_lung_components(np.zeros_like(mask)), 0)


def test_volume_segmenter_writes_masks_on_the_input_grid(tmp_path: Path) -> None:
    from monai.networks.nets import UNet

    affine = np.array([[-0.8, 0, 0, 100], [0, -0.8, 0, 90], [0, 0, 2.5, -50], [0, 0, 0, 1]])
    path = tmp_path / "synthetic.nii.gz"
    nib.save(nib.Nifti1Image(synthetic_ct(affine).array, affine), path)
    torch.manual_seed(0)
    network = UNet(2, 1, 3, (8, 16), (2,), num_res_units=0)
    report = VolumeSegmenter(network, image_size=32, slice_size=64)(path, tmp_path / "out")
    entry = report["volumes"][0]
    assert entry["shape"] == [48, 48, 6] and entry["spacing_mm"] == [0.8, 0.8, 2.5]
    seg = nib.load(tmp_path / "out" / entry["files"]["seg"])
    assert seg.shape == (48, 48, 6) and np.allclose(seg.affine, affine)
    mask = np.asarray(seg.dataobj)
    lung = np.asarray(nib.load(tmp_path / "out" / entry["files"]["lung"]).dataobj)
    np.testing.assert_array_equal(lung, mask >= 1)
    voxel_ml = 0.8 * 0.8 * 2.5 / 1000
    assert entry["lung_volume_ml"] == pytest.approx((mask >= 1).sum() * voxel_ml, abs=0.01)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["volumes"][0]["input"] == str(path)


# ----------------------------------------------------------------------------------------------- bad input, CLI


def run_cli(config: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    configs = [str(BUNDLE / "configs" / "train.json")]
    if config != "training":
        configs.append(str(BUNDLE / "configs" / f"{config}.json"))
    run_id = {"training": "training", "evaluate": "evaluating", "inference": "inferring"}[config]
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(configs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command + list(args), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medpipe error:") and pattern in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "case,pattern",
    [
        ("size", "its image"),
        ("values", "outside the classes"),
        ("empty", "empty 'training' list"),
    ],
)
def test_bad_training_data_fails_in_one_line_and_writes_nothing(tmp_path: Path, case: str, pattern: str) -> None:
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
        (root / "datalist.json").write_text(json.dumps({"training": []}))
    else:
        tiny_dataset(root, label_size=30 if case == "size" else 32, label_value=7 if case == "values" else 2)
    models = tmp_path / "models"
    result = run_cli(
        "training", tmp_path, "--dataset_dir", str(root), "--ckpt_dir", str(models), "--epochs", "1",
        "--fold", "-1", "--image_size", "32",
    )  # fmt: skip
    assert_one_line_error(result, pattern)
    assert not models.exists() or not any(models.iterdir())


def test_non_axial_volume_fails_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    models = tmp_path / "models"
    models.mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), models / "model.pt")
    sagittal = np.array([[0, 0, 2.0, 0], [0, 0.7, 0, 0], [0.7, 0, 0, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(synthetic_ct(sagittal).array, sagittal), tmp_path / "sagittal.nii.gz")
    out = tmp_path / "out"
    result = run_cli(
        "inference", tmp_path, "--input", str(tmp_path / "sagittal.nii.gz"), "--ckpt_dir", str(models),
        "--output_dir", str(out), "--dataset_dir", str(tmp_path),
    )  # fmt: skip
    assert_one_line_error(result, "not an axial volume")
    assert not out.exists() or not any(out.iterdir())

