"""Every kind of DICOM object medpipe writes (DICOM-SEG, TID 1500 measurement SR, classification SR, Grad-CAM
secondary capture), built from real source series, passes dciodvfy (dicom3tools) without an error and reads back
with highdicom with the content it was written with. Sources: RIDER (complete headers), COVID-CT-MD (de-identified:
no PatientName, PatientBirthDate …; its invalid UIDs replaced, as a PACS would have them) and Lung-PET-CT-Dx with a
malformed ReferencedStudySequence (an item without ReferencedSOPClassUID). Masks are synthetic: no model runs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import real_dataset

DCIODVFY = shutil.which("dciodvfy")
pytestmark = [
    pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy is not installed: apt-get install dicom3tools (as .ci/run)"),
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name"),
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]
LABELS = {1: "lung (not infected)", 2: "COVID-19 infection"}
N_SLICES = 6
# warnings dciodvfy may give, each kept for the reason in docs/serve.md ("Validation"); any other line fails the test
KNOWN_WARNINGS = (
    r"Missing attribute or value that would be needed to build DICOMDIR - Study (ID|Date|Time)",  # empty in source
    r"Value dubious for this VR - \(0x00(08,0x0090|10,0x0010)\) PN .* Retired Person Name form",  # source's names
    r"Unrecognized defined term <99MEDPIPE> for value 1 of attribute <Coding Scheme Designator>",  # private scheme
)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's warnings for `path`; fails the test on any error or any warning not in KNOWN_WARNINGS."""
    assert DCIODVFY is not None
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, f"dciodvfy {path.name}:\n" + "\n".join(errors)
    warnings = [line for line in lines if line.startswith("Warning")]
    unknown = [w for w in warnings if not any(re.search(k, w) for k in KNOWN_WARNINGS)]
    assert not unknown, f"dciodvfy {path.name}: warnings not documented:\n" + "\n".join(unknown)
    return warnings


def _copy_series(files: list[Path], folder: Path, edit: object = None) -> Path:
    """The files with fresh, valid study / series / instance / frame-of-reference UIDs (what a PACS sends)."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if callable(edit):
            edit(ds)
        ds.save_as(folder / path.name)
    return folder


def _uncompressed_blank(ds: pydicom.Dataset) -> None:
    """COVID-CT-MD is JPEG-lossless; decoding it needs pylibjpeg or ITK (slow to start). The headers are what this
    test is about: keep them, with blank uncompressed pixels."""
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian


def _broken_study_reference(ds: pydicom.Dataset) -> None:
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()  # no ReferencedSOPClassUID: type 1 in the macro
    ds.ReferencedStudySequence = [item]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    rider = sorted(real_dataset("dicom/rider_pilot_chest_ct_0117").glob("*.dcm"))[40 : 40 + N_SLICES]
    covid = sorted((real_dataset("covid_ct_md") / "P002").glob("*.dcm"))[60 : 60 + N_SLICES]
    lung_dx = sorted(real_dataset("dicom/lung_pet_ct_dx_a0002_b40f").glob("*.dcm"))[10 : 10 + N_SLICES]
    out = {
        "rider": _copy_series(rider, root / "rider"),
        "covid_ct_md_no_patient_name": _copy_series(covid, root / "covid", _uncompressed_blank),
        "broken_referenced_study": _copy_series(lung_dx, root / "lung_dx", _broken_study_reference),
    }
    first = pydicom.dcmread(sorted(out["covid_ct_md_no_patient_name"].glob("*.dcm"))[0], stop_before_pixels=True)
    assert "PatientName" not in first and "PatientBirthDate" not in first  # the case item (a) is about
    return out


@pytest.fixture(scope="module")
def cxr_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A chest radiograph (CR) as a PACS has it, and the same de-identified without PatientName / BirthDate and
    with a malformed ReferencedStudySequence."""
    from test_serve import cxr_picture, wrap_image

    root = tmp_path_factory.mktemp("cxr")
    plain = wrap_image(cxr_picture(), "CR", "CHEST")
    plain.save_as(root / "plain.dcm", enforce_file_format=True)
    bare = wrap_image(cxr_picture(), "CR", "CHEST")
    del bare.PatientName, bare.PatientBirthDate
    _broken_study_reference(bare)
    bare.save_as(root / "bare.dcm", enforce_file_format=True)
    return {"plain": root / "plain.dcm", "bare": root / "bare.dcm"}


def _info(name: str = "covid_ct_seg", network: str = "unet") -> object:
    from medpipe.serve.models import ModelInfo

    return ModelInfo(name=name, version="0.1.0", network=network)


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    """Lung boxes in both halves on every slice, an infection blob in one lung on the middle slices."""
    mask = np.zeros(shape, np.uint8)
    x, y = shape[0], shape[1]
    mask[x // 8 : 3 * x // 8, y // 4 : 3 * y // 4, :] = 1
    mask[5 * x // 8 : 7 * x // 8, y // 4 : 3 * y // 4, :] = 1
    mask[x // 5 : x // 3, y // 3 : y // 2, 2:4] = 2
    return mask


def _write_seg(folder: Path, out: Path) -> tuple[Path, np.ndarray, object]:
    from medpipe.io import ct, dicom_seg

    volume = ct.load_volume(folder)
    mask = _mask(volume.array.shape)
    return dicom_seg.write_dicom_seg(mask, volume, out, labels=LABELS, algorithm="covid_ct_seg"), mask, volume


@pytest.mark.parametrize("name", ["rider", "covid_ct_md_no_patient_name", "broken_referenced_study"])
def test_dicom_seg_conforms_and_reads_back(series: dict[str, Path], tmp_path: Path, name: str) -> None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    path, mask, volume = _write_seg(series[name], tmp_path / "seg.dcm")
    dciodvfy(path)
    seg = hd.seg.segread(path)
    assert "ReferencedStudySequence" not in seg  # the malformed one was not copied (and RIDER has none)
    assert str(seg.PatientName) == "" if name == "covid_ct_md_no_patient_name" else str(seg.PatientName)
    lung, infection = seg.SegmentSequence
    assert [lung.SegmentLabel, infection.SegmentLabel] == [LABELS[1], LABELS[2]]
    code = lambda item, keyword: (item[keyword][0].CodeValue, item[keyword][0].CodingSchemeDesignator)  # noqa: E731
    assert code(lung, "SegmentedPropertyCategoryCodeSequence") == (codes.cid7150.AnatomicalStructure.value, "SCT")
    assert code(lung, "SegmentedPropertyTypeCodeSequence") == ("39607008", "SCT")  # Lung
    assert code(infection, "SegmentedPropertyCategoryCodeSequence") == ("49755003", "SCT")  # Morph. abnormal
    assert code(infection, "SegmentedPropertyTypeCodeSequence") == ("52988006", "SCT")  # Lesion (CID 7159)
    assert code(infection, "AnatomicRegionSequence") == ("39607008", "SCT")
    lung_rgb = hd.color.CIELabColor.from_dicom_value(lung.RecommendedDisplayCIELabValue).to_rgb()
    infection_rgb = hd.color.CIELabColor.from_dicom_value(infection.RecommendedDisplayCIELabValue).to_rgb()
    assert lung_rgb[2] > lung_rgb[0] + 100 and infection_rgb[0] > infection_rgb[2] + 100  # cool lung, warm lesion
    # same content: each frame is its source slice's mask of that segment
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k
              for k, f in enumerate(volume.source_files)}  # fmt: skip
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    assert len(pixels) == 2 * N_SLICES
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        k = by_uid[str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)]
        label = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(frame, mask[:, :, k].T == label)


def _sr_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out += [item, *_sr_items(item)]
    return out


def _concept(item: pydicom.Dataset) -> str:
    return str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""


def assert_ohif_can_anchor(sr: pydicom.Dataset, source_uids: set[str]) -> None:
    """What OHIF's cornerstone-dicom-sr reads: an image library listing the images, and every measurement (NUM)
    with exactly one INFERRED FROM child, an SCOORD SELECTED FROM one source image (its `coords[0]`)."""
    root = list(sr.ContentSequence)
    (library,) = [item for item in root if _concept(item) == "Image Library"]
    (library_group,) = library.ContentSequence
    listed = {str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for i in library_group.ContentSequence}
    assert listed == source_uids
    (measurements,) = [item for item in root if _concept(item) == "Imaging Measurements"]
    nums = [item for item in _sr_items(measurements) if item.ValueType == "NUM"]
    assert nums
    for num in nums:
        (scoord,) = num.ContentSequence
        assert (scoord.ValueType, scoord.RelationshipType) == ("SCOORD", "INFERRED FROM")
        (image,) = scoord.ContentSequence
        assert (image.ValueType, image.RelationshipType) == ("IMAGE", "SELECTED FROM")
        assert str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) in source_uids


@pytest.mark.parametrize("name", ["rider", "covid_ct_md_no_patient_name", "broken_referenced_study"])
def test_ct_measurement_sr_conforms_references_images_and_seg(
    series: dict[str, Path], tmp_path: Path, name: str
) -> None:
    import highdicom as hd

    from medpipe.serve.results import read_measurements, write_ct_measurement_sr

    seg_path, mask, volume = _write_seg(series[name], tmp_path / "vol_seg.dcm")
    entry = {"lung_volume_ml": 1234.5, "infection_volume_ml": 12.25, "infection_percent_of_lung": 0.992,
             "files": {"dicom_seg": seg_path.name}}  # fmt: skip
    sources = [f for f in volume.source_files if f is not None]
    path = write_ct_measurement_sr(entry, sources, _info(), tmp_path / "measurements_sr.dcm", warnings=["check it"])
    dciodvfy(path)
    sr = hd.sr.srread(path)
    assert read_measurements(path) == {
        "lung": {"Volume": 1234.5},
        "infection": {"Volume": 12.25, "Infection volume as percent of lung volume": 0.992},
    }
    source_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in sources}
    assert_ohif_can_anchor(sr, source_uids)
    # the infection is anchored where the SEG's infection segment is largest, inside it
    infection_num = next(i for i in _sr_items(sr) if i.ValueType == "NUM" and "percent" in _concept(i))
    scoord = infection_num.ContentSequence[0]
    uid = str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    k = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in volume.source_files].index(uid)
    col, row = (int(v) for v in scoord.GraphicData)
    assert mask[col, row, k] == 2
    # the evidence names the source images; the SEG the volumes come from is pertinent other evidence
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    refs = lambda seq: {str(r.ReferencedSOPInstanceUID) for e in seq for s in e.ReferencedSeriesSequence  # noqa: E731
                        for r in s.ReferencedSOPSequence}  # fmt: skip
    assert refs(sr.CurrentRequestedProcedureEvidenceSequence) == source_uids
    assert refs(sr.PertinentOtherEvidenceSequence) == {str(seg.SOPInstanceUID)}
    assert sr.StudyInstanceUID == seg.StudyInstanceUID and "ReferencedStudySequence" not in sr
    assert sr.SeriesDescription == "medpipe covid_ct_seg measurements"
    text = [str(i.TextValue) for i in _sr_items(sr) if i.ValueType == "TEXT"]
    assert "check it" in text  # node-routing's warnings still reach the SR


@pytest.mark.parametrize("detected", [False, True])
def test_ct_measurement_sr_states_whether_infection_was_detected(
    series: dict[str, Path], tmp_path: Path, detected: bool
) -> None:
    """Issue #31: the SR a radiologist opens says "no infection detected" in words when there is none (an infected
    volume's SR keeps its measurements only), and carries the highest slice probability; the object validates."""
    from medpipe.serve.results import read_findings, read_measurements, write_ct_measurement_sr

    seg_path, _, volume = _write_seg(series["rider"], tmp_path / "vol_seg.dcm")
    finding = "infection on 3 of 95 slices" if detected else "no infection detected"
    entry = {"lung_volume_ml": 4100.0, "infection_volume_ml": 12.5 if detected else 0.0,
             "infection_percent_of_lung": 0.3 if detected else 0.0, "infection_detected": detected,
             "finding": finding, "infection_probability_max": 0.81 if detected else 0.07,
             "files": {"dicom_seg": seg_path.name}}  # fmt: skip
    sources = [f for f in volume.source_files if f is not None]
    path = write_ct_measurement_sr(entry, sources, _info(), tmp_path / "sr.dcm", warnings=["check it"])
    dciodvfy(path)
    found = read_findings(path)
    assert found == {"findings": [] if detected else ["no infection detected"], "warnings": ["check it"]}
    measured = read_measurements(path)["infection"]
    assert measured["Highest slice probability of infection"] == pytest.approx(0.81 if detected else 0.07)
    assert measured["Volume"] == entry["infection_volume_ml"]


def test_result_series_are_distinct_per_kind_and_grouped_per_source(
    series: dict[str, Path], cxr_sources: dict[str, Path], tmp_path: Path
) -> None:
    from medpipe.serve.results import write_classification_sr, write_ct_measurement_sr, write_gradcam_sc

    seg_path, _, volume = _write_seg(series["rider"], tmp_path / "vol_seg.dcm")
    entry = {"lung_volume_ml": 1.0, "infection_volume_ml": 0.0, "infection_percent_of_lung": 0.0,
             "files": {"dicom_seg": seg_path.name}}  # fmt: skip
    ct_sr = write_ct_measurement_sr(entry, [f for f in volume.source_files if f], _info(), tmp_path / "m_sr.dcm")
    cxr = _info("covid_cxr_cls", "densenet121")
    probs = {"covid19": 0.2, "pneumonia": 0.3, "normal": 0.5}
    cls_a = write_classification_sr(probs, cxr_sources["plain"], cxr, tmp_path / "a_sr.dcm")
    cls_b = write_classification_sr(probs, cxr_sources["plain"], cxr, tmp_path / "b_sr.dcm")
    rgb = np.zeros((*pydicom.dcmread(cxr_sources["plain"]).pixel_array.shape, 3), np.uint8)
    sc = write_gradcam_sc(rgb, cxr_sources["plain"], cxr, tmp_path / "sc.dcm")
    seg, ct_sr, cls_a, cls_b, sc = (pydicom.dcmread(p, stop_before_pixels=True) for p in (seg_path, ct_sr, cls_a,
                                                                                         cls_b, sc))  # fmt: skip
    numbers = [int(ds.SeriesNumber) for ds in (seg, ct_sr, cls_a, sc)]
    assert len(set(numbers)) == 4, numbers
    descriptions = [str(ds.SeriesDescription) for ds in (seg, ct_sr, cls_a, sc)]
    assert len(set(descriptions)) == 4 and "measurements" in descriptions[1] and "classification" in descriptions[2]
    # the SRs of one source series' images share one series (not a new "series 9001" per image)
    assert cls_a.SeriesInstanceUID == cls_b.SeriesInstanceUID != ct_sr.SeriesInstanceUID
    assert cls_a.SOPInstanceUID != cls_b.SOPInstanceUID


@pytest.mark.parametrize("source", ["plain", "bare"])
def test_classification_sr_and_gradcam_sc_conform(cxr_sources: dict[str, Path], tmp_path: Path, source: str) -> None:
    import highdicom as hd

    from medpipe.serve.results import read_measurements, write_classification_sr, write_gradcam_sc

    info = _info("covid_cxr_cls", "densenet121")
    probs = {"covid19": 0.125, "pneumonia": 0.25, "normal": 0.625}
    path = write_classification_sr(probs, cxr_sources[source], info, tmp_path / "sr.dcm")
    dciodvfy(path)
    assert read_measurements(path) == {"classification": {f"Probability of {k}": v for k, v in probs.items()}}
    image = pydicom.dcmread(cxr_sources[source])
    sr = hd.sr.srread(path)
    assert_ohif_can_anchor(sr, {str(image.SOPInstanceUID)})
    assert "ReferencedStudySequence" not in sr and sr.StudyInstanceUID == image.StudyInstanceUID

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (*image.pixel_array.shape, 3), dtype=np.uint8)
    sc_path = write_gradcam_sc(rgb, cxr_sources[source], info, tmp_path / "sc.dcm")
    dciodvfy(sc_path)
    sc = hd.imread(sc_path)
    np.testing.assert_array_equal(sc.pixel_array, rgb)
    assert "ReferencedStudySequence" not in sc and sc.StudyInstanceUID == image.StudyInstanceUID
    assert "Grad-CAM (not for diagnosis)" in sc.SeriesDescription
