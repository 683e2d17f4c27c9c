"""A classification data set checked exactly as its bundle reads it (`medpipe dataset check PATH --bundle NAME`).

The classification bundles read one of two layouts, named by the reader their train.json's `datalists` calls: class
folders (`class_folder_datalists`: `<root>/<class>/<image>`, groups from an optional MANIFEST.csv; brain_tumor_cls) or
a labels CSV (`labels_csv_datalists`: `<root>/labels.csv` with image, label, patient_id; covid_cxr_cls). The check
runs that same reader (medpipe.data.datalists), noting each of its refusals as a problem instead of stopping at the
first, then decodes every image with the bundles' own loader (`load_grey_2d`) and hashes its bytes, so that it finds
what training would trip over or leak: unreadable files, classes without images, copies under two classes or in two
groups. Each problem is one line naming the file or row and what to do; the summary says what the set holds.
"""

from __future__ import annotations

import inspect
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from medpipe.data.datalists import check_refusal, labels_csv_datalists, read_labels_csv, scan_class_folders
from medpipe.errors import MedpipeError
from medpipe.files import read_cache, sha256_file, write_cache
from medpipe.io.images import DICOM_SUFFIXES, NIFTI_SUFFIXES, image_suffix, load_grey_2d

CLASS_FOLDERS = "class folders"
LABELS_CSV = "labels CSV"
# the reader a bundle's `datalists` expression calls decides the layout it reads
READERS = {"class_folder_datalists": CLASS_FOLDERS, "labels_csv_datalists": LABELS_CSV}
MOST_COMMON_SIZES = 3
# what decoding found for each image content (sha256 -> [width, height, pixel format]), kept between jobs: every
# training runs this check, and decoding the 1,275 CXR images each time would cost more than hashing them
DECODED_CACHE, DECODED_CACHE_VERSION = "decoded_images.json", 2


@dataclass
class ClassificationBundle:
    """What a classification bundle's train.json says about the data it reads."""

    name: str
    reader: str  # the medpipe.data.datalists function its `datalists` calls
    class_names: list[str]
    label_map: dict[str, str] | None  # CSV label -> class name (covid_cxr_cls); None: labels are the class names
    split_mode: str  # "group": folds keep each group on one side
    csv_name: str = "labels.csv"

    @property
    def layout(self) -> str:
        return READERS[self.reader]


@dataclass
class ClassificationReport:
    """What `check_classification_dataset` found: the problems (each one line) and what the data set holds."""

    root: Path
    bundle: ClassificationBundle
    items: list[dict[str, Any]] = field(default_factory=list)  # what the bundle's reader returns
    problems: list[str] = field(default_factory=list)
    decoded: int = 0
    sizes: Counter = field(default_factory=Counter)  # "WxH" as the bundle sees the image -> images
    modes: Counter = field(default_factory=Counter)  # PIL mode, or the DICOM / NIfTI pixel format -> images
    copies: list[list[dict[str, Any]]] = field(default_factory=list)  # sets of 2+ items with the same sha256
    groups: Counter = field(default_factory=Counter)  # the group folds split by -> images

    @property
    def ok(self) -> bool:
        return not self.problems

    def class_counts(self) -> list[int]:
        """Images per class, in the bundle's class order."""
        counts = Counter(it["label"] for it in self.items)
        return [counts[i] for i in range(len(self.bundle.class_names))]


# ------------------------------------------------------------------------------------------------------ the bundle


def classification_bundle(bundle_dir: str | Path) -> ClassificationBundle | None:
    """The layout, classes and label map a bundle's train.json reads with; None for a bundle whose `datalists`
    calls neither classification reader (a segmentation bundle, checked by medpipe.data.integrity)."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    train = bundle_dir / "configs" / "train.json"
    try:
        datalists = str(json.loads(train.read_text()).get("datalists", ""))
    except (OSError, ValueError, AttributeError) as exc:
        raise MedpipeError(f"{train}: not a readable JSON object ({exc})") from None
    readers = [name for name in READERS if f".{name}(" in datalists]
    if len(readers) != 1:
        return None
    parser = ConfigParser()
    parser.read_config(str(train))
    try:  # resolved as the running bundle resolves them (covid_cxr_cls picks both from its `tasks` by `task`)
        class_names = parser.get_parsed_content("class_names")
        label_map = parser.get_parsed_content("label_map") if "label_map" in parser.config else None
        split_mode = parser.get_parsed_content("split_mode") if "split_mode" in parser.config else "group"
    except Exception as exc:  # MONAI wraps errors of the expressions in its own
        raise MedpipeError(f"{train}: class_names / label_map cannot be resolved ({exc})") from None
    if not isinstance(class_names, list) or not all(isinstance(n, str) for n in class_names):
        raise MedpipeError(f"{train}: class_names is not a list of names ({class_names!r})")
    # train.json names no CSV, so the bundle reads the reader's default file
    csv_name = inspect.signature(labels_csv_datalists).parameters["csv_name"].default
    return ClassificationBundle(bundle_dir.name, readers[0], list(class_names), label_map or None, str(split_mode),
                                csv_name)  # fmt: skip


# ------------------------------------------------------------------------------------------------------- the check


def check_classification_dataset(root: str | Path, bundle: ClassificationBundle) -> ClassificationReport:
    """Check the data set in folder `root` as `bundle` reads it.

    Raises MedpipeError only when the folder cannot be checked at all (no folder; no labels CSV, or one without
    its columns); every problem of the data itself is a line of `ClassificationReport.problems`."""
    root = Path(root)
    if not root.is_dir():
        raise MedpipeError(f"{root}: no such folder (give the data set's folder)")
    if bundle.layout == LABELS_CSV and not (root / bundle.csv_name).is_file():  # not this layout: nothing to check
        raise MedpipeError(f"{root}: no {bundle.csv_name}; {bundle.name} reads a labels CSV (columns image, label, "
                           "patient_id) beside its images (docs/datasets.md)")  # fmt: skip
    report = ClassificationReport(root, bundle)
    if bundle.layout == CLASS_FOLDERS:
        report.items = scan_class_folders(root, bundle.class_names, bundle.split_mode, report.problems)
    else:
        report.items = read_labels_csv(root, bundle.class_names, bundle.label_map, bundle.csv_name, report.problems)
    _check_classes(report)
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    decoded = {k: v for k, v in read_cache(DECODED_CACHE, DECODED_CACHE_VERSION).items()
               if isinstance(v, list) and len(v) == 3}  # fmt: skip
    known = len(decoded)
    for item in report.items:
        sha = sha256_file(item["image"])
        _decode(item, report, sha, decoded)
        by_sha[sha].append(item)
    if len(decoded) > known:
        write_cache(DECODED_CACHE, DECODED_CACHE_VERSION, decoded)
    report.copies = [copies for copies in by_sha.values() if len(copies) > 1]
    _check_copies(report)
    report.groups = Counter(it["group"] for it in report.items)
    return report


def _check_classes(report: ClassificationReport) -> None:
    """Every class of the bundle needs images: a class without any cannot be learnt, and the bundle's stratified
    folds and class weights refuse it only later, mid-job."""
    bundle = report.bundle
    for index, (name, count) in enumerate(zip(bundle.class_names, report.class_counts(), strict=True)):
        if count:
            continue
        if bundle.layout == CLASS_FOLDERS:
            todo = f"put its images in {report.root / name}/"
        else:
            labels = [k for k, v in (bundle.label_map or {name: name}).items() if v == name]
            todo = f"add rows labelled {' or '.join(repr(label) for label in labels)} to {bundle.csv_name}"
        report.problems.append(f"class '{name}' (index {index}) of {bundle.name} has no images; {todo}")


def _decode(item: dict[str, Any], report: ClassificationReport, sha: str, decoded: dict[str, list]) -> None:
    """Read the image as training will (the bundles' loader), so a file that would stop a run is named now; a
    content decoded before (`decoded`, by sha256) is not decoded again, a new one is added to it."""
    if sha not in decoded:
        try:
            rows, cols = load_grey_2d(item["image"]).shape
        except MedpipeError as exc:
            report.problems.append(f"{item['path']}: {exc} (training would stop on it: replace or remove the file)")
            return
        decoded[sha] = [int(cols), int(rows), _pixel_format(Path(item["image"]))]
    cols, rows, mode = decoded[sha]
    report.decoded += 1
    report.sizes[f"{cols}x{rows}"] += 1
    report.modes[mode] += 1


def require_clean_dataset(
    dataset_dir: str | Path, bundle_root: str | Path, class_names: Any, label_map: Any = None,
    split_mode: str = "group",
) -> str:
    """The check every training of a classification bundle runs first (the first step of its train.json
    `training`), with the job's own classes, label map and split mode: refused in one line naming the first problem
    and how many there are, before anything trains; else a one-line summary."""
    layout = classification_bundle(bundle_root)
    if layout is None:
        raise MedpipeError(f"{bundle_root}: its train.json reads no classification layout; nothing to check")
    bundle = replace(layout, class_names=[str(n) for n in class_names], split_mode=str(split_mode),
                     label_map=dict(label_map) if label_map else None)  # fmt: skip
    report = check_classification_dataset(dataset_dir, bundle)
    if report.problems:
        raise check_refusal(report.root, report.problems, bundle.name)
    return f"{report.root}: {len(report.items)} images checked, ok"


def _pixel_format(path: Path) -> str:
    """PIL's mode of a picture, or what a DICOM / NIfTI file stores (read from its header)."""
    suffix = image_suffix(path)
    if suffix in DICOM_SUFFIXES:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return f"DICOM {ds.get('PhotometricInterpretation', '?')} {ds.get('BitsStored', '?')}-bit"
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        return f"NIfTI {nib.load(str(path)).get_data_dtype()}"
    from PIL import Image

    with Image.open(path) as img:
        return img.mode


def _check_copies(report: ClassificationReport) -> None:
    """Exact copies (same sha256) under two labels contradict each other; copies in two groups can land in
    training and validation of one fold, which scores memory instead of generalisation."""
    bundle = report.bundle
    for copies in report.copies:
        labels = {it.get("finding", bundle.class_names[it["label"]]) for it in copies}
        listed = ", ".join(f"{it['path']} ({it.get('finding', bundle.class_names[it['label']])})" for it in copies)
        if len(labels) > 1:
            report.problems.append(f"same image bytes under {len(labels)} labels: {listed}; keep the copy with the "
                                   "right label and delete the others")  # fmt: skip
        elif bundle.split_mode == "group" and len({it["group"] for it in copies}) > 1:
            groups = sorted({repr(it["group"]) for it in copies})
            report.problems.append(f"same image bytes in {len(groups)} groups ({', '.join(groups)}): "
                                   f"{', '.join(it['path'] for it in copies)}; a fold can train on one and validate "
                                   f"on the other: give them one {_group_source(report)} or delete all but one")


def _group_source(report: ClassificationReport) -> str:
    if report.bundle.layout == LABELS_CSV:
        return f"patient_id in {report.bundle.csv_name}"
    return "group in MANIFEST.csv"


# ----------------------------------------------------------------------------------------------------- the summary


def format_classification_report(report: ClassificationReport) -> str:
    """The problems (one line each) and the summary table."""
    bundle = report.bundle
    lines = [f"error: {p}" for p in report.problems]
    lines += [
        f"data set      {report.root} ({bundle.layout}, read by {bundle.reader} as {bundle.name} reads it)",
        f"images        {len(report.items)} listed, {report.decoded} decoded",
        "classes       index  name                  images" + ("  labels" if bundle.label_map else ""),
    ]
    for index, (name, count) in enumerate(zip(bundle.class_names, report.class_counts(), strict=True)):
        mapped = [k for k, v in (bundle.label_map or {}).items() if v == name]
        lines.append(f"              {index:>5}  {name:<20}  {count:>6}" + (f"  {', '.join(mapped)}" if mapped else ""))
    if report.sizes:
        widths = [int(s.split("x")[0]) for s in report.sizes]
        heights = [int(s.split("x")[1]) for s in report.sizes]
        common = ", ".join(f"{size} ({n})" for size, n in report.sizes.most_common(MOST_COMMON_SIZES))
        lines.append(f"sizes         {len(report.sizes)} distinct, most common {common}; "
                     f"width {min(widths)}…{max(widths)}, height {min(heights)}…{max(heights)} px")  # fmt: skip
        lines.append(f"modes         {', '.join(f'{mode} {n}' for mode, n in report.modes.most_common())}")
    files = sum(len(c) for c in report.copies)
    redundant = files - len(report.copies)
    across_labels = sum(len({it["label"] for it in c}) > 1 for c in report.copies)
    across_groups = sum(len({it["group"] for it in c}) > 1 for c in report.copies)
    lines.append(f"exact copies  {len(report.copies)} set(s) of identical bytes, {files} files ({redundant} "
                 f"redundant); {across_labels} set(s) across classes, {across_groups} across groups")  # fmt: skip
    if report.groups:
        largest, size = min(report.groups.items(), key=lambda kv: (-kv[1], kv[0]))
        shared = sum(n > 1 for n in report.groups.values())
        lines.append(f"groups        {len(report.groups)} ({_groups_from(report)}, split_mode {bundle.split_mode}): "
                     f"{shared} hold 2+ images, largest {size} ({largest})")  # fmt: skip
    sources = Counter(it["source"] for it in report.items if "source" in it)
    if sources:
        lines.append(f"sources       {', '.join(f'{s} {n}' for s, n in sorted(sources.items()))}")
    lines.append(f"result        {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return "\n".join(lines)


def _groups_from(report: ClassificationReport) -> str:
    """Where the groups came from, as the reader takes them."""
    if report.bundle.layout == LABELS_CSV:
        return f"{report.bundle.csv_name} patient_id"
    if (report.root / "MANIFEST.csv").is_file():
        return "MANIFEST.csv groups"
    return "no MANIFEST.csv: one per image"
