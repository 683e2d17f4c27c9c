"""The real CIP chest CT (`ct_volumes/cip_ct64`) laid out by a test as an nnU-Net v2 raw folder, an MSD datalist
folder or its DICOM series with a DICOM-SEG: shared by the data set check's tests and the volume-layout training
tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from conftest import real_dataset
from medpipe.io.ct import load_itk

NNUNET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lung": 1}, "numTraining": 1,
               "file_ending": ".nii.gz"}  # fmt: skip
MSD_JSON = {
    "name": "CIP", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "lung"}, "numTraining": 1,
    "training": [{"image": "./imagesTr/cip.nii.gz", "label": "./labelsTr/cip.nii.gz"}], "test": [],
}  # fmt: skip
Cases = dict[str, tuple[np.ndarray, np.ndarray]]


def read_cip() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT in HU, lung mask, RAS affine) of the CIP volume, read from its NRRD files with ITK (medpipe.io.ct); the
    test skips, saying why, when the data is absent."""
    folder = real_dataset("ct_volumes") / "cip_ct64"
    ct, lung = load_itk(folder / "ct-64.nrrd"), load_itk(folder / "wholeLung-64.nrrd")
    assert np.allclose(ct.affine, lung.affine)
    return ct.array, lung.array.astype(np.uint8), ct.affine


def two_cases(cip: tuple) -> Cases:
    """The CIP volume and its left-right mirror image as two cases (two groups, so that folds can hold one out)."""
    ct, lung, _ = cip
    return {"cip": (ct, lung), "cipmirror": (np.ascontiguousarray(ct[::-1]), np.ascontiguousarray(lung[::-1]))}


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def nnunet(root: Path, cip: tuple, image: np.ndarray | None = None, label: np.ndarray | None = None,
           label_affine: np.ndarray | None = None, description: dict | None = None,
           cases: Cases | None = None) -> Path:  # fmt: skip
    """`root/Dataset501_CIP`: the CIP case (its image or label replaced when given), or `cases`."""
    ct, lung, affine = cip
    cases = cases or {"cip": (ct if image is None else image, lung if label is None else label)}
    folder = root / "Dataset501_CIP"
    for name, (case_image, case_label) in cases.items():
        save(case_image, affine, folder / "imagesTr" / f"{name}_0000.nii.gz")
        save(case_label, affine if label_affine is None else label_affine, folder / "labelsTr" / f"{name}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps(description or {**NNUNET_JSON, "numTraining": len(cases)}))
    return folder


def msd(root: Path, cip: tuple, description: dict | None = None, cases: Cases | None = None) -> Path:
    """`root/Task01_CIP`: the CIP case, or `cases`, listed in an MSD dataset.json."""
    ct, lung, affine = cip
    cases = cases or {"cip": (ct, lung)}
    folder = root / "Task01_CIP"
    for name, (case_image, case_label) in cases.items():
        save(case_image, affine, folder / "imagesTr" / f"{name}.nii.gz")
        save(case_label, affine, folder / "labelsTr" / f"{name}.nii.gz")
    training = [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in cases]
    (folder / "dataset.json").write_text(json.dumps(description or {**MSD_JSON, "numTraining": len(cases),
                                                                     "training": training}))  # fmt: skip
    return folder


# ----------------------------------------------------------------------------------------- DICOM series + DICOM-SEG


def cip_series(case: Path) -> Any:
    """The CIP DICOM series (its 79 files) copied into the case folder `case`, loaded as medpipe reads it."""
    from medpipe.io.dicom import load_series

    case.mkdir(parents=True, exist_ok=True)
    for path in sorted((real_dataset("ct_volumes") / "cip_ct64" / "dicom").iterdir()):
        shutil.copy(path, case / path.name)
    return load_series(case)


def dicom_seg(root: Path, cip: tuple, mask: np.ndarray | None = None, labels: dict[int, str] | None = None) -> Path:
    """`root/DicomSeg_CIP/cip/`: the CIP DICOM series and a DICOM-SEG of `mask` (the whole-lung mask) written by
    medpipe's own writer (medpipe.io.dicom_seg.write_dicom_seg)."""
    from medpipe.io.dicom_seg import write_dicom_seg

    folder = root / "DicomSeg_CIP"
    volume = cip_series(folder / "cip")
    assert np.allclose(volume.affine, cip[2])  # the series lies on the NRRD files' grid: the mask fits it as it is
    write_dicom_seg(cip[1] if mask is None else mask, volume, folder / "cip" / "lung.seg.dcm", labels or {1: "lung"})
    return folder


def highdicom_seg(case: Path, volume: Any, segments: np.ndarray, fractional: bool = False) -> Path:
    """A SEG of the series in `case` written with highdicom itself, for what medpipe's writer never writes:
    `segments` (i, j, k, S) may overlap, or hold fractions."""
    import highdicom as hd
    import pydicom

    from medpipe.io.dicom_seg import prepare_sources, segment_coding

    sources = prepare_sources([pydicom.dcmread(f, stop_before_pixels=True) for f in volume.source_files])
    descriptions = []
    for number in range(1, segments.shape[-1] + 1):
        coding = segment_coding(f"lung {number}")
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=f"lung {number}", segmented_property_category=coding.category,
            segmented_property_type=coding.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL))  # fmt: skip
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=np.ascontiguousarray(segments.transpose(2, 1, 0, 3)),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else
        hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions, series_instance_uid=hd.UID(),
        series_number=2000, sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0", omit_empty_frames=False,
    )  # fmt: skip
    seg.save_as(case / "seg.dcm")
    return case / "seg.dcm"
