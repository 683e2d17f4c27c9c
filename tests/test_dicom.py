"""medpipe.dicom and `medpipe ingest` on a real chest-CT series (TCIA RIDER Pilot) and pydicom's shipped test files.

Bad-input cases are built by copying slices into tmp_path and editing the copies; ../shared stays read-only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medpipe.errors import MedpipeError
from medpipe.io import dicom, ingest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDPIPE_DATA") or ROOT.parent / "shared" / "data")
RIDER = DATA / "dicom" / "rider_pilot_chest_ct_0117"
CT2 = sorted(Path(get_testdata_file("CT_small.dcm")).parent.joinpath("dicomdirtests/77654033/CT2").iterdir())


@pytest.fixture(scope="module")
def rider_files() -> list[Path]:
    """The 95 real slices, 1-001.dcm … 1-095.dcm (file order = InstanceNumber = rising z)."""
    files = sorted(RIDER.glob("*.dcm"))
    if len(files) != 95:
        pytest.skip(f"set MEDPIPE_DATA to the folder holding dicom/rider_pilot_chest_ct_0117 (not found under {DATA})")
    return files


@pytest.fixture(scope="module")
def ingested(rider_files: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`ingest` of the whole real series, once for the module."""
    out = tmp_path_factory.mktemp("ingest")
    return out, ingest.ingest(RIDER, out)


def copy_slices(files: list[Path], folder: Path, names: list[str] | None = None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    names = names or [f.name for f in files]
    return [Path(shutil.copyfile(f, folder / n)) for f, n in zip(files, names, strict=True)]


def edit(path: Path, **attrs: object) -> None:
    """Set header attributes in a copied file (keyword=value; None deletes)."""
    ds = pydicom.dcmread(path)
    for keyword, value in attrs.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def lps_to_ras(position: object) -> np.ndarray:
    x, y, z = (float(v) for v in position)
    return np.array([-x, -y, z])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medpipe", "ingest", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def niftis(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.nii*")) + sorted(folder.glob(".tmp-*")) if folder.exists() else []


# ------------------------------------------------------------------------------------------------ the real series


def test_ingest_real_series_shape_spacing_dtype(ingested: tuple[Path, dict], rider_files: list[Path]) -> None:
    out, summary = ingested
    (item,) = summary["ingested"]
    image = nib.load(out / item["nifti"])
    first, second = header(rider_files[0]), header(rider_files[1])
    row_mm, col_mm = (float(v) for v in first.PixelSpacing)
    slice_mm = float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])
    assert image.shape == (512, 512, 95)
    assert image.get_data_dtype() == np.int16
    np.testing.assert_allclose(image.header.get_zooms(), (col_mm, row_mm, slice_mm), atol=1e-4)
    np.testing.assert_allclose(image.header.get_zooms(), (0.644531, 0.644531, 0.8), atol=1e-4)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def test_affine_maps_voxels_to_slice_positions_in_ras(ingested: tuple[Path, dict], rider_files: list[Path]) -> None:
    out, summary = ingested
    affine = nib.load(out / summary["ingested"][0]["nifti"]).affine
    by_z = sorted(rider_files, key=lambda f: float(header(f).ImagePositionPatient[2]))
    first, last = (lps_to_ras(header(f).ImagePositionPatient) for f in (by_z[0], by_z[-1]))
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], [*first, 1], atol=1e-4)
    np.testing.assert_allclose(affine @ [0, 0, 94, 1], [*last, 1], atol=1e-3)
    # column index i runs along DICOM +x (patient left) = RAS −x; row index j along +y (posterior) = RAS −y
    np.testing.assert_allclose(affine[:3, 0], [-0.644531, 0, 0], atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], [0, -0.644531, 0], atol=1e-6)


def test_voxels_are_the_rescaled_pixels(ingested: tuple[Path, dict], rider_files: list[Path]) -> None:
    out, summary = ingested
    data = np.asanyarray(nib.load(out / summary["ingested"][0]["nifti"]).dataobj)
    for k in (0, 47, 94):
        ds = pydicom.dcmread(rider_files[k])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(data[:, :, k], hu.T)  # array is (column, row, slice)


def test_hu_values_are_plausible(ingested: tuple[Path, dict]) -> None:
    out, summary = ingested
    data = np.asanyarray(nib.load(out / summary["ingested"][0]["nifti"]).dataobj)
    inside_fov = data[data > -2000]  # raw padding −2000 outside the circular FOV is −3024 HU
    air_in_front = np.median(data[224:288, :32, :])  # centre columns, first 20 mm of rows: air anterior to the chest
    assert -1025 <= air_in_front <= -975, air_in_front
    assert -1030 <= np.percentile(inside_fov, 1) <= -970  # the darkest matter inside the FOV is air
    counts, edges = np.histogram(inside_fov, bins=np.arange(-200, 310, 10))
    tissue_peak = edges[np.argmax(counts)]
    assert 0 <= tissue_peak <= 100, tissue_peak  # the commonest non-air value: muscle, blood, liver
    assert inside_fov.max() < 4000


def test_matches_monai_itkreader_with_anisotropic_pixels(rider_files: list[Path], tmp_path: Path) -> None:
    from monai.transforms import LoadImage

    copies = copy_slices(rider_files[10:14], tmp_path / "s")
    for f in copies:  # rows 0.5 mm apart, columns 0.7 mm: catches a PixelSpacing[0]/[1] mix-up
        edit(f, PixelSpacing=[0.5, 0.7])
    volume = dicom.load_series(tmp_path / "s")
    reference = LoadImage(reader="ITKReader", image_only=True)(str(tmp_path / "s"))
    np.testing.assert_array_equal(volume.array, np.asarray(reference))
    np.testing.assert_allclose(volume.affine, np.asarray(reference.affine), atol=1e-4)
    np.testing.assert_allclose(volume.spacing, (0.7, 0.5, 0.8), atol=1e-4)


def test_sidecar_fields_and_deidentification(ingested: tuple[Path, dict], rider_files: list[Path]) -> None:
    out, summary = ingested
    text = (out / summary["ingested"][0]["sidecar"]).read_text()
    sidecar = json.loads(text)
    ds = header(rider_files[0])
    assert sidecar["modality"] == "CT"
    assert sidecar["shape"] == [512, 512, 95]
    np.testing.assert_allclose(sidecar["spacing_mm"], [0.644531, 0.644531, 0.8], atol=1e-6)
    assert sidecar["series_description"] == str(ds.SeriesDescription)
    assert sidecar["convolution_kernel"] == "STANDARD"
    assert sidecar["slice_thickness_mm"] == 1.25
    assert sidecar["units"] == "HU"
    for identifier in (str(ds.PatientName), str(ds.PatientID), ds.SeriesInstanceUID, ds.StudyInstanceUID, "20000520"):
        assert identifier not in text
    assert "2000-05-20" not in text and sidecar["deidentification"]["dates"] == "removed"


def test_summary_lists_ingested_series_and_skipped_files(ingested: tuple[Path, dict]) -> None:
    out, summary = ingested
    assert json.loads((out / "ingest_summary.json").read_text()) == summary
    assert [i["n_files"] for i in summary["ingested"]] == [95]
    skipped = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert skipped == {"README.md": "not a DICOM file", "MANIFEST.csv": "not a DICOM file"}
    assert not list(out.glob(".tmp-*"))


def test_cli_success(rider_files: list[Path], tmp_path: Path) -> None:
    copy_slices(rider_files[:6], tmp_path / "in")
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "ingested 1 series" in result.stdout
    (nifti,) = niftis(tmp_path / "out")
    assert nib.load(nifti).shape == (512, 512, 6)


@pytest.mark.parametrize("case", ["empty", "gap"])
def test_cli_error_is_one_line_and_writes_nothing(case: str, rider_files: list[Path], tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    if case == "gap":
        copy_slices(rider_files[:3] + rider_files[4:7], src)
    result = run_cli(str(src), str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medpipe error: "), result.stderr
    assert (str(src) if case == "empty" else "1-003.dcm and 1-005.dcm") in lines[0]
    assert niftis(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------------------- bad input


def test_shuffled_files_sort_by_position_not_instance_number(rider_files: list[Path], tmp_path: Path) -> None:
    ordered = dicom.load_series(copy_slices(rider_files[:10], tmp_path / "ordered")[0].parent)
    files = rider_files[:10]
    shuffled = copy_slices(files, tmp_path / "shuffled", [f"{uuid.uuid4().hex}.dcm" for _ in files])
    numbers = list(range(1, 11))
    random.Random(0).shuffle(numbers)
    for path, number in zip(shuffled, numbers, strict=True):
        edit(path, InstanceNumber=number)  # InstanceNumber no longer follows z
    volume = dicom.load_series(tmp_path / "shuffled")
    np.testing.assert_array_equal(volume.array, ordered.array)
    np.testing.assert_allclose(volume.affine, ordered.affine)
    zs = [float(header(f).ImagePositionPatient[2]) for f in volume.source_files]
    assert zs == sorted(zs)


def test_missing_slice_is_an_error_naming_its_position(rider_files: list[Path], tmp_path: Path) -> None:
    copy_slices(rider_files[:4] + rider_files[5:8], tmp_path / "s")
    missing_z = float(header(rider_files[4]).ImagePositionPatient[2])
    with pytest.raises(MedpipeError) as err:
        dicom.load_series(tmp_path / "s")
    message = str(err.value)
    assert "1 missing slice" in message and f"{missing_z:.1f}" in message
    assert "1-004.dcm and 1-006.dcm" in message and "--on_gap warn" in message


def test_missing_slice_with_warn_fills_the_gap(
    rider_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy_slices(rider_files[:4] + rider_files[5:8], tmp_path / "in")
    with caplog.at_level(logging.WARNING, logger="medpipe.io.dicom"):
        summary = ingest.ingest(tmp_path / "in", tmp_path / "out", on_gap="warn")
    assert any("missing slice" in r.getMessage() for r in caplog.records)
    (item,) = summary["ingested"]
    assert item["warnings"] and "missing slice" in item["warnings"][0]
    image = nib.load(tmp_path / "out" / item["nifti"])
    data = np.asanyarray(image.dataobj)
    assert data.shape == (512, 512, 8)
    np.testing.assert_allclose(image.header.get_zooms()[2], 0.8, atol=1e-4)
    ds = pydicom.dcmread(rider_files[5])
    np.testing.assert_array_equal(data[:, :, 5], (ds.pixel_array - 1024).T)  # slices after the gap keep their place
    assert (data[:, :, 4] == data.min()).all()
    sidecar = json.loads((tmp_path / "out" / item["sidecar"]).read_text())
    assert sidecar["missing_slices"][0]["index"] == 4
    removed = [float(v) for v in header(rider_files[4]).ImagePositionPatient]
    np.testing.assert_allclose(sidecar["missing_slices"][0]["position_lps_mm"], removed, atol=0.01)


def test_exact_duplicate_file_is_dropped_with_a_warning(
    rider_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy_slices(rider_files[:5], tmp_path / "s")
    shutil.copyfile(rider_files[2], tmp_path / "s" / "copy_of_3.dcm")
    with caplog.at_level(logging.WARNING, logger="medpipe.io.dicom"):
        volume = dicom.load_series(tmp_path / "s")
    assert volume.array.shape == (512, 512, 5)
    assert any("copy_of_3.dcm" in r.getMessage() or "1-003.dcm" in r.getMessage() for r in caplog.records)


def test_two_different_images_at_one_position_are_an_error(rider_files: list[Path], tmp_path: Path) -> None:
    copy_slices(rider_files[:5], tmp_path / "s")
    dup = Path(shutil.copyfile(rider_files[2], tmp_path / "s" / "other.dcm"))
    edit(dup, SOPInstanceUID=pydicom.uid.generate_uid())
    with pytest.raises(MedpipeError, match=r"duplicate slice") as err:
        dicom.load_series(tmp_path / "s")
    assert "other.dcm" in str(err.value) and "1-003.dcm" in str(err.value)


def test_two_series_in_one_folder_are_both_found(rider_files: list[Path], tmp_path: Path) -> None:
    copy_slices(rider_files[:6], tmp_path / "in")
    second = copy_slices(rider_files[6:10], tmp_path / "in")
    uid = pydicom.uid.generate_uid()
    for f in second:
        edit(f, SeriesInstanceUID=uid, SeriesNumber=5)
    scan = dicom.find_series(tmp_path / "in")
    assert sorted(len(s.files) for s in scan.series) == [4, 6]
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out")
    shapes = sorted(nib.load(tmp_path / "out" / i["nifti"]).shape for i in summary["ingested"])
    assert shapes == [(512, 512, 4), (512, 512, 6)]


def test_truncated_file_is_an_error_and_nothing_is_written(rider_files: list[Path], tmp_path: Path) -> None:
    copies = copy_slices(rider_files[:5], tmp_path / "in")
    raw = copies[2].read_bytes()
    copies[2].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MedpipeError, match=r"truncated") as err:
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert str(copies[2]) in str(err.value)
    assert niftis(tmp_path / "out") == []


def test_non_dicom_files_are_skipped_with_a_warning(
    rider_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy_slices(rider_files[:3], tmp_path / "in")
    (tmp_path / "in" / "notes.txt").write_text("scanned on Tuesday\n")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "blob.dcm").write_bytes(os.urandom(4096))
    shutil.copyfile(get_testdata_file("test-SR.dcm"), tmp_path / "in" / "sub" / "report.dcm")
    shutil.copyfile(get_testdata_file("rtdose.dcm"), tmp_path / "in" / "sub" / "dose.dcm")
    with caplog.at_level(logging.WARNING, logger="medpipe.io.dicom"):
        summary = ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert len(summary["ingested"]) == 1
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert reasons["notes.txt"] == reasons["blob.dcm"] == "not a DICOM file"
    assert reasons["report.dcm"].startswith("not an image")  # a structured report: DICOM, but no image
    assert reasons["dose.dcm"].startswith("multi-frame")
    assert sum("not a DICOM file" in r.getMessage() for r in caplog.records) == 2


def test_dicom_without_pixel_data_is_an_error(rider_files: list[Path], tmp_path: Path) -> None:
    copies = copy_slices(rider_files[:4], tmp_path / "s")
    edit(copies[1], PixelData=None)
    with pytest.raises(MedpipeError, match=r"without pixel data") as err:
        dicom.load_series(tmp_path / "s")
    assert str(copies[1]) in str(err.value)


def test_mixed_orientations_are_an_error(rider_files: list[Path], tmp_path: Path) -> None:
    copies = copy_slices(rider_files[:4], tmp_path / "s")
    edit(copies[3], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])  # a coronal slice in an axial series
    with pytest.raises(MedpipeError, match=r"ImageOrientationPatient") as err:
        dicom.load_series(tmp_path / "s")
    assert str(copies[3]) in str(err.value)


@pytest.mark.parametrize(
    ("attrs", "what"),
    [({"Modality": "MR"}, "Modality"), ({"PixelSpacing": [0.7, 0.7]}, "PixelSpacing")],
)
def test_inconsistent_headers_are_an_error(attrs: dict, what: str, rider_files: list[Path], tmp_path: Path) -> None:
    copies = copy_slices(rider_files[:4], tmp_path / "s")
    edit(copies[2], **attrs)
    with pytest.raises(MedpipeError, match=what) as err:
        dicom.load_series(tmp_path / "s")
    assert str(copies[2]) in str(err.value)


def test_uneven_spacing_is_an_error(rider_files: list[Path], tmp_path: Path) -> None:
    copies = copy_slices(rider_files[:6], tmp_path / "s")
    ipp = [float(v) for v in header(copies[3]).ImagePositionPatient]
    edit(copies[3], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.3])
    with pytest.raises(MedpipeError, match=r"uneven slice spacing"):
        dicom.load_series(tmp_path / "s")


def test_empty_or_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match=r"empty folder"):
        ingest.ingest(tmp_path, tmp_path / "out")
    with pytest.raises(MedpipeError, match=r"not a directory"):
        ingest.ingest(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MedpipeError, match=r"no valid DICOM image series among 1 file"):
        ingest.ingest(tmp_path, tmp_path / "out")
    with pytest.raises(MedpipeError, match=r"on_gap='maybe'"):
        ingest.ingest(tmp_path, tmp_path / "out", on_gap="maybe")


def test_skip_invalid_keeps_the_valid_series(rider_files: list[Path], tmp_path: Path) -> None:
    copy_slices(rider_files[:4], tmp_path / "in" / "good")
    bad = copy_slices(rider_files[10:14], tmp_path / "in" / "bad")
    for f in bad:
        edit(f, SeriesInstanceUID="1.2.3.4")
    edit(bad[1], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(MedpipeError):
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert niftis(tmp_path / "out") == []
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out", skip_invalid=True)
    assert len(summary["ingested"]) == 1 and summary["ingested"][0]["source"].endswith("good")
    assert any("ImageOrientationPatient" in s["reason"] for s in summary["skipped"])


def test_failed_write_leaves_no_partial_file(
    rider_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy_slices(rider_files[:3], tmp_path / "in")

    def half_write(image: nib.Nifti1Image, path: Path) -> None:
        Path(path).write_bytes(b"\x1f\x8b partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", half_write)
    with pytest.raises(MedpipeError, match="disk full.*nothing was written"):
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # the run made the folder, and removes it with its staged files


# ------------------------------------------------------------------------------------------- pydicom's test files


def test_single_slice_ct_small(tmp_path: Path) -> None:
    path = Path(get_testdata_file("CT_small.dcm"))
    copy_slices([path], tmp_path / "in")
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out", date_shift_days=-10)
    (item,) = summary["ingested"]
    image = nib.load(tmp_path / "out" / item["nifti"])
    ds = pydicom.dcmread(path)
    assert image.shape == (128, 128, 1)
    np.testing.assert_allclose(image.header.get_zooms(), (0.661468, 0.661468, float(ds.SliceThickness)), atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, :, 0], (ds.pixel_array - 1024).T)
    np.testing.assert_allclose(image.affine[:3, 3], lps_to_ras(ds.ImagePositionPatient), atol=1e-5)
    text = (tmp_path / "out" / item["sidecar"]).read_text()
    for identifier in ("CompressedSamples", "1CT1", "JFK", ds.StudyDate, ds.SeriesInstanceUID):
        assert identifier not in text
    assert json.loads(text)["study_date_shifted"] == "2004-01-09"  # 2004-01-19 shifted by −10 days


def test_free_text_identifiers_are_cleaned(tmp_path: Path) -> None:
    (path,) = copy_slices([Path(get_testdata_file("CT_small.dcm"))], tmp_path / "in")
    edit(path, SeriesDescription="CHEST compressedsamples 1CT1 JFK Imaging Center 2004-01-19")
    sidecar = dicom.load_series(tmp_path / "in").meta
    assert sidecar["series_description"] == "CHEST [removed] [removed] [removed] [date]"


def test_pydicom_ct2_series_has_a_real_gap(tmp_path: Path) -> None:
    """pydicom's 4-file CT2 series: slice z=−99.48 then z=103.02…105.52 at 1.25 mm, i.e. 161 slices missing."""
    copy_slices(CT2, tmp_path / "ct2")
    with pytest.raises(MedpipeError, match=r"161 missing slice"):
        dicom.load_series(tmp_path / "ct2")
    volume = dicom.load_series(tmp_path / "ct2", on_gap="warn")
    assert volume.array.shape == (16, 16, 165)
    np.testing.assert_allclose(volume.spacing, (0.488281, 0.488281, 1.25), atol=1e-4)
    assert sum(f is not None for f in volume.source_files) == 4
    last = pydicom.dcmread(CT2[-1])
    np.testing.assert_allclose(volume.affine @ [0, 0, 164, 1], [*lps_to_ras(last.ImagePositionPatient), 1], atol=1e-3)


def test_itk_fallback_for_undecodable_transfer_syntax(
    rider_files: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plain = copy_slices(rider_files[20:23], tmp_path / "plain")
    for path in copy_slices(rider_files[20:23], tmp_path / "rle"):
        ds = pydicom.dcmread(path)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(path)
    reference = dicom.load_series(plain[0].parent)
    original = pydicom.pixels.pixel_array

    def no_decoder(src: object, *args: object, **kwargs: object) -> np.ndarray:
        if pydicom.dcmread(src, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed:
            raise RuntimeError("Unable to decode as exceptions were raised by all available plugins")
        return original(src, *args, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", no_decoder)
    with caplog.at_level(logging.INFO, logger="medpipe.io.dicom"):
        volume = dicom.load_series(tmp_path / "rle")
    assert sum("with ITK" in r.getMessage() for r in caplog.records) == 3
    np.testing.assert_array_equal(volume.array, reference.array)


def test_itk_decodes_what_pydicom_cannot() -> None:
    path = Path(get_testdata_file("JPEG-lossy.dcm"))  # 12-bit JPEG Extended: pydicom's pillow plugin gives up
    with pytest.raises(RuntimeError):
        pydicom.dcmread(path).pixel_array  # noqa: B018
    ds = pydicom.dcmread(path, defer_size=4096)
    values, _ = dicom._decode_hu(dicom.SliceFile(path, ds))
    assert values.shape == (int(ds.Rows), int(ds.Columns))
    assert 0 <= values.min() < values.max() < 2**12
