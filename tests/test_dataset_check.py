"""`medpipe dataset check`: the real CIP chest CT (ct_volumes/cip_ct64) as an nnU-Net v2 raw folder, as an MSD
datalist and as its DICOM series with a DICOM-SEG, checked through the real CLI; each fault is refused with its own
one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cip_layouts import MSD_JSON, NNUNET_JSON, cip_series, dicom_seg, highdicom_seg, msd, nnunet, read_cip, save

from conftest import REPO, real_dataset
from medpipe.data.integrity import check_dataset


@pytest.fixture(scope="module")
def cip() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU, lung mask, RAS affine) of the CIP volume, read from its NRRD files with ITK (medpipe.io.ct)."""
    return read_cip()


def medpipe_dataset_check(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medpipe", "dataset", "check", *args], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=120)  # fmt: skip


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.startswith("error: ")]


# ------------------------------------------------------------------------------------------------ clean data sets


@pytest.mark.parametrize("layout", ["nnunet", "msd"])
def test_clean_cip_layouts_pass_with_the_right_summary(layout: str, cip: tuple, tmp_path: Path) -> None:
    folder = (nnunet if layout == "nnunet" else msd)(tmp_path, cip)
    result = medpipe_dataset_check(str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert error_lines(result) == [] and "result        ok" in out
    assert ("nnU-Net v2 raw" if layout == "nnunet" else "MSD / MONAI datalist") in out
    assert "cases         1 training" in out
    assert "    1  lung                      1  65,624" in out  # the README's voxel count of wholeLung-64.nrrd
    assert "    0  background                1  257,960" in out  # 64 × 64 × 79 voxels in all
    assert "spacing (mm)  4.172 × 4.172 × 3.987 (1 case)" in out
    assert "orientation   LPS (1 case)" in out and "intensity     -1007 … 1095" in out


def test_nrrd_files_are_read_with_itk_and_agree_with_the_nifti_layout(cip: tuple, tmp_path: Path) -> None:
    source = real_dataset("ct_volumes") / "cip_ct64"
    folder = tmp_path / "Dataset502_CIPnrrd"
    for name, target in [("ct-64.nrrd", "imagesTr/cip_0000.nrrd"), ("wholeLung-64.nrrd", "labelsTr/cip.nrrd")]:
        (folder / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, folder / target)
    (folder / "dataset.json").write_text(json.dumps({**NNUNET_JSON, "file_ending": ".nrrd"}))
    result = medpipe_dataset_check(str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    nifti = medpipe_dataset_check(str(nnunet(tmp_path, cip)))
    assert result.stdout.splitlines()[1:] == nifti.stdout.splitlines()[1:]  # all but the folder's name

    (folder / "labelsTr" / "cip.nrrd").write_bytes(b"NRRD0004\nnot a header\n")
    report = check_dataset(folder)
    assert report.problems == ["case cip: labelsTr/cip.nrrd: unreadable (ITK cannot read it (RuntimeError))"]


def test_layout_named_explicitly_and_unusable_paths_are_one_line(cip: tuple, tmp_path: Path) -> None:
    folder = nnunet(tmp_path, cip)
    assert check_dataset(folder, "nnunet").ok
    result = medpipe_dataset_check(str(folder), "--layout", "msd")  # an nnU-Net dataset.json has no training list
    assert result.returncode != 0 and result.stderr.strip().startswith("medpipe error:")
    assert "'training' must be a list" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for args, message in [
        ((str(tmp_path / "nowhere"),), "no such folder"),
        ((str(tmp_path),), "no dataset.json"),
        ((str(folder), "--layout", "kits"), "unknown layout"),
        ((str(folder), "--label_map", '{"lung": ["lung"]}'), "--label_map maps labels onto a bundle's classes"),
        ((str(folder), "--bundle", "covid_cxr_cls"), "no labels.csv; covid_cxr_cls reads a labels CSV"),
    ]:
        result = medpipe_dataset_check(*args)
        assert result.returncode != 0 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr


# ----------------------------------------------------------------------------------------------- one line a fault


def _undeclared_label(root: Path, cip: tuple) -> Path:
    label = cip[1].copy()
    label[30:34, 30:34, 40] = 2
    return nnunet(root, cip, label=label)


def _other_shape(root: Path, cip: tuple) -> Path:
    return nnunet(root, cip, label=cip[1][:, :, :-1])


def _other_spacing(root: Path, cip: tuple) -> Path:
    return nnunet(root, cip, label_affine=cip[2] @ np.diag([1.0, 1.0, 1.25, 1.0]))


def _other_affine(root: Path, cip: tuple) -> Path:
    shifted = cip[2].copy()
    shifted[:3, 3] += [0.0, 0.0, 10.0]
    return nnunet(root, cip, label_affine=shifted)


def _missing_0000(root: Path, cip: tuple) -> Path:
    folder = nnunet(root, cip)
    (folder / "imagesTr" / "cip_0000.nii.gz").unlink()
    return folder


def _counted_case_without_files(root: Path, cip: tuple) -> Path:
    return nnunet(root, cip, description={**NNUNET_JSON, "numTraining": 2})


def _listed_case_without_files(root: Path, cip: tuple) -> Path:
    ghost = {"image": "./imagesTr/ghost.nii.gz", "label": "./labelsTr/ghost.nii.gz"}
    return msd(root, cip, {**MSD_JSON, "numTraining": 2, "training": [*MSD_JSON["training"], ghost]})


def _nan_in_image(root: Path, cip: tuple) -> Path:
    image = cip[0].astype(np.float32)
    image[10, 10, 10] = np.nan
    return nnunet(root, cip, image=image)


def _float_label(root: Path, cip: tuple) -> Path:
    label = cip[1].astype(np.float32)
    label[20, 20, 20] = 0.5
    return nnunet(root, cip, label=label)


def _wrong_file_ending(root: Path, cip: tuple) -> Path:
    folder = nnunet(root, cip)
    (folder / "labelsTr" / "cip.nii.gz").rename(folder / "labelsTr" / "cip.nii")
    return folder


def _file_not_listed(root: Path, cip: tuple) -> Path:
    folder = msd(root, cip)
    save(cip[0], cip[2], folder / "imagesTr" / "extra.nii.gz")
    return folder


FAULTS: dict[str, tuple[Callable[[Path, tuple], Path], str]] = {
    "undeclared_label": (_undeclared_label, "case cip: labelsTr/cip.nii.gz: label values [2] not declared"),
    "other_shape": (_other_shape, "case cip: labelsTr/cip.nii.gz: shape (64, 64, 78) differs from the image"),
    "other_spacing": (_other_spacing, "case cip: labelsTr/cip.nii.gz: spacing 4.172 × 4.172 × 4.984 mm differs"),
    "other_affine": (_other_affine, "case cip: labelsTr/cip.nii.gz: origin"),
    "missing_0000": (_missing_0000, "case cip: imagesTr/cip_0000.nii.gz missing (channel 0 'CT')"),
    "counted_case_without_files": (_counted_case_without_files, "numTraining is 2 but labelsTr holds 1 case"),
    "listed_case_without_files": (_listed_case_without_files, (
        "case ghost: imagesTr/ghost.nii.gz, labelsTr/ghost.nii.gz listed in dataset.json training[1] but missing"
    )),
    "nan_in_image": (_nan_in_image, "case cip: imagesTr/cip_0000.nii.gz: 1 NaN and 0 infinite voxels"),
    "float_label": (_float_label, "case cip: labelsTr/cip.nii.gz: label not integer-valued (1 voxels"),
    "wrong_file_ending": (_wrong_file_ending, "labelsTr/cip.nii: wrong file ending"),
    "file_not_listed": (_file_not_listed, "imagesTr/extra.nii.gz: not listed in dataset.json"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_fault_is_refused_with_its_own_line(fault: str, cip: tuple, tmp_path: Path) -> None:
    build, expected = FAULTS[fault]
    result = medpipe_dataset_check(str(build(tmp_path, cip)))
    assert result.returncode != 0
    errors = error_lines(result)
    assert len(errors) == 1 and expected in errors[0], result.stdout
    assert result.stderr.strip().startswith("medpipe error:") and "1 problem(s)" in result.stderr


# --------------------------------------------------------------------------------------- labels onto a bundle's


def test_labels_map_onto_covid_ct_seg_by_name_or_by_label_map(cip: tuple, tmp_path: Path) -> None:
    lung_only = nnunet(tmp_path / "a", cip)
    result = medpipe_dataset_check(str(lung_only), "--bundle", "covid_ct_seg")
    assert result.returncode != 0
    assert error_lines(result) == [
        "error: covid_ct_seg class 'infection' has no label in this data set (missing: infection); map one with "
        "--label_map '{\"infection\": [\"…\"]}', or declare it absent with --absent_structures infection"
    ]
    assert "label map     covid_ct_seg lung <- lung (1)" in result.stdout

    named = nnunet(tmp_path / "b", cip, description={
        **NNUNET_JSON, "labels": {"background": 0, "lung": 1, "infection": 2}})  # fmt: skip
    result = medpipe_dataset_check(str(named), "--bundle", "covid_ct_seg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "covid_ct_seg infection <- infection (2)" in result.stdout

    other = {**NNUNET_JSON, "labels": {"background": 0, "whole lung": 1, "lesion": 2}}
    renamed = nnunet(tmp_path / "c", cip, description=other)
    result = medpipe_dataset_check(str(renamed), "--bundle", "covid_ct_seg")
    assert result.returncode != 0 and "label 'whole lung' (1) maps onto no class of covid_ct_seg" in result.stdout
    mapping = json.dumps({"lung": ["whole lung"], "infection": ["lesion"]})
    result = medpipe_dataset_check(str(renamed), "--bundle", "covid_ct_seg", "--label_map", mapping)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "covid_ct_seg lung <- whole lung (1)" in result.stdout

    result = medpipe_dataset_check(str(renamed), "--bundle", "covid_ct_seg", "--label_map", '{"liver": ["lesion"]}')
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip() == (
        "medpipe error: --label_map: 'liver' is not a class of covid_ct_seg "
        "(background, infection, lung, lung_not_infected)"
    )


# ------------------------------------------------------------------------------------------ DICOM series + DICOM-SEG


def test_dicom_seg_layout_passes_with_the_nnunet_layouts_summary(cip: tuple, tmp_path: Path) -> None:
    folder = dicom_seg(tmp_path, cip)  # no dataset.json: the layout is read from the SEG in the case folder
    result = medpipe_dataset_check(str(folder))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0].endswith("(DICOM series + DICOM-SEG)")
    assert "    1  lung                      1  65,624" in result.stdout
    nifti = medpipe_dataset_check(str(nnunet(tmp_path, cip)))
    # cases, labels, voxels, geometry, HU; folds group the DICOM case by its PatientID, the nnU-Net case by itself
    seg_lines, nifti_lines = result.stdout.splitlines()[1:], nifti.stdout.splitlines()[1:]
    assert "folds group   by patient: 1 patient(s) over 1 case(s)" in seg_lines
    assert "folds group   by case (the data set names no patients)" in nifti_lines
    assert [x for x in seg_lines if not x.startswith("folds")] == [x for x in nifti_lines if not x.startswith("folds")]


def _restamp(folder: Path, change: Callable[[pydicom.Dataset], None], which: slice = slice(None)) -> Path:
    """The case's CT files rewritten after `change` (the SEG beside them left as written)."""
    for path in sorted((folder / "cip").glob("IMG*.dcm"))[which]:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)
    return folder


def _seg_of_another_series(root: Path, cip: tuple) -> Path:
    uid = pydicom.uid.generate_uid()
    return _restamp(dicom_seg(root, cip), lambda ds: setattr(ds, "SeriesInstanceUID", uid))


def _frame_of_a_missing_instance(root: Path, cip: tuple) -> Path:
    def new_uid(ds: pydicom.Dataset) -> None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()

    return _restamp(dicom_seg(root, cip), new_uid, slice(40, 41))


def _overlapping_segments(root: Path, cip: tuple) -> Path:
    case = root / "DicomSeg_CIP" / "cip"
    right = cip[1].copy()
    right[32:] = 0  # segment 2 lies inside segment 1
    highdicom_seg(case, cip_series(case), np.stack([cip[1], right], axis=-1))
    return case.parent


def _fractional_seg(root: Path, cip: tuple) -> Path:
    case = root / "DicomSeg_CIP" / "cip"
    highdicom_seg(case, cip_series(case), cip[1][..., None].astype(np.float32) * 0.5, fractional=True)
    return case.parent


def _no_seg(root: Path, cip: tuple) -> Path:
    folder = dicom_seg(root, cip)
    cip_series(folder / "cip2")  # a second case folder: its series, no SEG
    return folder


def _segment_named_twice(root: Path, cip: tuple) -> Path:
    from medpipe.io.dicom_seg import write_dicom_seg

    folder = dicom_seg(root, cip)  # case cip: segment 1 is "lung"
    write_dicom_seg(cip[1], cip_series(folder / "cip2"), folder / "cip2" / "seg.dcm", {1: "left lung"})
    return folder


SEG_FAULTS: dict[str, tuple[Callable[[Path, tuple], Path], str]] = {
    "seg_of_another_series": (_seg_of_another_series, "case cip: cip/lung.seg.dcm: references series "),
    "frame_of_a_missing_instance": (_frame_of_a_missing_instance, (
        "case cip: cip/lung.seg.dcm: 1 of 79 frame(s) reference instance(s) the series lacks (")),
    "overlapping_segments": (_overlapping_segments, (
        "case cip: cip/seg.dcm: ", "voxel(s) lie in more than one segment; medpipe needs one label per voxel")),
    "fractional_seg": (_fractional_seg, (
        "case cip: cip/seg.dcm: SegmentationType FRACTIONAL; medpipe reads binary segments only")),
    "segment_named_twice": (_segment_named_twice, (
        "case cip2: cip2/seg.dcm: segment 1 is 'left lung', in case cip 'lung'; a segment number must name one label")),
    "no_seg": (_no_seg, "case cip2: no DICOM-SEG file(s) in cip2/; a case holds one SEG beside its series"),
}


@pytest.mark.parametrize("fault", sorted(SEG_FAULTS))
def test_each_dicom_seg_fault_is_one_line(fault: str, cip: tuple, tmp_path: Path) -> None:
    build, expected = SEG_FAULTS[fault]
    report = check_dataset(build(tmp_path, cip))
    assert report.layout == "dicom_seg" and len(report.problems) == 1, report.problems
    for part in [expected] if isinstance(expected, str) else expected:
        assert part in report.problems[0], report.problems
