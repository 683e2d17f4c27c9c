"""covid_ct_seg post-processing and the inference intensity mapping: small infection components become lung (lung
is never removed), the size threshold is a fraction of the slice area, out-of-fold masks are saved and the
fraction is chosen on them by nnU-Net's rule, and min-max modes map HU as the training PNGs were made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.errors import MedpipeError
from medpipe.evaluation.postprocessing_choice import choose_postprocessing
from medpipe.evaluation.reports import check_report_files
from medpipe.evaluation.seg_report import SegmentationReport, read_predictions
from medpipe.inference.ct_volume import VolumeSegmenter
from medpipe.io import ct
from medpipe.io.dicom import Volume
from medpipe.transforms.ct_intensity import AIR_HU, hu_to_unit_slices
from medpipe.transforms.seg_postprocessing import RelabelSmallComponentsd, relabel_small_components

BUNDLE = REPO / "bundles" / "covid_ct_seg"


def _slice(size: int = 64) -> np.ndarray:
    """Lung (1) over a square, a 10x10 infection blob (100 px) and a 2x2 one (4 px), both inside the lung."""
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[8:56, 8:56] = 1
    labels[12:22, 12:22] = 2
    labels[40:42, 40:42] = 2
    return labels


def test_small_infection_components_become_lung_and_big_ones_stay() -> None:
    labels = _slice()
    out = relabel_small_components(labels, 10 / 64**2)  # under 10 px
    assert (out[40:42, 40:42] == 1).all() and (out[12:22, 12:22] == 2).all()
    assert (out == 2).sum() == 100 and np.array_equal(out >= 1, labels >= 1)
    assert relabel_small_components(labels, 0.0) is labels  # off: untouched
    assert (relabel_small_components(labels, 200 / 64**2) == 2).sum() == 0  # both under 200 px


def test_threshold_is_a_fraction_of_the_slice_so_grids_agree() -> None:
    """The same field of view at 64² and at 128² (each pixel 2x2) loses the same lesions."""
    small = _slice()
    large = np.kron(small, np.ones((2, 2), dtype=np.uint8))
    fraction = 10 / 64**2
    np.testing.assert_array_equal(
        np.kron(relabel_small_components(small, fraction), np.ones((2, 2), dtype=np.uint8)),
        relabel_small_components(large, fraction),
    )


def test_components_are_per_slice_along_the_given_axis() -> None:
    stack = np.stack([_slice(), _slice(), np.ones((64, 64), np.uint8)], axis=2)  # slices along axis 2
    out = relabel_small_components(stack, 10 / 64**2, axis=2)
    assert out.shape == stack.shape
    assert (out[40:42, 40:42, :2] == 1).all() and (out[12:22, 12:22, :2] == 2).all()
    np.testing.assert_array_equal(out[..., 2], stack[..., 2])


@pytest.mark.parametrize("fraction", [1e-4, 5e-4, 2e-3, 1e-2, 0.2])
def test_postprocessing_never_removes_lung(fraction: float) -> None:
    """Random label maps: the lung mask (labels >= 1) and background are exactly what they were."""
    rng = np.random.default_rng(int(fraction * 1e6))
    labels = rng.choice(np.array([0, 1, 2], dtype=np.uint8), size=(4, 96, 96), p=[0.3, 0.4, 0.3])
    out = relabel_small_components(labels, fraction)
    np.testing.assert_array_equal(out >= 1, labels >= 1)
    np.testing.assert_array_equal(out == 0, labels == 0)
    assert set(np.unique(out)) <= {0, 1, 2} and ((out == 2) <= (labels == 2)).all()


def test_dict_transform_on_a_label_tensor_and_bad_fractions() -> None:
    pred = torch.as_tensor(_slice()[None].astype(np.int64))
    out = RelabelSmallComponentsd("pred", 10 / 64**2)({"pred": pred})["pred"]
    assert out.shape == pred.shape and out.dtype == pred.dtype and int((out == 2).sum()) == 100
    for bad in (-0.1, 1.0, "a lot"):
        with pytest.raises(MedpipeError, match="min_infection_fraction"):
            RelabelSmallComponentsd("pred", bad)


def test_bundle_refuses_an_out_of_range_fraction(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="min_infection_fraction"):
        run_bundle(BUNDLE, "evaluate", None, min_infection_fraction=0.9, output_dir=str(tmp_path))


def _engine_output(pred: np.ndarray, label: np.ndarray) -> dict:
    return {"pred": torch.as_tensor(pred[None]), "label": torch.as_tensor(label[None])}


class _Engine:
    def __init__(self, outputs: list[dict], batch: list[dict]) -> None:
        self.state = type("S", (), {"output": outputs, "batch": batch})()


def test_report_saves_out_of_fold_masks_and_stamps_them(tmp_path: Path) -> None:
    preds = [_slice(), relabel_small_components(_slice(), 0.01)]
    report = SegmentationReport(str(tmp_path), {"lung": [1, 2], "infection": [2]}, save_predictions="true")
    batch = [{"path": f"images/v_{i}.png", "volume_group": "v"} for i in range(2)]
    engine = _Engine([_engine_output(p, _slice()) for p in preds], batch)
    report._reset(engine)
    report._collect(engine)
    report._write(engine)
    saved = read_predictions(tmp_path)
    assert list(saved) == ["images/v_0.png", "images/v_1.png"]
    for mask, pred in zip(saved.values(), preds, strict=True):
        np.testing.assert_array_equal(mask, pred)
    assert "predictions.npz" in check_report_files(tmp_path)["files_sha256"]
    np.savez(tmp_path / "other.npz", x=np.zeros(1))
    (tmp_path / "other.npz").replace(tmp_path / "predictions.npz")
    with pytest.raises(MedpipeError, match="predictions.npz"):
        check_report_files(tmp_path)
    with pytest.raises(MedpipeError, match="--save_predictions true"):
        read_predictions(tmp_path / "nowhere")


def _fake_cv(tmp_path: Path, spurious: bool) -> Path:
    """A 2-fold CV folder over a 4-slice dataset whose labels have one 100-px lesion per slice (and, when not
    `spurious`, also a true 4-px lesion); predictions are exact plus, when `spurious`, a false 4-px blob."""
    data, run = tmp_path / "data", tmp_path / "run"
    (data / "labels").mkdir(parents=True)
    (data / "images").mkdir()
    entries = []
    for i in range(4):
        label = _slice()
        if spurious:
            label[40:42, 40:42] = 1
        Image.fromarray(label).save(data / "labels" / f"s{i}.png")
        Image.fromarray(label * 100).save(data / "images" / f"s{i}.png")
        entries.append({"image": f"images/s{i}.png", "label": f"labels/s{i}.png", "volume_group": f"v{i % 2}"})
    (data / "datalist.json").write_text(json.dumps({"training": entries}))
    for fold in range(2):
        fold_dir = run / f"fold{fold}"
        mine = [e for e in entries if e["volume_group"] == f"v{fold}"]
        report = SegmentationReport(str(fold_dir), {"lung": [1, 2], "infection": [2]}, save_predictions=True,
                                    info={"dataset_dir": str(data)}, n_boot=0)  # fmt: skip
        engine = _Engine([_engine_output(_slice(), _slice()) for _ in mine],
                         [{"path": e["image"], "volume_group": e["volume_group"]} for e in mine])  # fmt: skip
        report._reset(engine)
        report._collect(engine)
        report._write(engine)
    (run / "cv_summary.json").write_text(json.dumps({"folds": 2}))
    return run


@pytest.mark.parametrize("spurious", [True, False])
def test_choice_keeps_a_fraction_only_when_cv_dice_rises(tmp_path: Path, spurious: bool) -> None:
    run = _fake_cv(tmp_path, spurious)
    result = choose_postprocessing(run, fractions=[10 / 64**2, 200 / 64**2], n_boot=0)
    written = json.loads((run / "postprocessing.json").read_text())
    assert written["chosen"] == result["chosen"] and result["slices"] == 4
    dice = {r["min_infection_fraction"]: r["dice_infection"]["value"] for r in result["candidates"]}
    if spurious:  # the false blob goes at 10 px; at 200 px the true lesion goes too
        assert result["chosen"]["min_infection_fraction"] == 10 / 64**2
        assert dice[10 / 64**2] == 1.0 > dice[0.0] and dice[200 / 64**2] == 0.0
    else:  # every lesion is real: removing any lowers Dice, so post-processing stays off
        assert result["chosen"]["min_infection_fraction"] == 0.0 and dice[0.0] == 1.0


def test_choice_needs_saved_raw_masks(tmp_path: Path) -> None:
    run = _fake_cv(tmp_path, True)
    metrics_file = run / "fold0" / "metrics.json"
    original = metrics_file.read_text()
    metrics_file.write_text(json.dumps({**json.loads(original), "min_infection_fraction": 0.0005}))
    with pytest.raises(MedpipeError, match="min_infection_fraction 0"):
        choose_postprocessing(run)
    stale = dict(json.loads(original))
    del stale["files_sha256"]["predictions.npz"]  # a later scoring without --save_predictions
    metrics_file.write_text(json.dumps(stale))
    with pytest.raises(MedpipeError, match="not from the scoring"):
        choose_postprocessing(run)
    metrics_file.write_text(original)
    (run / "fold1" / "predictions.npz").unlink()
    with pytest.raises(MedpipeError, match="predictions.npz"):
        choose_postprocessing(run)


def _volume(hu: np.ndarray) -> Volume:
    return Volume(hu.astype(np.float32), np.diag([0.7, 0.7, 2.0, 1.0]))


def test_minmax_modes_treat_padding_as_air_and_scale_per_slice_or_volume() -> None:
    hu = np.full((32, 32, 3), -800.0)
    hu[:4] = -3024.0  # padding outside the field of view
    hu[10:20, 10:20, :] = [[[200.0, 400.0, 800.0]]]
    per_slice = hu_to_unit_slices(_volume(hu), "minmax_slice", 32)
    per_volume = hu_to_unit_slices(_volume(hu), "minmax_volume", 32)
    assert per_slice.shape == per_volume.shape == (3, 32, 32)
    np.testing.assert_allclose(per_slice.min(axis=(1, 2)), 0.0, atol=1e-6)
    np.testing.assert_allclose(per_slice.max(axis=(1, 2)), 1.0, atol=1e-6)
    np.testing.assert_allclose(per_volume.max(axis=(1, 2)), [1224 / 1824, 1424 / 1824, 1.0], atol=1e-5)
    lung = np.where(np.isclose(per_volume[2], 224 / 1824, atol=1e-4))
    assert len(lung[0]) > 0  # -800 HU sits 224 HU above air, not above the -3024 padding
    assert AIR_HU == -1024.0
    np.testing.assert_allclose(hu_to_unit_slices(_volume(hu), "lung", 32), ct.display_slices(ct.window(hu, "lung"),
                               np.diag([0.7, 0.7, 2.0, 1.0]), size=32))  # fmt: skip


def test_segmenter_refuses_an_unknown_mapping_and_reports_its_steps() -> None:
    with pytest.raises(MedpipeError, match="window 'bone': use one of lung, mediastinum, minmax_slice, minmax_volume"):
        VolumeSegmenter(torch.nn.Identity(), 256, window="bone")
    with pytest.raises(MedpipeError, match="width"):
        VolumeSegmenter(torch.nn.Identity(), 256, window=(40, 0))
    segmenter = VolumeSegmenter(torch.nn.Identity(), 256, window="minmax_slice", min_infection_fraction=5e-4)
    text = segmenter._report([])["preprocessing"]
    assert text.startswith("HU minmax_slice (below -1024 as -1024)") and "under 0.0005 of an axial slice" in text


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("S", "R", "A"), ("A", "I", "R")])
def test_axial_axis_follows_the_affine(codes: tuple[str, ...]) -> None:
    unit = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.eye(4)
    affine[:3, :3] = 0
    for axis, code in enumerate(codes):
        affine[unit[code][0], axis] = unit[code][1] * 0.8
    assert ct.axial_axis(affine) == next(i for i, c in enumerate(codes) if c in "SI")


def test_intensity_match_prefers_the_training_pngs_own_mapping(tmp_path: Path) -> None:
    """Label-free: min-max per slice brings the real series' model inputs closest to the development PNGs."""
    real_dataset("covid_ct_seg"), real_dataset("covid_ct_md"), real_dataset("dicom")
    out = tmp_path / "match.json"
    script = BUNDLE / "scripts" / "intensity_match.py"
    subprocess.run([sys.executable, str(script), "--out", str(out)], check=True, capture_output=True, cwd=REPO)
    result = json.loads(out.read_text())
    assert result["chosen"] == "minmax_slice" and result["development_pngs"] > 1000
    assert result["table"]["minmax_slice"]["mean"] < result["table"]["lung"]["mean"] / 2


# ------------------------------------------------- lung components on the real RIDER series (cut by its field of view)


@pytest.fixture(scope="module")
def rider() -> dict[str, np.ndarray | Volume]:
    """The RIDER series' upper 40 slices (3.2 cm, where both lungs are; fewer voxels keep the tests quick) on its real
    grid, a reference lung mask by HU (air below -400 HU inside the body, the two largest pieces), the body, and each
    voxel's patient-right / anterior coordinates (RAS mm, from the series' real affine)."""
    from scipy import ndimage

    full = ct.load_volume(real_dataset("dicom") / "rider_pilot_chest_ct_0117")
    axis, first = ct.axial_axis(full.affine), full.array.shape[2] - 40
    assert axis == 2  # the DICOM array is (column, row, slice)
    affine = full.affine.copy()
    affine[:3, 3] += first * full.affine[:3, 2]
    volume = Volume(np.ascontiguousarray(full.array[:, :, first:]), affine)
    hu = volume.array
    tissue, _ = ndimage.label(hu > -400)
    body = tissue == np.argmax(np.bincount(tissue.ravel())[1:]) + 1
    body = np.moveaxis(np.stack([ndimage.binary_fill_holes(p) for p in np.moveaxis(body, axis, 0)]), 0, axis)
    air, _ = ndimage.label((hu < -400) & body)
    sizes = np.bincount(air.ravel())
    sizes[0] = 0
    lung = np.isin(air, np.argsort(sizes)[-2:]).astype(np.uint8)
    grid = np.ogrid[tuple(slice(0, n) for n in hu.shape)]
    ras = [sum(volume.affine[row, i] * g for i, g in enumerate(grid)) + volume.affine[row, 3] for row in (0, 1)]
    midline = float(np.median(np.broadcast_to(ras[0], hu.shape)[body]))
    return {"volume": volume, "lung": lung, "body": body, "right": ras[0] > midline, "anterior": ras[1]}


def _halves_ml(mask: np.ndarray, rider: dict) -> tuple[float, float]:
    """Lung volume (mL) in the patient's right and left halves."""
    lung, right, voxel = mask >= 1, np.broadcast_to(rider["right"], mask.shape), ct.voxel_ml(rider["volume"].affine)
    return float((lung & right).sum() * voxel), float((lung & ~right).sum() * voxel)


def test_rider_right_lung_cut_by_the_field_of_view_survives_post_processing(
    rider: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RIDER's 33 cm reconstruction cuts the chest: its right lung comes within 2 voxels of the image edge. A model
    whose lung boundary is one 256² pixel (1.3 mm) wide of the HU reference reaches the edge; the whole right lung
    must still be kept (it was dropped as "touching the edge": 0 mL right, 1252 mL left, the probe's symptom)."""
    from scipy import ndimage

    from medpipe.inference import ct_volume

    volume, lung = rider["volume"], rider["lung"]
    planes = ct.display_slices(lung.astype(np.float32), volume.affine, size=256) > 0.5  # the model's grid and view
    planes = np.stack([ndimage.binary_dilation(p) for p in planes])
    probs = np.stack([~planes, planes], axis=1).astype(np.float32)
    monkeypatch.setattr(ct_volume, "predict_slices", lambda *args, **kwargs: probs)
    monkeypatch.setattr(ct_volume, "ct_to_model_slices", lambda *args, **kwargs: None)  # unused by the stand-in
    mask = VolumeSegmenter(torch.nn.Identity(), 256, window="minmax_slice").segment(volume, "rider")

    predicted = ct.reassemble(list(probs), volume.array.shape, volume.affine)
    assert predicted[0].any()  # the prediction touches the image edge (patient right)
    right_ref, left_ref = _halves_ml(lung, rider)
    assert right_ref > 300 and left_ref > 300  # both lungs are in the reference
    right, left = _halves_ml(mask, rider)
    right_pred, left_pred = _halves_ml(predicted, rider)
    assert right >= 0.99 * right_pred and left >= 0.99 * left_pred, (right, left, right_pred, left_pred)
    assert not (mask[volume.array < -1500] >= 1).any()  # no lung on the padding outside the field of view


def _largest(binary: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, _ = ndimage.label(binary)
    return labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1


def test_rider_air_and_table_pieces_touching_the_edge_are_still_dropped(rider: dict) -> None:
    """Lung labels in the air in front of the patient and in the table behind (both in the field of view, touching
    the image edge) are dropped and both real lungs kept whole; also when the two lungs join into one component, so
    that by size the table piece would take the second place."""
    from scipy import ndimage

    from medpipe.inference.ct_volume import keep_lung_components

    volume, lung = rider["volume"], rider["lung"]
    hu, axis = volume.array, ct.axial_axis(volume.affine)
    around = (hu > -1500) & ~rider["body"] & ~ndimage.binary_dilation(lung, iterations=3)
    front = np.broadcast_to(rider["anterior"] > np.median(np.broadcast_to(rider["anterior"], hu.shape)[rider["body"]]),
                            hu.shape)  # fmt: skip
    air, table = (_largest(around & front), _largest(around & ~front))
    voxel = ct.voxel_ml(volume.affine)
    assert table.sum() * voxel > 300 and air.sum() * voxel > 100  # as large as a lung's part of these slices
    for piece in (air, table):  # each touches the image's in-plane edge
        planes = np.moveaxis(piece, axis, -1)
        assert planes[0].any() or planes[-1].any() or planes[:, 0].any() or planes[:, -1].any()
    mask = (lung.astype(bool) | air | table).astype(np.uint8)
    kept = keep_lung_components(mask, 2, hu, axis)
    assert not kept[air | table].any()
    np.testing.assert_array_equal(kept, lung)

    joined = lung.copy()  # a one-voxel bridge across the mediastinum on the top slice joins the lungs
    columns = np.flatnonzero(lung[:, 256, -1])
    gap = columns[np.argmax(np.diff(columns))], columns[np.argmax(np.diff(columns)) + 1]
    joined[gap[0] : gap[1], 256, -1] = 1
    assert ndimage.label(joined)[1] == 1
    kept = keep_lung_components((joined.astype(bool) | air | table).astype(np.uint8), 2, hu, axis)
    np.testing.assert_array_equal(kept, joined)


def test_mask_only_fallback_takes_the_edge_in_plane_whatever_the_slice_axis() -> None:
    """Without the image, components touching the in-plane edge are dropped; a lung touching the first or last
    slice (scans often start or end inside the lung) is not, whichever array axis holds the slices."""
    from medpipe.inference.ct_volume import keep_lung_components

    mask = np.zeros((5, 40, 40), dtype=np.uint8)  # slices on axis 0
    mask[:, 5:15, 5:35] = 1  # a lung through every slice, first and last included
    mask[:, 25:35, 5:35] = 1
    mask[:, 0:3, :] = 1  # air along the in-plane edge
    kept = keep_lung_components(mask, 2, axis=0)
    assert kept[:, 0:3].sum() == 0
    np.testing.assert_array_equal(kept[:, 5:35], mask[:, 5:35])
    np.testing.assert_array_equal(keep_lung_components(np.moveaxis(mask, 0, 2), 2), np.moveaxis(kept, 0, 2))
