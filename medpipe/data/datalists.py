"""Find data sets and turn them into MONAI datalists with leakage-safe, group-aware folds.

A classification folder looks like `<root>/<class_name>/<image>` with an optional `<root>/MANIFEST.csv` whose
`near_duplicate_group` (or `group`) column ties copies of one image (or one patient) together, so that no group
ever lands on both sides of a split."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.duplicates import find_copies
from medpipe.data.splits import _shuffled_by, apply_splits, check_fold, fold_indices, split_items
from medpipe.errors import MedpipeError
from medpipe.io.images import IMAGE_SUFFIXES, is_image_file
from medpipe.values import path_list

logger = logging.getLogger(__name__)
GROUP_COLUMNS = ("near_duplicate_group", "group", "patient_id", "volume_group")
LABELS_CSV_COLUMNS = ("image", "label", "patient_id")


def data_root() -> Path:
    """The folder holding the data sets: `$MEDPIPE_DATA`."""
    root = os.environ.get("MEDPIPE_DATA")
    if not root:
        raise MedpipeError("MEDPIPE_DATA is not set: export MEDPIPE_DATA=/path/to/data or pass --dataset_dir")
    return Path(root)


def dataset_dir(name: str) -> str:
    """`$MEDPIPE_DATA/<name>`; the bundle configs' default `dataset_dir`."""
    return str(data_root() / name)


def files_under(folder: str | Path) -> list[Path]:
    """Every file under `folder` (names starting with '.' left out), sorted, symlinked sub-folders followed as a
    user expects (`Path.rglob` skips them without a word). A folder reached a second time, through a link cycle or
    a second link to it, is read once and the skipped link logged: its images must not count twice."""
    folder = Path(folder)
    seen, found = {os.path.realpath(folder)}, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, name))
            if real in seen:
                logger.warning(f"skipped '{os.path.join(dirpath, name)}': it leads to '{real}', which is read once")
                continue
            seen.add(real)
            kept.append(name)
        dirnames[:] = kept
        found += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return sorted(p for p in found if p.is_file())


def check_refusal(root: str | Path, problems: Sequence[str], bundle: str) -> MedpipeError:
    """The one line a job is refused with when the data set check of `root` found `problems` (the first, the count,
    and the command that lists them all); the same for every layout's check."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return MedpipeError(f"{root}: the data set check found {len(problems)} problem(s), first: {problems[0]}{more}; "
                        f"`medpipe dataset check {root} --bundle {bundle}` lists them all")


def _refuse(message: str, problems: list[str] | None) -> None:
    """Stop with `message` in one line, or, for a check that reports every problem at once (`problems` given:
    medpipe.data.classification_check), note it and let the reader go on."""
    if problems is None:
        raise MedpipeError(message)
    problems.append(message)


def _read_manifest_groups(
    root: Path, class_names: Sequence[str], split_mode: str = "group", problems: list[str] | None = None
) -> dict[str, str]:
    """Map relative path -> group id ('' = its own group) of every row of `<root>/MANIFEST.csv`; {} without one.

    A manifest that cannot group (no `path` column; no group column while split_mode is 'group'), is not UTF-8,
    names files that do not exist, or gives a class label that contradicts the file's class folder is refused in
    one line: ignoring it would silently turn a group split into a random one. With `problems`, each is noted
    there instead (the rows one line each) and what can still be read is returned."""
    manifest = root / "MANIFEST.csv"
    if not manifest.is_file():
        return {}
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        _refuse(f"'{manifest}' is not UTF-8 text (byte {exc.start}): save it as UTF-8 CSV", problems)
        return {}
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, fields = list(reader), reader.fieldnames or []
    if "path" not in fields:
        _refuse(f"'{manifest}' has no 'path' column (columns {fields}): rows cannot be matched to images", problems)
        return {}
    column = next((c for c in GROUP_COLUMNS if c in fields), None)
    if column is None and split_mode == "group":
        _refuse(f"'{manifest}' has no group column (one of {list(GROUP_COLUMNS)}): split_mode group would not keep "
                "copies together; add the column or use --split_mode random", problems)  # fmt: skip
    numbered = list(enumerate(rows, start=2))  # row 1 is the header, as a spreadsheet numbers it
    missing = [(n, row["path"]) for n, row in numbered if not (root / (row["path"] or "").strip()).is_file()]
    if missing and problems is None:
        raise MedpipeError(f"'{manifest}' names {len(missing)} file(s) that do not exist (first: '{missing[0][1]}')")
    for n, path in missing:
        _refuse(f"{manifest} row {n}: '{path}' does not exist; fix the path or delete the row", problems)
    if "label" in fields:  # only labels written as class names can be compared with the class folder
        wrong = [(n, row) for n, row in numbered if (row["label"] or "").strip() in class_names
                 and Path(row["path"].strip()).parts[0] != row["label"].strip()]  # fmt: skip
        if wrong and problems is None:
            first = wrong[0][1]
            raise MedpipeError(f"'{manifest}' gives {len(wrong)} file(s) a label that contradicts their class folder "
                               f"(first: '{first['path']}' labelled '{first['label']}')")  # fmt: skip
        for n, row in wrong:
            _refuse(f"{manifest} row {n}: '{row['path']}' is labelled '{row['label']}', which contradicts its class "
                    "folder; move the file or fix the label", problems)  # fmt: skip
    if column is None:  # split_mode random: the manifest has nothing to say about groups
        return {}
    return {row["path"].strip(): (row.get(column) or "").strip() for row in rows}


def scan_class_folders(
    root: str | Path, class_names: Sequence[str], split_mode: str = "group", problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """List every image under `<root>/<class>/` as {image, label, path, group}; refuse anything ambiguous.

    Images that a grouping MANIFEST.csv does not list get their own group, with a warning giving their count.
    With `problems` (a data set check), each refusal is noted there, one line per folder, file or manifest row, and
    the images that can be read are returned; a class without images is then left to the caller to report."""
    root = Path(root)
    if not root.is_dir():
        raise MedpipeError(f"dataset folder '{root}' does not exist; set --dataset_dir or MEDPIPE_DATA")
    subdirs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    unknown = sorted(name for name in subdirs if name not in class_names)
    if unknown and problems is None:
        raise MedpipeError(f"'{root}' has folders {unknown} that are not classes {list(class_names)}")
    for name in unknown:
        _refuse(f"'{root / name}/': not a class {list(class_names)}; rename the folder to its class or move it out "
                "of the data set", problems)  # fmt: skip
    missing = [c for c in class_names if not (root / c).is_dir()]
    if missing and problems is None:
        raise MedpipeError(
            f"'{root}' has no folder for class(es) {missing}: every class {list(class_names)} needs images"
        )
    loose = sorted(p.name for p in root.iterdir() if p.is_file() and is_image_file(p))
    if loose:  # an image beside the class folders has no class: it would not be used, without a word
        _refuse(f"'{root}' holds {len(loose)} image(s) in no class folder (first: '{loose[0]}'); move each into its "
                "class folder or out of the data set", problems)  # fmt: skip
    groups = _read_manifest_groups(root, class_names, split_mode, problems)
    items: list[dict[str, Any]] = []
    for label, class_name in enumerate(class_names):
        files = files_under(root / class_name) if class_name not in missing else []
        if not files and problems is None:
            raise MedpipeError(f"class folder '{root / class_name}' is empty")
        for path in files:
            if not is_image_file(path):
                _refuse(f"'{path}' is not an image file; remove it from the class folder", problems)
                continue
            rel = path.relative_to(root).as_posix()
            items.append({"image": str(path), "label": label, "path": rel, "group": groups.get(rel) or rel})
    unlisted = [it["path"] for it in items if it["path"] not in groups]
    if groups and unlisted:
        logger.warning(f"{len(unlisted)} image(s) under '{root}' are not in MANIFEST.csv (first: '{unlisted[0]}'); "
                       "each is its own group")  # fmt: skip
    return items


def cap_items(items: list[dict[str, Any]], max_cases: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded, class-balanced subset of at most `max_cases` items (-1: all), for smoke tests and quick looks."""
    if max_cases < 0 or len(items) <= max_cases:
        return items
    by_label = _shuffled_by(items, "label", seed)
    per_class = max(1, max_cases // len(by_label))
    return [it for label in sorted(by_label) for it in by_label[label][:per_class]]


def class_folder_datalists(
    dataset_dir: str | Path, class_names: Sequence[str], fold: int, num_folds: int = 5, seed: int = 0,
    split_mode: str = "group", max_cases: int = -1, splits_file: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Scan a class-folder data set and split it: what the classification bundles' `datalists` id holds.

    `splits_file`: take fold `fold`'s lists from a splits.json (medpipe.data.splits) instead of computing them."""
    items = cap_items(scan_class_folders(dataset_dir, class_names, split_mode), max_cases, seed)
    return split_items(items, fold, num_folds, seed, split_mode, splits_file)


def inference_items(inputs: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """Images to predict: a folder (searched recursively), one file, or a list of files.

    Files in a folder that are not supported images are skipped with a warning that gives their count."""
    paths: list[Path] = []
    for entry in map(Path, path_list(inputs)):  # a folder named 123 reaches here as the number 123
        if entry.is_dir():
            files = files_under(entry)
            skipped = [p for p in files if not is_image_file(p)]
            if skipped:
                logger.warning(f"skipped {len(skipped)} file(s) in '{entry}' that are not supported images "
                               f"(first: '{skipped[0].name}'; supported: {sorted(IMAGE_SUFFIXES)})")  # fmt: skip
            paths += [p for p in files if is_image_file(p)]
        elif entry.is_file():
            if not is_image_file(entry):
                raise MedpipeError(f"'{entry}' is not a supported image file")
            paths.append(entry)
        else:
            raise MedpipeError(f"input '{entry}' does not exist")
    if not paths:
        raise MedpipeError(f"no images found in {inputs}")
    return [{"image": str(p), "path": str(p)} for p in paths]


def read_labels_csv(
    dataset_dir: str | Path, class_names: Sequence[str], label_map: dict[str, str] | None = None,
    csv_name: str = "labels.csv", problems: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Items {image, label, path, group, source, finding} from `<dataset_dir>/<csv_name>`, every row checked.

    `label_map` maps the CSV's label to a class name (e.g. pneumonia -> non_covid for a 2-class task); the CSV
    label is kept as `finding` and the `source` column (if any) as `source`, for per-source reports.
    A missing image, an unknown label, an empty patient_id or an image listed twice stops with one line; with
    `problems` (a data set check) each such row is noted there and left out, and the other rows are returned.
    """
    root = Path(dataset_dir)
    csv_path = root / csv_name
    if not csv_path.is_file():
        raise MedpipeError(f"'{csv_path}' not found; set --dataset_dir to a folder holding {csv_name} and images")
    label_map = dict(label_map) if label_map else {c: c for c in class_names}
    bad_targets = sorted(set(label_map.values()) - set(class_names))
    if bad_targets:
        raise MedpipeError(f"label_map targets {bad_targets} are not classes {list(class_names)}")
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would hide the first column's name
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MedpipeError(f"'{csv_path}' is not UTF-8 text (byte {exc.start}): save it as UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing_cols = [c for c in LABELS_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing_cols:
        raise MedpipeError(f"'{csv_path}' lacks column(s) {missing_cols}; it needs {list(LABELS_CSV_COLUMNS)}")
    rows = list(reader)
    items: list[dict[str, Any]] = []
    first_row: dict[str, int] = {}
    for row_no, row in enumerate(rows, start=2):  # row 1 is the header, as a spreadsheet numbers it
        where = f"{csv_path} row {row_no}"
        name, finding, group = (row.get(k, "").strip() for k in ("image", "label", "patient_id"))
        path = root / name
        if name in first_row:
            refusal = f"image '{name}' is listed twice (first on row {first_row[name]}); keep one row"
        elif finding not in label_map:
            refusal = f"unknown label '{finding}' (expected one of {sorted(label_map)})"
        elif not group:
            refusal = "empty patient_id; every image needs its patient so splits cannot leak"
        elif name and not path.resolve().is_relative_to(root.resolve()):
            refusal = (f"image '{name}' lies outside '{root}'; list images by their path inside the data set folder "
                       "(copy them into it)")
        elif not name or not path.is_file():
            refusal = f"image '{name}' not found in '{root}'; fix the path or delete the row"
        elif not is_image_file(path):
            refusal = f"'{name}' is not a supported image file"
        else:
            refusal = ""
        first_row.setdefault(name, row_no)
        if refusal:
            _refuse(f"{where}: {refusal}", problems)
            continue
        items.append({
            "image": str(path), "label": list(class_names).index(label_map[finding]), "path": name, "group": group,
            "source": row.get("source", "").strip() or "unknown", "finding": finding,
        })  # fmt: skip
    if not rows:
        _refuse(f"'{csv_path}' has no rows", problems)
    return items


def labels_csv_datalists(
    dataset_dir: str | Path, class_names: Sequence[str], label_map: dict[str, str] | None, fold: int,
    num_folds: int = 5, seed: int = 0, split_mode: str = "group", max_cases: int = -1, csv_name: str = "labels.csv",
    splits_file: str | None = None, held_out_source: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Read a labels.csv data set and split it by patient, stratified by class: a CSV twin of class_folder_datalists.

    `splits_file`: take fold `fold`'s lists from a splits.json (medpipe.data.splits) instead of computing them.
    `held_out_source`: leave that source out instead of folds (held_out_source_split)."""
    items = cap_items(read_labels_csv(dataset_dir, class_names, label_map, csv_name), max_cases, seed)
    if held_out_source:
        if splits_file:
            raise MedpipeError("--held_out_source and --splits_file both choose the validation part; give one")
        return held_out_source_split(items, held_out_source, class_names)
    return split_items(items, fold, num_folds, seed, split_mode, splits_file)


def held_out_source_split(
    items: Sequence[dict[str, Any]], source: str, class_names: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Leave-one-source-out: train on every other source, validate on `source` (a cross-site estimate).

    Refused in one line when the source is unknown or when leaving it out removes a class from training: a model
    that never saw a class cannot be scored on it, and a silent 2-class model would be worse."""
    sources = sorted({str(it.get("source", "unknown")) for it in items})
    if source not in sources:
        raise MedpipeError(f"--held_out_source '{source}' is not a source of this data set; sources: {sources}")
    train = [it for it in items if it.get("source") != source]
    val = [it for it in items if it.get("source") == source]
    missing = [name for c, name in enumerate(class_names) if not any(it["label"] == c for it in train)]
    if missing:
        raise MedpipeError(
            f"holding out '{source}' leaves no training images of class {missing}; hold out another source"
        )
    return {"train": train, "val": val}


def class_weights(items: Sequence[dict[str, Any]], num_classes: int) -> list[float]:
    """Inverse-frequency weights N / (C * n_c) for a weighted cross-entropy (1.0 each when balanced)."""
    counts = np.bincount([it["label"] for it in items], minlength=num_classes).astype(float)
    if (counts == 0).any():
        raise MedpipeError(f"class counts {counts.astype(int).tolist()}: every class needs training images")
    return (counts.sum() / (num_classes * counts)).tolist()


def read_seg_datalist(
    dataset_dir: str | Path, section: str = "training", problems: list[str] | None = None
) -> list[dict[str, Any]]:
    """Items {image, label, path, group, …} of one section of `<dataset_dir>/datalist.json` (decathlon style).

    Paths are resolved against the folder; `volume_group` (else `patient_id`, else the image path) becomes `group`,
    so that folds never put slices of one volume on both sides. A missing file or key stops with one line; with
    `problems` (the data set check, medpipe.data.slices_check) each such entry is noted there and left out.
    """
    root = Path(dataset_dir)
    path = root / "datalist.json"
    if not path.is_file():
        raise MedpipeError(f"'{path}' not found; set --dataset_dir to a folder with datalist.json, images and labels")
    try:
        entries = json.loads(path.read_text()).get(section, [])
    except (json.JSONDecodeError, AttributeError) as exc:
        raise MedpipeError(f"'{path}' is not a JSON object with a '{section}' list: {exc}") from exc
    if not isinstance(entries, list):
        raise MedpipeError(f"'{path}': '{section}' must be a list of {{image, label}} entries")
    items: list[dict[str, Any]] = []
    for i, entry in enumerate(entries):
        where = f"{path} {section}[{i}]"
        if not isinstance(entry, dict) or "image" not in entry:
            _refuse(f"{where}: every entry needs an 'image' (and 'label' for training)", problems)
            continue
        item = {k: v for k, v in entry.items() if not isinstance(v, (dict, list))}
        missing = [f"{key} '{entry[key]}'" for key in ("image", "label") if key in entry
                   and not (root / str(entry[key])).is_file()]  # fmt: skip
        if missing:
            _refuse(f"{where}: {missing[0]} not found in '{root}'", problems)
            continue
        for key in ("image", "label"):
            if key in entry:
                item[key] = str(root / str(entry[key]))
        if section == "training" and "label" not in item:
            _refuse(f"{where}: training entries need a 'label'", problems)
            continue
        item["path"] = str(entry["image"])
        item["group"] = str(entry.get("volume_group") or entry.get("patient_id") or entry["image"])
        item.setdefault("volume_group", item["group"])
        items.append(item)
    return items


def cap_groups(items: list[dict[str, Any]], max_cases: int, seed: int = 0) -> list[dict[str, Any]]:
    """A seeded subset of at most `max_cases` items taken round-robin over groups, so every group keeps some."""
    if max_cases < 0 or len(items) <= max_cases:
        return items
    by_group = _shuffled_by(items, "group", seed)
    queues, picked = [by_group[g] for g in sorted(by_group)], []
    while len(picked) < max_cases:
        for queue in queues:
            if queue and len(picked) < max_cases:
                picked.append(queue.pop())
    return picked


def seg_datalists(
    dataset_dir: str | Path, fold: int, num_folds: int = 5, seed: int = 0, split_mode: str = "group",
    max_cases: int = -1, splits_file: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{'train', 'val', 'test'} for a segmentation datalist.json: folds grouped by volume, stratified by source.

    The stratum is the group name's prefix before the first '_' (coronacases / radiopaedia), so every fold sees
    both sources; 'test' is the file's `testing` section (empty when it has none). Fold -1: all data trains.
    `splits_file`: take fold `fold`'s lists from a splits.json (ids: the entries' `image` paths) instead.
    """
    fold, num_folds = check_fold(fold, num_folds)
    items = cap_groups(read_seg_datalist(dataset_dir, "training"), max_cases, seed)
    test = read_seg_datalist(dataset_dir, "testing")
    if not items and fold == -1 and test and not splits_file:
        return {"train": [], "val": [], "test": test}  # a folder to evaluate (its testing list), not to train on
    if not items:
        raise MedpipeError(f"'{Path(dataset_dir) / 'datalist.json'}' has an empty 'training' list")
    return {**split_seg_items(items, fold, num_folds, seed, split_mode, splits_file), "test": test}


def split_seg_items(
    items: list[dict[str, Any]], fold: int, num_folds: int, seed: int = 0, split_mode: str = "group",
    splits_file: str | None = None, stratify: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """{'train', 'val'} of segmentation slice items, whole volumes (`group`) on one side of every fold; the PNG
    slices and the slices of 3-D volume layouts (medpipe.data.layouts) are split by this one function.

    With `stratify`, the stratum is the group name's prefix before the first '_' (coronacases / radiopaedia), so
    every fold sees both sources. `splits_file`: the fold's lists from a splits.json (ids: the items' `path`)."""
    fold, num_folds = check_fold(fold, num_folds)
    if splits_file:
        return apply_splits(items, splits_file, fold, num_folds)
    if fold == -1:
        return {"train": items, "val": []}
    groups = [it["group"] for it in items]
    if len(set(groups)) < num_folds:
        raise MedpipeError(f"{num_folds}-fold split needs at least {num_folds} volume groups, got {len(set(groups))}")
    strata = sorted({g.split("_")[0] for g in groups}) if stratify else [""]
    labels = [strata.index(g.split("_")[0]) if stratify else 0 for g in groups]
    train_idx, val_idx = fold_indices(labels, groups, fold, num_folds, seed, split_mode)
    return {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}


def official_split_datalists(
    dataset_dir: str | Path, class_names: Sequence[str], max_cases: int = -1, seed: int = 0,
    train_split: str = "Training", test_split: str = "Testing", drop_test_copies: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """{'train': <root>/Training, 'val': <root>/Testing without files copied in Training, 'removed': [...]}.

    For sets (brain_mri_4class) whose official test split shares exact and near copies with training: scoring
    those would measure memory, not generalisation. `max_cases` caps the training list only, so the test split
    is the same whatever subset trains. Paths are relative to the data set root.
    """
    root = Path(dataset_dir)
    split = {}
    for name in (train_split, test_split):
        split[name] = [{**it, "path": f"{name}/{it['path']}"} for it in scan_class_folders(root / name, class_names)]
    removed = find_copies(split[test_split], split[train_split]) if drop_test_copies else []
    gone = {r["path"] for r in removed}
    return {"train": cap_items(split[train_split], max_cases, seed),
            "val": [it for it in split[test_split] if it["path"] not in gone], "removed": removed}  # fmt: skip


