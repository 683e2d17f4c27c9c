"""medpipe.ct on the real RIDER chest-CT series: windowing, slicing, reassembly, NIfTI/DICOM-SEG output, volumes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medpipe.errors import MedpipeError
from medpipe.io import ct, dicom, dicom_seg, ingest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDPIPE_DATA") or ROOT.parent / "shared" / "data")
RIDER = DATA / "dicom" / "rider_pilot_chest_ct_0117"


@pytest.fixture(scope="module")
def volume() -> dicom.Volume:
    """The real 95-slice series, loaded once."""
    if len(list(RIDER.glob("*.dcm"))) != 95:
        pytest.skip(f"set MEDPIPE_DATA to the folder holding dicom/rider_pilot_chest_ct_0117 (not found under {DATA})")
    return ct.load_volume(RIDER)


def blob_mask(shape: tuple[int, ...]) -> np.ndarray:
    """Two labelled boxes: label 1 (10 slices), label 2 (2 slices)."""
    mask = np.zeros(shape, dtype=np.uint8)
    mask[200:300, 180:260, 40:50] = 1
    mask[100:120, 300:330, 45:47] = 2
    return mask


# ---------------------------------------------------------------------------------------------------- windowing


def test_window_presets_map_level_and_edges() -> None:
    hu = np.array([-2000, -1350, -600, 150, 3000, -160, 40, 240])
    np.testing.assert_allclose(ct.window(hu, "lung"), [0, 0, 0.5, 1, 1, 1190 / 1500, 1 - 110 / 1500, 1], atol=1e-6)
    np.testing.assert_allclose(ct.window(hu[5:], "mediastinum"), [0, 0.5, 1], atol=1e-6)
    np.testing.assert_allclose(ct.window(np.array([0, 50, 100]), (50, 100)), [0, 0.5, 1], atol=1e-6)
    assert ct.window(hu, "lung").dtype == np.float32


def test_window_rejects_unknown_preset_and_bad_width() -> None:
    with pytest.raises(MedpipeError, match="bone"):
        ct.window(np.zeros(3), "bone")
    with pytest.raises(MedpipeError, match="width"):
        ct.window(np.zeros(3), (40, 0))


# ------------------------------------------------------------------------------------------------------- slices


def test_volume_to_slices_to_volume_is_exact(volume: dicom.Volume) -> None:
    planes = list(ct.iter_slices(volume.array, volume.affine, size=None))
    assert len(planes) == 95 and planes[0].shape == (512, 512)
    back = ct.stack_slices(planes, volume.array.shape, volume.affine)
    np.testing.assert_array_equal(back, volume.array)


def test_slices_are_in_display_orientation_for_any_storage_order(volume: dicom.Volume) -> None:
    first = next(ct.iter_slices(volume.array, volume.affine, size=None))
    ds = pydicom.dcmread(volume.source_files[0])  # the most inferior slice
    np.testing.assert_array_equal(first, ds.pixel_array - 1024.0)  # as a DICOM viewer shows it
    # the same image stored flipped in x and z (e.g. another converter's NIfTI) gives the same slices
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = volume.array.shape[0] - 1, volume.array.shape[2] - 1
    flipped, affine = volume.array[::-1, :, ::-1], volume.affine @ flip
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], volume.affine @ [511, 0, 94, 1])
    assert np.array_equal(next(ct.iter_slices(flipped, affine, size=None)), first)
    planes = list(ct.iter_slices(flipped, affine, size=None))
    np.testing.assert_array_equal(ct.stack_slices(planes, flipped.shape, affine), flipped)


def test_slices_resized_for_a_256_model(volume: dicom.Volume) -> None:
    planes = list(ct.iter_slices(ct.window(volume.array, "lung"), volume.affine, size=256))
    assert len(planes) == 95
    assert {p.shape for p in planes} == {(256, 256)} and {p.dtype for p in planes} == {np.dtype(np.float32)}
    assert min(p.min() for p in planes) >= 0 and max(p.max() for p in planes) <= 1
    native = next(ct.iter_slices(ct.window(volume.array, "lung"), volume.affine, size=None))
    assert abs(planes[0].mean() - native.mean()) < 0.01  # resizing keeps the overall brightness


def test_display_slices_equal_iter_slices(volume: dicom.Volume) -> None:
    """The batched resize (one call for all slices) gives iter_slices' values exactly."""
    windowed = ct.window(volume.array, "lung")
    for size in (256, None):
        one_by_one = np.stack(list(ct.iter_slices(windowed, volume.affine, size=size)))
        np.testing.assert_array_equal(ct.display_slices(windowed, volume.affine, size=size), one_by_one)


@pytest.mark.parametrize("shape", [(3, 64, 48), (2, 8, 8), (5, 17, 33)])
def test_first_argmax_is_numpy_argmax_ties_included(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random(shape).astype(np.float32)
    scores[:, :4, :4] = 0.5  # all classes tie: the first wins
    scores[1:, 4:6, :] = 0.9  # classes 1.. tie above class 0
    np.testing.assert_array_equal(ct.first_argmax(scores), np.argmax(scores, axis=0).astype(np.uint8))


def test_reassemble_label_maps_from_256_onto_the_512_grid(volume: dicom.Volume) -> None:
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 3, size=(256, 256)).astype(np.uint8) for _ in range(95)]
    mask = ct.reassemble(small, volume.array.shape, volume.affine)
    assert mask.shape == (512, 512, 95) and mask.dtype == np.uint8
    planes = list(ct.iter_slices(mask, volume.affine, size=None))
    for k in (0, 50, 94):  # nearest neighbour ×2: native pixel q comes from model pixel q // 2
        np.testing.assert_array_equal(planes[k], np.repeat(np.repeat(small[k], 2, axis=0), 2, axis=1))


def test_reassemble_probability_maps(volume: dicom.Volume) -> None:
    truth = blob_mask(volume.array.shape)
    planes = list(ct.iter_slices(truth, volume.affine, size=None))
    probs = [np.stack([p == 0, p == 1, p == 2]).astype(np.float32) * 0.8 + 0.1 for p in planes]  # (3, H, W)
    np.testing.assert_array_equal(ct.reassemble(probs, truth.shape, volume.affine), truth)
    single = [(p == 1)[None].astype(np.float32) * 0.9 for p in planes]  # (1, H, W) sigmoid output
    np.testing.assert_array_equal(ct.reassemble(single, truth.shape, volume.affine), truth == 1)


def test_reassemble_rejects_wrong_slice_count(volume: dicom.Volume) -> None:
    with pytest.raises(MedpipeError, match="94 slices"):
        ct.reassemble([np.zeros((256, 256), np.uint8)] * 94, volume.array.shape, volume.affine)


# ------------------------------------------------------------------------------------------- one path for NIfTI


def test_nifti_and_dicom_load_the_same(volume: dicom.Volume, tmp_path: Path) -> None:
    summary = ingest.ingest(RIDER, tmp_path)
    from_nifti = ct.load_volume(tmp_path / summary["ingested"][0]["nifti"])
    np.testing.assert_array_equal(from_nifti.array, volume.array)
    np.testing.assert_allclose(from_nifti.affine, volume.affine, atol=1e-5)
    np.testing.assert_allclose(from_nifti.spacing, volume.spacing, atol=1e-5)
    assert from_nifti.meta["modality"] == "CT" and from_nifti.meta["convolution_kernel"] == "STANDARD"
    with pytest.raises(MedpipeError, match="not a DICOM series folder"):
        ct.load_volume(RIDER / "README.md")


# ------------------------------------------------------------------------------------------------------ outputs


def test_label_volumes_in_ml(volume: dicom.Volume) -> None:
    mask = blob_mask(volume.array.shape)
    voxel_ml = 0.644531 * 0.644531 * 0.8 / 1000
    volumes = ct.label_volumes_ml(mask, volume.affine)
    assert set(volumes) == {1, 2}
    assert volumes[1] == pytest.approx(100 * 80 * 10 * voxel_ml, rel=1e-5)
    assert volumes[2] == pytest.approx(20 * 30 * 2 * voxel_ml, rel=1e-5)
    assert ct.label_volumes_ml(mask, volume.affine, labels=[1, 3])[3] == 0.0


def test_write_mask_nifti_round_trip(volume: dicom.Volume, tmp_path: Path) -> None:
    mask = blob_mask(volume.array.shape)
    path = ct.write_mask_nifti(mask, volume.affine, tmp_path / "mask.nii.gz")
    image = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), mask)
    np.testing.assert_allclose(image.affine, volume.affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]


def test_dicom_seg_references_the_source_series_and_loads_back(volume: dicom.Volume, tmp_path: Path) -> None:
    mask = blob_mask(volume.array.shape)
    path = dicom_seg.write_dicom_seg(mask, volume, tmp_path / "mask.seg.dcm", labels={1: "lung", 2: "lesion"})
    seg = hd.seg.segread(path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.source_files]
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lung", "lesion"]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sources], combine_segments=True
    )
    np.testing.assert_array_equal(frames, mask.transpose(2, 1, 0))


def test_dicom_seg_skips_filled_gap_slices(tmp_path: Path) -> None:
    ct2 = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
    shutil.copytree(ct2, tmp_path / "ct2")
    gappy = dicom.load_series(tmp_path / "ct2", on_gap="warn")  # 4 real slices in a 165-slice grid
    mask = np.zeros(gappy.array.shape, dtype=np.uint8)
    mask[4:8, 4:8, -3:] = 1
    seg = hd.seg.segread(dicom_seg.write_dicom_seg(mask, gappy, tmp_path / "seg.dcm", labels={1: "box"}))
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 4
    assert seg.NumberOfFrames == 4  # one frame per real slice and segment, empty ones included; filled slices none


def test_dicom_seg_needs_dicom_source_and_named_labels(volume: dicom.Volume, tmp_path: Path) -> None:
    mask = blob_mask(volume.array.shape)
    from_nifti = dicom.Volume(volume.array, volume.affine)
    with pytest.raises(MedpipeError, match="no source DICOM"):
        dicom_seg.write_dicom_seg(mask, from_nifti, tmp_path / "seg.dcm", labels={1: "a", 2: "b"})
    with pytest.raises(MedpipeError, match=r"label\(s\) \[2\]"):
        dicom_seg.write_dicom_seg(mask, volume, tmp_path / "seg.dcm", labels={1: "a"})
    assert list(tmp_path.iterdir()) == []
