"""Faults and bad input in the DICOM paths (issue #20): damaged files, ingest output faults, de-identification,
DICOM-SEG from de-identified series, all-or-nothing volumetric inference, file modes.

Each case asserts the error (one line, naming the file), the exit code where a CLI is involved, and that nothing
half-written is left. Inputs are copies of real slices (TCIA RIDER, COVID-CT-MD) edited in tmp_path.
"""

from __future__ import annotations

import errno
import json
import os
import re
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
    from medpipe.io.dicom import load_series

    files = copy(sorted((real_dataset("covid_ct_md") / "P002").glob("*.dcm"))[:4], tmp_path / "s")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        scan = dicom_scan.find_series(tmp_path / "s")
        load_series(scan.series[0])  # its checks read the UIDs again
    assert len(scan.series) == 1 and len(scan.series[0].files) == len(files)
    assert not [w for w in caught if "VR UI" in str(w.message)]
    assert not [r for r in caplog.records if "VR UI" in r.getMessage() and r.name == "pydicom"]  # its log record
    lines = [r.getMessage() for r in caplog.records if "not DICOM-conformant" in r.getMessage()]
    assert len(lines) == 1 and "4 file(s)" in lines[0]


# ------------------------------------------------------------ outside probe: names, burned-in text (item 17)


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("Li^Bo", ["Li", "Bo"]),
        ("X^Y", ["X", "Y"]),
        ("山田^太郎", ["山田", "太郎"]),
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", ["Yamada", "Tarou", "山田", "太郎", "やまだ", "たろう"]),
    ],
)
def test_short_and_non_latin_names_are_removed_from_the_sidecar(
    rider: list[Path], tmp_path: Path, name: str, parts: list[str]
) -> None:
    """Name parts of one or two letters and CJK parts (written without spaces) are identifiers too; "liver" and
    "X-ray" words that merely contain a short Latin part survive."""
    files = copy(rider[40:42], tmp_path / "in")
    joined = "".join(parts) if not parts[-1].isascii() else " ".join(parts)  # CJK names are written unspaced
    for f in files:
        edit(
            f,
            SpecificCharacterSet="ISO_IR 192",
            PatientName=name,
            SeriesDescription=f"{parts[1]} {parts[0]} liver",
            StudyDescription=f"{joined} X-ray follow-up",
            ProtocolName=f"chest {parts[-1]}",
        )
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out")
    sidecar = json.loads((tmp_path / "out" / summary["ingested"][0]["sidecar"]).read_text())
    cleaned = " ".join(sidecar[k] for k in ("series_description", "study_description", "protocol_name"))
    for part in parts:
        assert part not in (re.findall(r"\w+", cleaned) if part.isascii() else cleaned), (part, cleaned)
    assert sidecar["series_description"] == "[removed] [removed] liver"
    assert sidecar["protocol_name"] == "chest [removed]"
    assert sidecar["study_description"].endswith("-ray follow-up")


def test_short_ids_are_not_blanked_everywhere(tmp_path: Path) -> None:
    """Only person names count at any length: a StudyID "1" identifies no one, and the "1" of "1 mm" stays."""
    path = Path(shutil.copyfile(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm"))
    edit(path, StudyID="1", PatientName="Li^Bo", SeriesDescription="Chest 1 mm Li")
    assert dicom.load_series(tmp_path).meta["series_description"] == "Chest 1 mm [removed]"


def test_burned_in_annotation_is_refused_unless_allowed(rider: list[Path], tmp_path: Path) -> None:
    """PS3.15: text burned into the pixels survives header de-identification, so such a series is refused by
    default (one line naming it), and with the explicit opt-in ingested with a warning recorded in the sidecar."""
    files = copy(rider[40:43], tmp_path / "in")
    edit(files[1], BurnedInAnnotation="YES")
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"))
    assert_one_line(result, uid, "BurnedInAnnotation YES in 1 of 3 file(s)", "--allow_burned_in")
    assert everything(tmp_path / "out") == []
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out", allow_burned_in=True)
    assert "BurnedInAnnotation YES" in summary["ingested"][0]["warnings"][0]
    sidecar = json.loads((tmp_path / "out" / summary["ingested"][0]["sidecar"]).read_text())
    assert sidecar["burned_in_annotation"] is True
    assert "identifying text may remain" in sidecar["deidentification"]["pixel_data"]
    assert "113101" not in sidecar["deidentification"]["codes"]  # pixels were not cleaned


# --------------------------------------------------------- outside probe: one series UID, two patients (item 19)


@pytest.mark.parametrize("keyword", ["PatientID", "StudyInstanceUID"])
def test_series_uid_shared_by_two_patients_or_studies_is_refused(
    rider: list[Path], tmp_path: Path, keyword: str
) -> None:
    files = copy(rider[40:44], tmp_path / "in")
    for f in files[2:]:  # the upper half is someone else's, under the same SeriesInstanceUID
        edit(f, **{keyword: "OTHER77" if keyword == "PatientID" else "1.2.826.0.1.3680043.2.1125.77"})
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    result = run_cli(str(tmp_path / "in"), str(tmp_path / "out"))
    assert_one_line(result, f"series {uid}", f"more than one {keyword}")
    assert "OTHER77" not in result.stderr and everything(tmp_path / "out") == []
    with pytest.raises(MedpipeError, match=f"more than one {keyword}"):
        dicom.load_series(tmp_path / "in")


# ------------------------------------- outside probe: deflated, colour, variable spacing, multi-frame (20, 21)


def test_deflated_transfer_syntax_series_loads_like_the_original(rider: list[Path], tmp_path: Path) -> None:
    """Deflated Explicit VR Little Endian (1.2.840.10008.1.2.1.99) is a valid transfer syntax: same voxels."""
    for f in copy(rider[40:43], tmp_path / "plain"):
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        (tmp_path / "deflated").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "deflated" / f.name, implicit_vr=False, little_endian=True, enforce_file_format=True)
    assert (tmp_path / "deflated" / rider[40].name).stat().st_size < rider[40].stat().st_size / 2
    deflated, plain = dicom.load_series(tmp_path / "deflated"), dicom.load_series(tmp_path / "plain")
    np.testing.assert_array_equal(deflated.array, plain.array)
    np.testing.assert_array_equal(deflated.affine, plain.affine)


def test_rgb_ct_series_is_one_line(rider: list[Path], tmp_path: Path) -> None:
    for f in copy(rider[40:42], tmp_path / "in"):
        ds = pydicom.dcmread(f)
        grey = (ds.pixel_array >> 4).astype(np.uint8)
        ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.save_as(f)
    assert_one_line(run_cli(str(tmp_path / "in"), str(tmp_path / "out")), "PhotometricInterpretation RGB",
                    "needs greyscale")  # fmt: skip
    assert everything(tmp_path / "out") == []


def respace(files: list[Path], steps: list[float], thickness: list[float] | None = None) -> None:
    """Move slices along z so that consecutive slices lie `steps` mm apart (and set SliceThickness per slice)."""
    z = np.concatenate([[0.0], np.cumsum(steps)])
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -100.0 + float(z[k])]
        if thickness is not None:
            ds.SliceThickness = thickness[k]
        ds.save_as(f)


@pytest.mark.parametrize("on_gap", ["error", "warn"])
def test_spacing_change_is_refused_not_filled_as_missing_slices(
    rider: list[Path], tmp_path: Path, on_gap: str
) -> None:
    """1.25 mm slices, then 5 mm ones: the 5 mm steps are whole multiples, but no slice is missing; refused in
    one line that says from what to what and where, even with --on_gap warn (never invented slices)."""
    files = copy(rider[40:50], tmp_path / "in")
    respace(files, [1.25] * 5 + [5.0] * 4)
    with pytest.raises(MedpipeError, match=r"slice spacing changes from 1\.250 mm to 5\.000 mm between") as err:
        ingest.ingest(tmp_path / "in", tmp_path / "out", on_gap=on_gap)
    assert "missing" not in str(err.value) and "-93.75 and -88.75 mm along the normal" in str(err.value)
    assert everything(tmp_path / "out") == []


def test_one_thicker_last_slice_is_a_spacing_change_when_its_thickness_changes(
    rider: list[Path], tmp_path: Path
) -> None:
    files = copy(rider[40:46], tmp_path / "in")
    respace(files, [1.25] * 4 + [5.0], thickness=[1.25] * 5 + [5.0])
    with pytest.raises(MedpipeError, match=r"changes from 1\.250 mm to 5\.000 mm .*SliceThickness changes from 1\.25"):
        ingest.ingest(tmp_path / "in", tmp_path / "out", on_gap="warn")


def test_a_lone_gap_is_still_a_gap(rider: list[Path], tmp_path: Path) -> None:
    """One missing slice in a regular grid stays a gap (filled with --on_gap warn), not a spacing change."""
    files = copy(rider[40:46], tmp_path / "in")
    respace(files, [1.25, 1.25, 2.5, 1.25, 1.25])
    with pytest.raises(MedpipeError, match="1 missing slice"):
        ingest.ingest(tmp_path / "in", tmp_path / "out")
    summary = ingest.ingest(tmp_path / "in", tmp_path / "out", on_gap="warn")
    assert summary["ingested"][0]["shape"][2] == 7


def test_multi_frame_file_is_named_as_multi_frame(rider: list[Path], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    ds = pydicom.dcmread(rider[40])
    ds.NumberOfFrames, ds.PixelData = 3, np.stack([ds.pixel_array] * 3).tobytes()
    ds.save_as(tmp_path / "in" / "cine.dcm")
    (tmp_path / "in" / "README").write_text("export notes\n")  # a stray file must not hide the reason
    with pytest.raises(MedpipeError, match=r"cine\.dcm: multi-frame image \(3 frames\)"):
        dicom.load_series(tmp_path / "in")
    assert_one_line(run_cli(str(tmp_path / "in"), str(tmp_path / "out")), "multi-frame image (3 frames)")
    from medpipe.io.images import load_grey_2d

    with pytest.raises(MedpipeError, match=r"cine\.dcm' is a multi-frame image \(3 frames"):
        load_grey_2d(tmp_path / "in" / "cine.dcm")


# ------------------------------------------------------------------ outside probe: gantry tilt (item 18)


def tilt_series(files: list[Path], degrees: float, geometry: bool = True) -> None:
    """A gantry tilt as scanners write it: the image planes tilt about the left-right axis (ImageOrientationPatient)
    while the table still moves each slice straight along head-foot (ImagePositionPatient), plus the header tag."""
    t = np.radians(degrees)
    for f in files:
        attrs: dict[str, object] = {"GantryDetectorTilt": degrees}
        if geometry:
            attrs["ImageOrientationPatient"] = [1, 0, 0, 0, float(np.cos(t)), float(-np.sin(t))]
        edit(f, **attrs)


@pytest.mark.parametrize(("degrees", "geometry"), [(70.0, True), (70.0, False), (35.0, True)])
def test_gantry_tilt_over_30_degrees_is_not_segmented_as_axial(
    rider: list[Path], tmp_path: Path, degrees: float, geometry: bool
) -> None:
    """docs (covid_ct_seg README): volumetric inference refuses a volume that is not axial (> 30° tilt). The
    tilted planes are stacked straight head-foot, so the stacking axis alone looks axial; the planes and the
    GantryDetectorTilt tag say otherwise."""
    from medpipe.transforms.ct_intensity import check_axial_ct

    files = copy(rider[40:44], tmp_path / "in")
    tilt_series(files, degrees, geometry)
    volume = dicom.load_series(tmp_path / "in")
    with pytest.raises(MedpipeError, match=rf"not an axial volume \(its slices lean {degrees:.0f}° from axial"):
        check_axial_ct(volume, "tilted")
    assert volume.meta["gantry_detector_tilt_deg"] == degrees


def test_gantry_tilt_within_30_degrees_is_axial_and_noted(rider: list[Path], tmp_path: Path) -> None:
    from medpipe.io import ct
    from medpipe.transforms.ct_intensity import check_axial_ct

    files = copy(rider[40:44], tmp_path / "in")
    tilt_series(files, 20.0)
    layout = dicom.check_series(dicom.find_series(tmp_path / "in").series[0])
    assert any("sheared 20.0° (gantry tilt)" in w for w in layout.warnings)
    volume = dicom.load_series(layout)
    assert ct.slice_tilt_deg(volume.affine) == pytest.approx(20.0, abs=1e-3)
    check_axial_ct(volume, "tilted")  # within the limit: segmented
