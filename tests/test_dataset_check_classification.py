"""`medpipe dataset check PATH --bundle brain_tumor_cls|covid_cxr_cls`: the real class-folder and labels-CSV sets pass
with the counts their bundles' own datalist functions give; each fault, built in tmp_path from a few copied real
images, is one `error:` line and a non-zero exit, through the CLI entry (a subprocess for the real sets)."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_dataset_check import error_lines, medpipe_dataset_check

from conftest import REPO, real_dataset
from medpipe.cli import main
from medpipe.data.classification_check import classification_bundle
from medpipe.data.datalists import class_folder_datalists, labels_csv_datalists, read_labels_csv, scan_class_folders
from medpipe.errors import MedpipeError

BRAIN = ["no", "yes"]
CXR = ["covid19", "pneumonia", "normal"]
CXR_COLUMNS = ["image", "label", "patient_id", "source"]


def in_process_check(*args: str) -> subprocess.CompletedProcess:
    """`medpipe dataset check ARGS` through the same CLI entry, in this process: the fault tests below would
    otherwise pay ~4 s of imports each in a subprocess; the real sets and one refusal go through the real command."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["dataset", "check", *args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def summary(result: object, title: str) -> str:
    """The text after the summary line's 14-character title."""
    line = next(line for line in result.stdout.splitlines() if line.startswith(title))  # type: ignore[attr-defined]
    return line[14:]


def class_rows(result: object) -> dict[str, int]:
    """{class name: images} from the summary's class table."""
    lines = result.stdout.splitlines()  # type: ignore[attr-defined]
    start = next(i for i, line in enumerate(lines) if line.startswith("classes"))
    rows = [line.split() for line in lines[start + 1:] if line.startswith(" " * 14)]
    return {row[1]: int(row[2]) for row in rows}


# ------------------------------------------------------------------------------------------------ the real sets


def test_the_bundles_name_their_layout_and_classes() -> None:
    brain = classification_bundle(REPO / "bundles" / "brain_tumor_cls")
    cxr = classification_bundle(REPO / "bundles" / "covid_cxr_cls")
    assert brain is not None and (brain.layout, brain.class_names, brain.label_map) == ("class folders", BRAIN, None)
    assert cxr is not None and (cxr.layout, cxr.class_names, cxr.csv_name) == ("labels CSV", CXR, "labels.csv")
    assert cxr.label_map == {c: c for c in CXR} and brain.split_mode == cxr.split_mode == "group"
    assert classification_bundle(REPO / "bundles" / "covid_ct_seg") is None  # segmentation: medpipe.data.integrity


def test_real_brain_mri_passes_with_the_bundles_own_counts() -> None:
    root = real_dataset("brain_mri_yes_no")
    result = medpipe_dataset_check(str(root), "--bundle", "brain_tumor_cls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert error_lines(result) == [] and summary(result, "result") == "ok"
    items = class_folder_datalists(root, BRAIN, -1)["train"]  # fold -1: every image the bundle trains on
    counts = Counter(it["label"] for it in items)
    assert class_rows(result) == {name: counts[i] for i, name in enumerate(BRAIN)} == {"no": 78, "yes": 124}
    assert summary(result, "images") == f"{len(items)} listed, {len(items)} decoded"
    assert summary(result, "modes") == "RGB 172, L 26, RGBA 4"  # as the data set's README gives them
    assert "width 150…1920, height 168…1427 px" in summary(result, "sizes")
    groups = Counter(it["group"] for it in items)
    shared, largest = sum(n > 1 for n in groups.values()), max(groups.values())
    assert summary(result, "groups").startswith(
        f"{len(groups)} (MANIFEST.csv groups, split_mode group): {shared} hold 2+ images, largest {largest} ")
    assert summary(result, "exact copies").endswith("0 set(s) across classes, 0 across groups")


def test_real_covid_cxr_passes_with_the_bundles_own_counts() -> None:
    root = real_dataset("covid_cxr")
    result = medpipe_dataset_check(str(root), "--bundle", "covid_cxr_cls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert error_lines(result) == [] and summary(result, "result") == "ok"
    items = labels_csv_datalists(root, CXR, {c: c for c in CXR}, -1)["train"]
    counts = Counter(it["label"] for it in items)
    assert class_rows(result) == {name: counts[i] for i, name in enumerate(CXR)}
    assert class_rows(result) == {"covid19": 382, "pneumonia": 462, "normal": 431}  # the data set's README
    assert summary(result, "images") == "1275 listed, 1275 decoded" and summary(result, "modes") == "L 1275"
    groups = Counter(it["group"] for it in items)
    assert summary(result, "groups").startswith(f"{len(groups)} (labels.csv patient_id, split_mode group)")
    assert f"largest {max(groups.values())} " in summary(result, "groups") and len(groups) == 846
    assert summary(result, "sources") == "actualmed 35, figure1 30, ieee8023 411, nih_chestxray8 799"
    assert summary(result, "exact copies").startswith("0 set(s)")


# ------------------------------------------------------------------ small sets of real images, one fault each


@pytest.fixture
def brain_set(tmp_path: Path) -> Path:
    """3 real images per class, each of other bytes, in class folders (no MANIFEST.csv: one group per image)."""
    source, root, seen = real_dataset("brain_mri_yes_no"), tmp_path / "brain", set()
    for name in BRAIN:
        (root / name).mkdir(parents=True)
        picked = 0
        for path in sorted((source / name).glob("*.jpg")):
            if picked < 3 and path.read_bytes() not in seen:
                seen.add(path.read_bytes())
                shutil.copy(path, root / name / path.name.replace(" ", "_"))
                picked += 1
    return root


def _files(root: Path, name: str) -> list[Path]:
    return sorted((root / name).iterdir())


def _truncated(root: Path) -> tuple[Path, str]:
    bad = _files(root, "yes")[0]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    return root, f"yes/{bad.name}: cannot read image '{bad}': "


def _folder_not_a_class(root: Path) -> tuple[Path, str]:
    (root / "maybe").mkdir()
    shutil.copy(_files(root, "yes")[0], root / "maybe" / "m.jpg")
    return root, (f"'{root / 'maybe'}/': not a class ['no', 'yes']; rename the folder to its class or move it out of "
                  "the data set")  # fmt: skip


def _class_without_images(root: Path) -> tuple[Path, str]:
    for path in _files(root, "yes"):
        path.unlink()
    return root, f"class 'yes' (index 1) of brain_tumor_cls has no images; put its images in {root / 'yes'}/"


def _bytes_under_two_classes(root: Path) -> tuple[Path, str]:
    first = _files(root, "no")[0]
    shutil.copy(first, root / "yes" / "copy.jpg")
    return root, (f"same image bytes under 2 labels: no/{first.name} (no), yes/copy.jpg (yes); keep the copy with the "
                  "right label and delete the others")  # fmt: skip


def _bytes_in_two_groups(root: Path) -> tuple[Path, str]:
    first = _files(root, "no")[0]
    shutil.copy(first, root / "no" / "zz_copy.jpg")
    return root, (f"same image bytes in 2 groups ('no/{first.name}', 'no/zz_copy.jpg'): no/{first.name}, "
                  "no/zz_copy.jpg; a fold can train on one and validate on the other: give them one group in "
                  "MANIFEST.csv or delete all but one")  # fmt: skip


def _image_in_the_root(root: Path) -> tuple[Path, str]:
    shutil.copy(_files(root, "yes")[0], root / "stray.jpg")
    return root, (f"'{root}' holds 1 image(s) in no class folder (first: 'stray.jpg'); move each into its class "
                  "folder or out of the data set")  # fmt: skip


BRAIN_FAULTS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "undecodable-image": _truncated, "folder-not-a-class": _folder_not_a_class,
    "class-without-images": _class_without_images, "same-bytes-two-classes": _bytes_under_two_classes,
    "same-bytes-two-groups": _bytes_in_two_groups, "image-in-the-root": _image_in_the_root,
}  # fmt: skip


def test_the_small_brain_set_passes(brain_set: Path) -> None:
    result = in_process_check(str(brain_set), "--bundle", "brain_tumor_cls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert class_rows(result) == {"no": 3, "yes": 3} and summary(result, "result") == "ok"
    assert summary(result, "groups").startswith("6 (no MANIFEST.csv: one per image, split_mode group)")


@pytest.mark.parametrize("fault", list(BRAIN_FAULTS))
def test_each_class_folder_fault_is_one_line(fault: str, brain_set: Path) -> None:
    root, expected = BRAIN_FAULTS[fault](brain_set)
    result = in_process_check(str(root), "--bundle", "brain_tumor_cls")
    assert result.returncode != 0
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stdout
    assert summary(result, "result") == "1 problem(s)"
    assert result.stderr.strip().splitlines()[-1] == f"medpipe error: {root}: 1 problem(s), each an 'error:' line above"


@pytest.fixture
def cxr_set(tmp_path: Path) -> Path:
    """2 real images per class with their labels.csv rows (image, label, patient_id, source)."""
    source, root = real_dataset("covid_cxr"), tmp_path / "cxr"
    (root / "images").mkdir(parents=True)
    with (source / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    picked = [row for label in CXR for row in [r for r in rows if r["label"] == label][:2]]
    for row in picked:
        shutil.copy(source / row["image"], root / row["image"])
    _write_csv(root, [[row[c] for c in CXR_COLUMNS] for row in picked])
    return root


def _write_csv(root: Path, rows: list[list[str]]) -> None:
    with (root / "labels.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([CXR_COLUMNS, *rows])


def _rows(root: Path) -> list[list[str]]:
    with (root / "labels.csv").open(newline="") as fh:
        return list(csv.reader(fh))[1:]


def _unknown_label(root: Path) -> tuple[Path, str]:
    rows = _rows(root)
    rows[0][1] = "tuberculosis"
    _write_csv(root, rows)
    return root, (f"{root / 'labels.csv'} row 2: unknown label 'tuberculosis' (expected one of ['covid19', 'normal', "
                  "'pneumonia'])")  # fmt: skip


def _missing_file(root: Path) -> tuple[Path, str]:
    _write_csv(root, [*_rows(root), ["images/gone.jpg", "normal", "p:gone", "nih_chestxray8"]])
    return root, (f"{root / 'labels.csv'} row 8: image 'images/gone.jpg' not found in '{root}'; fix the path or "
                  "delete the row")  # fmt: skip


def _row_twice(root: Path) -> tuple[Path, str]:
    rows = _rows(root)
    _write_csv(root, [*rows, rows[2]])
    return root, f"{root / 'labels.csv'} row 8: image '{rows[2][0]}' is listed twice (first on row 4); keep one row"


def _csv_bytes_under_two_classes(root: Path) -> tuple[Path, str]:
    rows = _rows(root)
    shutil.copy(root / rows[0][0], root / "images" / "copy.jpg")
    _write_csv(root, [*rows, ["images/copy.jpg", "normal", rows[0][2], rows[0][3]]])
    return root, (f"same image bytes under 2 labels: {rows[0][0]} (covid19), images/copy.jpg (normal); keep the copy "
                  "with the right label and delete the others")  # fmt: skip


def _csv_class_without_images(root: Path) -> tuple[Path, str]:
    _write_csv(root, [row for row in _rows(root) if row[1] != "normal"])
    return root, "class 'normal' (index 2) of covid_cxr_cls has no images; add rows labelled 'normal' to labels.csv"


def _path_outside_the_folder(root: Path) -> tuple[Path, str]:
    rows = _rows(root)
    shutil.copy(root / rows[0][0], root.parent / "outside.jpg")  # a real image, but beside the data set folder
    _write_csv(root, [*rows, ["../outside.jpg", "normal", "p:outside", "nih_chestxray8"]])
    return root, (f"{root / 'labels.csv'} row 8: image '../outside.jpg' lies outside '{root}'; list images by their "
                  "path inside the data set folder (copy them into it)")  # fmt: skip


CSV_FAULTS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "label-not-a-class": _unknown_label, "missing-file": _missing_file, "row-listed-twice": _row_twice,
    "same-bytes-two-classes": _csv_bytes_under_two_classes, "class-without-images": _csv_class_without_images,
    "path-outside-the-folder": _path_outside_the_folder,
}  # fmt: skip


@pytest.mark.parametrize("fault", list(CSV_FAULTS))
def test_each_labels_csv_fault_is_one_line(fault: str, cxr_set: Path) -> None:
    clean = in_process_check(str(cxr_set), "--bundle", "covid_cxr_cls") if fault == "missing-file" else None
    if clean is not None:  # the clean set first, once
        assert clean.returncode == 0 and class_rows(clean) == {c: 2 for c in CXR}, clean.stdout + clean.stderr
    root, expected = CSV_FAULTS[fault](cxr_set)
    result = in_process_check(str(root), "--bundle", "covid_cxr_cls")
    assert result.returncode != 0
    assert error_lines(result) == [f"error: {expected}"], result.stdout
    assert summary(result, "result") == "1 problem(s)"


def test_every_problem_is_reported_at_once_and_the_rest_is_summarised(cxr_set: Path) -> None:
    rows = _rows(cxr_set)
    rows[0][1] = "tuberculosis"
    _write_csv(cxr_set, [*rows, rows[3], ["images/gone.jpg", "normal", "p:gone", "nih_chestxray8"]])
    result = in_process_check(str(cxr_set), "--bundle", "covid_cxr_cls")
    assert result.returncode != 0
    assert [line.split(": ", 2)[2].split(" ")[0] for line in error_lines(result)] == ["unknown", "image", "image"]
    assert [line.split(": ", 2)[1].split(" row ")[1] for line in error_lines(result)] == ["2", "8", "9"]
    assert class_rows(result) == {"covid19": 1, "pneumonia": 2, "normal": 2}  # the rows the bundle could read
    assert summary(result, "result") == "3 problem(s)"


def test_a_dicom_listed_in_labels_csv_is_read_as_the_bundle_reads_it(cxr_set: Path) -> None:
    """read_labels_csv and load_grey_2d take 2-D DICOM, so the check counts it (pixels of a real radiograph)."""
    import pydicom
    from PIL import Image
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    rows = _rows(cxr_set)
    pixels = np.asarray(Image.open(cxr_set / rows[0][0]).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, generate_uid(), "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(cxr_set / "images" / "radiograph.dcm", enforce_file_format=True)
    _write_csv(cxr_set, [*rows, ["images/radiograph.dcm", "covid19", "p:dicom", "dicom"]])
    result = in_process_check(str(cxr_set), "--bundle", "covid_cxr_cls")
    assert result.returncode == 0, result.stdout + result.stderr
    assert class_rows(result) == {"covid19": 3, "pneumonia": 2, "normal": 2}
    assert summary(result, "modes") == "L 6, DICOM MONOCHROME2 8-bit 1"
    assert f"{pixels.shape[1]}x{pixels.shape[0]}" in summary(result, "sizes")


def test_segmentation_options_with_a_classification_bundle_are_one_line(brain_set: Path) -> None:
    result = medpipe_dataset_check(str(brain_set), "--bundle", "brain_tumor_cls", "--layout", "nnunet")
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (
        "medpipe error: --layout: segmentation only; brain_tumor_cls reads class folders with its own classes "
        "(docs/datasets.md)")


def test_the_bundles_readers_still_stop_at_the_first_problem(brain_set: Path, cxr_set: Path) -> None:
    """The check makes the readers note problems; training still gets the one-line refusal it always got."""
    (brain_set / "maybe").mkdir()
    with pytest.raises(MedpipeError, match=r"has folders \['maybe'\] that are not classes"):
        scan_class_folders(brain_set, BRAIN)
    (brain_set / "maybe").rmdir()
    for path in _files(brain_set, "yes"):
        path.unlink()
    with pytest.raises(MedpipeError, match=r"class folder '.*yes' is empty"):
        scan_class_folders(brain_set, BRAIN)
    _row_twice(cxr_set)
    with pytest.raises(MedpipeError, match=r"row 8: image '.*' is listed twice \(first on row 4\); keep one row"):
        read_labels_csv(cxr_set, CXR)


def test_manifest_rows_the_bundle_would_refuse_are_one_line_each(brain_set: Path) -> None:
    from medpipe.data.classification_check import check_classification_dataset

    no = _files(brain_set, "no")
    (brain_set / "MANIFEST.csv").write_text(f"path,label,near_duplicate_group\nno/{no[0].name},yes,\nno/gone.jpg,no,\n")
    bundle = classification_bundle(REPO / "bundles" / "brain_tumor_cls")
    assert bundle is not None
    manifest = brain_set / "MANIFEST.csv"
    assert check_classification_dataset(brain_set, bundle).problems == [
        f"{manifest} row 3: 'no/gone.jpg' does not exist; fix the path or delete the row",
        f"{manifest} row 2: 'no/{no[0].name}' is labelled 'yes', which contradicts its class folder; move the file or "
        "fix the label",
    ]


# ------------------------------------------------------------------------------- the check before every training


def _training_refusal(bundle: str, root: Path, tmp_path: Path) -> str:
    """The one line a training of `bundle` on `root` is refused with; nothing is written."""
    from medpipe.bundle.config import run_bundle
    from medpipe.errors import find_medpipe_error

    models = tmp_path / "models"
    with pytest.raises(Exception) as info:
        run_bundle(REPO / "bundles" / bundle, "train", dataset_dir=str(root), ckpt_dir=str(models),
                   output_dir=str(models), epochs=1, num_folds=2, fold=0)  # fmt: skip
    error = find_medpipe_error(info.value)
    assert error is not None, info.value
    assert "\n" not in str(error) and not models.exists()
    return str(error)


def test_training_runs_the_check_first_and_refuses_in_one_line(brain_set: Path, cxr_set: Path, tmp_path: Path) -> None:
    """Both classification bundles check their data set before training (train.json `initialize`): an image that
    training would only meet mid-epoch, and copies under two labels that it would learn from, stop it at the start."""
    root, expected = _truncated(brain_set)
    message = _training_refusal("brain_tumor_cls", root, tmp_path / "brain")
    assert message.startswith(f"{root}: the data set check found 1 problem(s), first: {expected}"), message
    assert message.endswith(f"; `medpipe dataset check {root} --bundle brain_tumor_cls` lists them all")
    root, expected = _csv_bytes_under_two_classes(cxr_set)
    message = _training_refusal("covid_cxr_cls", root, tmp_path / "cxr")
    assert message == (f"{root}: the data set check found 1 problem(s), first: {expected}; `medpipe dataset check "
                       f"{root} --bundle covid_cxr_cls` lists them all")  # fmt: skip


def test_decoded_images_are_remembered_by_their_content(
    brain_set: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every training runs the check, so an image's decoding is kept by its sha256: a second check decodes nothing
    and summarises the same; a changed file is decoded again (and here refused)."""
    import medpipe.data.classification_check as check

    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    bundle = classification_bundle(REPO / "bundles" / "brain_tumor_cls")
    assert bundle is not None
    first = check.check_classification_dataset(brain_set, bundle)
    assert first.ok and first.decoded == 6 and (tmp_path / "cache" / "decoded_images.json").is_file()
    decoded: list[str] = []
    real_loader = check.load_grey_2d
    monkeypatch.setattr(check, "load_grey_2d", lambda path: decoded.append(Path(path).name) or real_loader(path))
    again = check.check_classification_dataset(brain_set, bundle)
    assert decoded == [] and again.ok and (again.sizes, again.modes, again.decoded) == (first.sizes, first.modes, 6)
    _, expected = _truncated(brain_set)
    third = check.check_classification_dataset(brain_set, bundle)
    assert decoded == [_files(brain_set, "yes")[0].name] and len(third.problems) == 1
    assert third.problems[0].startswith(expected)
