"""Faults and bad input in the DICOM paths (issue #20): damaged files, ingest output faults, de-identification,
DICOM-SEG from de-identified series, all-or-nothing volumetric inference, file modes.

Each case asserts the error (one line, naming the file), the exit code where a CLI is involved, and that nothing
half-written is left. Inputs are copies of real slices (TCIA RIDER, COVID-CT-MD) edited in tmp_path.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from conftest import REPO, real_dataset
from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text
from medpipe.inference.ct_volume import VolumeSegmenter
from medpipe.io import deid, dicom, dicom_seg, ingest

# type-2 patient/study attributes that de-identified research series often lack
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
         "StudyTime", "ReferringPhysicianName")  # fmt: skip


@pytest.fixture(scope="module")
def rider() -> list[Path]:
    files = sorted((real_dataset("dicom") / "rider_pilot_chest_ct_0117").glob("*.dcm"))
    assert len(files) == 95
    return files


def copy(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(f, folder / f.name)) for f in files]


def edit(path: Path, **attrs: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attrs.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def everything(folder: Path) -> list[str]:
    """Every file and folder left under `folder` (hidden staging folders included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "medpipe", "ingest", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=180)


def assert_one_line(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout[-1000:]
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines[-1].startswith("medpipe error:"), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# ------------------------------------------------------------------------------------- damaged files (item 3)


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "header_cut":  # cut before ImagePositionPatient: pydicom alone parses it as "not part of a volume"
        path.write_bytes(raw[:1200])
    elif how == "header_cut_late":  # cut after SeriesInstanceUID: the damaged file is known to be in its series
        path.write_bytes(raw[:1600])
    elif how == "cut_in_series_uid":  # a SeriesInstanceUID cut short matches no series: its folder decides
        uid = pydicom.dcmread(path, stop_before_pixels=True).get_item(0x0020000E, keep_deferred=True)
        path.write_bytes(raw[: uid.value_tell + 4])
    elif how == "garbage_body":  # the DICM marker, then noise
        path.write_bytes(raw[:132] + np.random.default_rng(0).bytes(6000))
    elif how == "pixels_short":
        path.write_bytes(raw[:-1])


@pytest.mark.parametrize("how", ["header_cut", "garbage_body", "pixels_short"])
@pytest.mark.parametrize("where", [0, 2, 4])  # first, middle, last slice
def test_damaged_file_anywhere_is_an_error_naming_it(rider: list[Path], tmp_path: Path, how: str, where: int) -> None:
    files = copy(rider[:5], tmp_path / "in")
    damage(files[where], how)
    with pytest.raises(MedpipeError, match="damaged DICOM file") as err:
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert str(files[where]) in str(err.value) and "nothing was written" in str(err.value)
    assert everything(tmp_path / "out") == []
    with pytest.raises(MedpipeError, match="damaged DICOM file"):  # the single-series loader obeys the same policy
        dicom.load_series(tmp_path / "in")


def test_data_set_without_part10_header_is_reported_not_skipped(rider: list[Path], tmp_path: Path) -> None:
    """A raw data set (no preamble, no file meta) is DICOM too: named as such, never silently left out."""
    files = copy(rider[:3], tmp_path / "in")
    meta = pydicom.dcmread(files[1], stop_before_pixels=True).file_meta
    meta_end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    files[1].write_bytes(files[1].read_bytes()[meta_end:])
    with pytest.raises(MedpipeError, match="without the Part 10 file header") as err:
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert str(files[1]) in str(err.value)


@pytest.mark.parametrize("how", ["header_cut", "header_cut_late", "cut_in_series_uid"])
def test_skip_invalid_lists_the_damaged_file_and_leaves_its_series_out_whole(
    rider: list[Path], tmp_path: Path, how: str
) -> None:
    copy(rider[:4], tmp_path / "in" / "good")
    bad = copy(rider[10:15], tmp_path / "in" / "bad")
    for f in bad:
        edit(f, SeriesInstanceUID="1.2.3.4.5")
    damage(bad[-1], how)  # the last slice: without it the volume would look whole, one slice short
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out", skip_invalid=True)
    assert [item["source"] for item in summary["ingested"]] == [str(tmp_path / "in" / "good")]
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert reasons[str(bad[-1])].startswith("damaged DICOM file")
    assert "left out whole" in reasons[str(tmp_path / "in" / "bad")]
    assert summary["counts"] == {"files": 9, "in_series": 8, "not_dicom": 0, "not_a_slice": 0, "damaged": 1}
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 1


def test_non_dicom_files_are_ignored_and_counted(rider: list[Path], tmp_path: Path) -> None:
    copy(rider[:3], tmp_path / "in")
    (tmp_path / "in" / "README").write_text("exported by the PACS\n")
    (tmp_path / "in" / "notes.txt").write_text("scan notes\n")
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert len(summary["ingested"]) == 1 and summary["counts"]["not_dicom"] == 2
    assert "2 not DICOM" in ingest.format_summary(summary)


# ---------------------------------------------------------------------------- ingest CLI arguments (item 10)


def test_cli_skip_invalid_false_does_not_skip(rider: list[Path], tmp_path: Path) -> None:
    files = copy(rider[:4], tmp_path / "in")
    damage(files[-1], "header_cut")
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"), "--skip_invalid", "false")
    assert_one_line(result, str(files[-1]), "damaged DICOM file")
    assert everything(tmp_path / "out") == []
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"), "--skip_invalid", "maybe")
    assert_one_line(result, "--skip_invalid", "maybe")


@pytest.mark.parametrize("value", ["abc", "1.5"])
def test_cli_non_integer_date_shift_is_one_line(rider: list[Path], tmp_path: Path, value: str) -> None:
    copy(rider[:2], tmp_path / "in")
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"), "--date_shift_days", value)
    assert_one_line(result, "--date_shift_days", "whole number of days")
    assert everything(tmp_path / "out") == []


def test_date_shift_accepts_whole_numbers_in_any_form() -> None:
    assert [ingest.date_shift(v) for v in (None, -10, "-10", 7.0, " 3 ")] == [None, -10, -10, 7, 3]
    for bad in (True, "1e9", float("nan")):
        with pytest.raises(MedpipeError, match="date_shift_days"):
            ingest.date_shift(bad)


# -------------------------------------------------------------------------------------- ingest output faults


def test_output_path_that_is_a_file_is_one_line(rider: list[Path], tmp_path: Path) -> None:
    copy(rider[:2], tmp_path / "in")
    (tmp_path / "out").write_text("not a folder")
    assert_one_line(run_cli(str(tmp_path / "in"), str(tmp_path / "out")), "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_read_only_output_folder_is_one_line(
    rider: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copy(rider[:2], tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    real_open = os.open

    def read_only(path: str | os.PathLike, *args: object, **kwargs: object) -> int:
        if Path(path).parent == out and int(args[0]) & os.O_CREAT:  # type: ignore[call-overload]
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)  # root ignores chmod, so simulate the read-only folder
    with pytest.raises(MedpipeError, match="cannot write to output folder .*Permission denied"):
        ingest.ingest(tmp_path / "in", out)
    assert everything(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder_for_real(rider: list[Path], tmp_path: Path) -> None:
    copy(rider[:2], tmp_path / "in")
    (tmp_path / "out").mkdir(mode=0o555)
    assert_one_line(run_cli(str(tmp_path / "in"), str(tmp_path / "out")), "cannot write to output folder")


def test_full_disk_midway_rolls_back_the_whole_ingest(
    rider: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Policy: roll back. The second series' NIfTI hits ENOSPC; the first series (already written) goes too, so
    OUT_DIR never holds series without the summary that lists them."""
    copy(rider[:3], tmp_path / "in" / "a")
    for f in copy(rider[20:23], tmp_path / "in" / "b"):
        edit(f, SeriesInstanceUID="1.2.3.4.6")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "earlier.txt").write_text("kept")
    real_save, calls = nib.save, []

    def full_disk(image: nib.Nifti1Image, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\x1f\x8b half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(image, path)

    monkeypatch.setattr(nib, "save", full_disk)
    with pytest.raises(MedpipeError, match="No space left on device.*nothing was written"):
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    assert len(calls) == 2
    assert everything(tmp_path / "out") == ["earlier.txt"]


# ------------------------------------------------------------------------------------ file modes (umask)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_honour_the_umask(rider: list[Path], tmp_path: Path, umask: int) -> None:
    copy(rider[:2], tmp_path / "in")
    old = os.umask(umask)
    try:
        ingest.ingest(tmp_path / "in", tmp_path / "out")
        atomic_write_text(tmp_path / "plain.txt", "x")
    finally:
        os.umask(old)
    written = [p for p in (tmp_path / "out").iterdir()] + [tmp_path / "plain.txt"]
    assert len(written) == 4  # NIfTI, sidecar, summary, plain.txt
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o666 & ~umask}


def test_replacing_a_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


# --------------------------------------------------------------------------------- de-identification (item 8)


def test_every_free_text_attribute_in_the_sidecar_is_cleaned(tmp_path: Path) -> None:
    path = Path(shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm"))
    edit(
        path,
        PatientName="Doe^Janet",
        PatientID="MRN99817",
        InstitutionName="St Elsewhere Hospital",
        BodyPartExamined="CHEST DOE",
        ProtocolName="Janet Doe chest 2004-01-19",
        StudyDescription="CT for Smith^John acc 20040119123",
        SeriesDescription="MRN99817 follow-up",
        Manufacturer="Elsewhere Physics",
        PatientPosition="HFS",
        ConvolutionKernel="B30f",
    )
    sidecar = dicom.load_series(tmp_path).meta
    text = json.dumps(sidecar).lower()
    for identifier in ("doe", "janet", "mrn99817", "elsewhere", "smith", "john", "2004", "20040119123"):
        assert identifier not in text, identifier
    assert sidecar["body_part_examined"] == "CHEST [removed]"
    assert sidecar["patient_position"] == "HFS" and sidecar["convolution_kernel"] == "B30f"
    assert sidecar["protocol_name"] == "[removed] [removed] chest [date]"


def test_every_string_in_the_sidecar_has_a_policy(rider: list[Path]) -> None:
    """A new sidecar string field must be added to deid.SIDECAR_STRINGS, or it would bypass the cleaning."""
    ds = pydicom.dcmread(rider[0], stop_before_pixels=True)
    layout = dicom.check_series(dicom.Series(str(ds.SeriesInstanceUID), [dicom.SliceFile(rider[0], ds)]))
    volume = dicom.Volume(np.zeros((2, 2, 1), np.int16), layout.affine, (rider[0],))
    sidecar = deid.deidentified_sidecar(layout, volume)
    strings = {k for k, v in sidecar.items() if isinstance(v, str)}
    assert strings - {"modality", "units", "dtype", "series_uid_pseudonym"} == set(deid.SIDECAR_STRINGS)
    assert all(policy in ("code", "text") for _, policy in deid.SIDECAR_STRINGS.values())


# ------------------------------------------------------------------- DICOM-SEG from de-identified series (11)


def test_dicom_seg_from_a_series_without_type2_attributes(rider: list[Path], tmp_path: Path) -> None:
    files = copy(rider[40:43], tmp_path / "s")
    for f in files:
        edit(f, **dict.fromkeys(TYPE2))
    assert not any(k in pydicom.dcmread(files[0], stop_before_pixels=True) for k in TYPE2)
    volume = dicom.load_series(tmp_path / "s")
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[200:300, 200:300, :] = 1
    path = dicom_seg.write_dicom_seg(mask, volume, tmp_path / "seg.dcm", labels={1: "lung"})
    seg = pydicom.dcmread(path)
    assert all(str(seg.get(k, "missing")) == "" for k in ("PatientName", "PatientID", "StudyID", "AccessionNumber"))
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert int(seg.NumberOfFrames) == 3


@pytest.fixture(scope="module")
def covid_slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three consecutive slices of the real de-identified COVID-CT-MD series (no PatientName at all)."""
    files = sorted((real_dataset("covid_ct_md") / "P002").glob("IM*.dcm"))[60:63]
    return copy(files, tmp_path_factory.mktemp("covid") / "P002")[0].parent


def tiny_segmenter() -> VolumeSegmenter:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return VolumeSegmenter(UNet(2, 1, 3, (8, 16), (2,), num_res_units=0), image_size=32, slice_size=64)


def test_covid_ct_md_with_valid_uids_gets_a_seg_despite_no_patient_name(covid_slices: Path, tmp_path: Path) -> None:
    """The real series lacks PatientName (type 2); given UIDs (its own are empty), a SEG is written."""
    files = copy(sorted(covid_slices.glob("*.dcm")), tmp_path / "P002")
    study, series, frame = (pydicom.uid.generate_uid() for _ in range(3))
    for f in files:
        edit(f, StudyInstanceUID=study, SeriesInstanceUID=series, FrameOfReferenceUID=frame,
             SOPInstanceUID=pydicom.uid.generate_uid())  # fmt: skip
    assert "PatientName" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    report = tiny_segmenter()(tmp_path / "P002", tmp_path / "out")
    entry = report["volumes"][0]
    seg = pydicom.dcmread(tmp_path / "out" / entry["files"]["dicom_seg"])
    assert str(seg.PatientName) == "" and str(seg.PatientID) == "P002" and "warnings" not in entry


def test_covid_ct_md_as_shipped_writes_masks_and_says_why_there_is_no_seg(covid_slices: Path, tmp_path: Path) -> None:
    """Its SOPInstanceUIDs are empty (type 1): no SEG could reference the images, so masks + report, and a warning
    that names the bad UIDs once (pydicom's per-file UID warnings stay out of the user's console)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = tiny_segmenter()(covid_slices, tmp_path / "out")
    assert not [w for w in caught if "VR UI" in str(w.message)]
    entry = report["volumes"][0]
    assert "dicom_seg" not in entry["files"]
    assert "no DICOM-SEG" in entry["warnings"][0] and "SOPInstanceUID" in entry["warnings"][0]
    assert sorted(everything(tmp_path / "out")) == sorted([*entry["files"].values(), "report.json"])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["volumes"][0]["warnings"] == entry["warnings"]


# ------------------------------------------------------------------ all-or-nothing volumetric inference


@pytest.mark.parametrize("fault", ["seg_writer_bug", "disk_full"])
def test_failing_writer_leaves_no_partial_set(
    rider: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    copy(rider[40:43], tmp_path / "s")
    (tmp_path / "out").mkdir()
    if fault == "seg_writer_bug":

        def broken(*args: object, **kwargs: object) -> Path:
            raise AttributeError("'FileDataset' object has no attribute 'PatientName'")

        monkeypatch.setattr(dicom_seg, "write_dicom_seg", broken)
        expected = r"writing s_seg.dcm failed \(AttributeError: .*PatientName.*nothing was written"
    else:

        def full(image: nib.Nifti1Image, path: Path) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(nib, "save", full)
        expected = r"No space left on device.*nothing was written"
    with pytest.raises(MedpipeError, match=expected):
        tiny_segmenter()(tmp_path / "s", tmp_path / "out")
    assert everything(tmp_path / "out") == []


def test_non_conformant_uids_are_read_with_one_warning_per_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """COVID-CT-MD's UUID-style UIDs: pydicom would warn once per file; the scan says it once for the folder."""
    import warnings

    from medpipe.io import dicom_scan

    files = copy(sorted((real_dataset("covid_ct_md") / "P002").glob("*.dcm"))[:4], tmp_path / "s")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING", logger=dicom_scan.log.name):
        warnings.simplefilter("always")
        scan = dicom_scan.find_series(tmp_path / "s")
    assert len(scan.series) == 1 and len(scan.series[0].files) == len(files)
    assert not [w for w in caught if "VR UI" in str(w.message)]
    lines = [r.getMessage() for r in caplog.records if "not DICOM-conformant" in r.getMessage()]
    assert len(lines) == 1 and "4 file(s)" in lines[0]
