"""Segmentation training data from the layouts the field uses: the shipped PNG slices (`datalist.json`) or 3-D
volumes in an nnU-Net v2 raw folder, an MSD / MONAI `dataset.json` folder or DICOM series with DICOM-SEG labels (one
folder per case), as one kind of datalist.

A volume layout is checked whole first (medpipe.data.integrity, what `medpipe dataset check` runs) and refused in
one line when the check finds a problem, before anything trains. Its labels are mapped onto the bundle's classes by
name (or `label_map`); each case then gives one item per axial slice: `image` and `label` name the case's volume
files, `slice` the slice (display order, inferior → superior, as medpipe.io.ct.display_slices cuts them) and
`label_classes` the label value → class index table. The loader (medpipe.transforms.volume_slices) cuts the slice and
its neighbours from the volume. Folds keep a case's slices together (`group` = case), as the PNG slices of one
volume are kept together, through the same split (datalists.split_seg_items); where the data set names each case's
patient (DICOM-SEG's PatientID, an MSD entry's `patient`), `group` is the patient, so a patient's cases stay together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.datalists import check_refusal, seg_datalists, split_seg_items
from medpipe.data.integrity import (
    DICOM_SEG,
    LAYOUTS,
    check_dataset,
    classes_of,
    detect_layout,
    has_dicom_seg_cases,
    parse_label_map,
    parse_names,
)
from medpipe.errors import MedpipeError
from medpipe.io import ct

PNG = "png"  # the shipped covid_ct_seg layout: 2-D slices listed in datalist.json
DATASET_LAYOUTS = ("auto", PNG, *LAYOUTS)
# the keys of an item cut from a 3-D volume, which medpipe.transforms.volume_slices reads (data and transforms never
# import each other): its axial slice index, its label value -> class index table ({"1": 1}) and its channel's name
SLICE_KEY = "slice"
CLASSES_KEY = "label_classes"
CHANNEL_KEY = "channel"


def resolve_layout(dataset_dir: str | Path, dataset_layout: str = "auto") -> str:
    """`png`, `nnunet`, `msd` or `dicom_seg`: `auto` reads the folder (datalist.json: png; dataset.json: nnU-Net or
    MSD by its keys; neither, but case folders holding a DICOM-SEG: dicom_seg; as `medpipe dataset check` detects
    them)."""
    if dataset_layout not in DATASET_LAYOUTS:
        raise MedpipeError(f"--dataset_layout {dataset_layout}: use one of {', '.join(DATASET_LAYOUTS)}")
    if dataset_layout != "auto":
        return dataset_layout
    root = Path(dataset_dir)
    if (root / "datalist.json").is_file():
        return PNG
    if not (root / "dataset.json").is_file():
        # a folder with neither is refused by the PNG reader, in its own words
        return DICOM_SEG if root.is_dir() and has_dicom_seg_cases(root) else PNG
    try:
        description = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError) as exc:
        raise MedpipeError(f"{root / 'dataset.json'}: not valid JSON ({exc})") from None
    if not isinstance(description, dict):
        raise MedpipeError(f"{root / 'dataset.json'}: expected a JSON object")
    return detect_layout(root, description)


def volume_slice_items(
    dataset_dir: str | Path, layout: str, classes: dict[str, Any], label_map: Any = None, absent_structures: Any = None,
) -> list[dict[str, Any]]:
    """One item per axial slice of every case of a checked volume layout, cases in name order.

    Refused in one line when the data set check finds a problem (the first, with the count) or when a case has more
    than one channel (the CT bundles read one)."""
    report = check_dataset(dataset_dir, layout, classes, parse_label_map(label_map), parse_names(absent_structures))
    if not report.ok:
        raise check_refusal(report.root, report.problems, classes["name"])
    if not report.cases:
        raise MedpipeError(f"{report.root}: the data set has no training case")
    if len(report.channels) != 1:
        raise MedpipeError(f"{report.root}: {len(report.channels)} channels ({', '.join(report.channels.values())}); "
                           f"{classes['name']} reads one CT channel")  # fmt: skip
    table = {str(value): int(index) for value, index in sorted(report.class_values.items())}
    channel = next(iter(report.channels.values()))  # its name picks the normalisation, as nnU-Net's does
    items: list[dict[str, Any]] = []
    for case in sorted(report.cases, key=lambda c: c.name):
        assert case.shape is not None and case.affine is not None  # a case without problems was read
        for k in range(case.shape[ct.axial_axis(case.affine)]):
            items.append({
                "image": str(case.images[0]), "label": str(case.label), SLICE_KEY: k, CLASSES_KEY: table,
                CHANNEL_KEY: channel,
                "path": f"{case.name}/slice_{k:04d}", "group": case.patient or case.name, "volume_group": case.name,
                "source_index": k,
            })  # fmt: skip
    return items


def cap_cases(items: list[dict[str, Any]], max_cases: int, seed: int = 0) -> list[dict[str, Any]]:
    """The slices of at most `max_cases` cases (-1: all), chosen by a seeded shuffle, kept in their order."""
    cases = sorted({it["volume_group"] for it in items})
    if max_cases < 0 or len(cases) <= max_cases:
        return items
    chosen = {cases[i] for i in np.random.default_rng(seed).permutation(len(cases))[:max_cases]}
    return [it for it in items if it["volume_group"] in chosen]


def segmentation_datalists(
    dataset_dir: str | Path, dataset_layout: str, fold: int, num_folds: int = 5, seed: int = 0,
    split_mode: str = "group", max_cases: int = -1, splits_file: str | None = None, bundle: str = "",
    class_names: Any = None, structures: Any = None, label_map: Any = None, absent_structures: Any = None,
) -> dict[str, list[dict[str, Any]]]:
    """{'train', 'val', 'test'} of a segmentation bundle from any layout it reads: `png` is the shipped slices
    (datalists.seg_datalists, unchanged); a volume layout gives the slices of its cases, `max_cases` counting cases.

    The bundle's `class_names` and `structures` are what the volume labels are mapped onto."""
    layout = resolve_layout(dataset_dir, dataset_layout)
    if layout == PNG:
        if parse_label_map(label_map) or parse_names(absent_structures):
            raise MedpipeError("--label_map and --absent_structures map the labels of a volume layout (nnU-Net, MSD); "
                               f"'{dataset_dir}' is the PNG slice layout, whose labels are the bundle's classes")
        return seg_datalists(dataset_dir, fold, num_folds, seed, split_mode, max_cases, splits_file)
    items = volume_slice_items(dataset_dir, layout, classes_of(bundle, class_names, structures), label_map,
                               absent_structures)  # fmt: skip
    items = cap_cases(items, max_cases, seed)
    return {**split_seg_items(items, fold, num_folds, seed, split_mode, splits_file, stratify=False), "test": []}
