"""Fit and measure the wrong-input guard (medpipe.inference.input_guard) on the shared data sets' development images.

Each set is split into fit / held-out parts by group, never by image, so near-copies cannot sit on both sides:
brain_mri_yes_no by `near_duplicate_group`, covid_cxr by `patient_id`, covid_ct_seg by `volume_group` (a group is
held out when the first byte of its sha256 is divisible by HOLDOUT_EVERY). Held out entirely, as sources the guard
never saw: brain_mri_4class (other brain MRI collections, 224x224 re-encodes) and covid_ct_seg's extra_medseg_infnet
slices (another CT source, cropped JPEGs). The real CT series (CT_VOLUME_SERIES: DICOM in HU from four scanners)
are fitted on, 25 slices each, rendered as the CT route renders them: fitted on the PNGs alone, the guard called
slices of these series a brain MRI or a chest X-ray (a CT route verdict of 'not CT' on cip_ct64);
benchmarks/guard_false_alarms.py measures each series with a fit that left it out.
`medpipe guard fit` writes the coefficient file and prints the held-out rates; the same draw (seeded) always gives
the same file."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.inference.input_guard import (
    GUARD_RECIPE,
    MIN_PROBABILITY,
    MODALITIES,
    ModalityModel,
    ct_route_planes,
    default_guard_file,
    file_features,
    image_features,
)

HOLDOUT_EVERY = 5  # about one group in five is held out
FIT_PER_SOURCE = 100  # images drawn from each fit source
HELD_OUT_PER_SOURCE = 100  # images drawn from each held-out source for measuring
SEED = 0

def _held_out(group: str) -> bool:
    return hashlib.sha256(group.encode()).digest()[0] % HOLDOUT_EVERY == 0


def _brain_yes_no(root: Path) -> Iterator[tuple[str, str]]:
    with (root / "brain_mri_yes_no" / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield str(root / "brain_mri_yes_no" / row["path"]), row["near_duplicate_group"] or row["path"]


def _brain_4class(root: Path) -> Iterator[tuple[str, str]]:
    with (root / "brain_mri_4class" / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield str(root / "brain_mri_4class" / row["path"]), "held-out-only"


def _cxr(root: Path) -> Iterator[tuple[str, str]]:
    with (root / "covid_cxr" / "labels.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            yield str(root / "covid_cxr" / row["image"]), row["patient_id"]


def _ct(root: Path) -> Iterator[tuple[str, str]]:
    items = json.loads((root / "covid_ct_seg" / "datalist.json").read_text(encoding="utf-8"))["training"]
    for item in items:
        yield str(root / "covid_ct_seg" / item["image"]), item["volume_group"]


def _ct_infnet(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "covid_ct_seg" / "extra_medseg_infnet" / "images").iterdir()):
        yield str(path), "held-out-only"


# the real CT series in the shared data (DICOM in HU, several scanners): the CT route sees volumes like these, not
# only the development PNGs, so the guard's CT class is fitted on their slices too, rendered as the route renders
# them (input_guard.ct_route_planes); benchmarks/guard_false_alarms.py measures each with a fit that left it out
CT_VOLUME_SERIES = (
    "dicom/rider_pilot_chest_ct_0117",
    "dicom/lung_pet_ct_dx_a0002_b40f",
    "covid_ct_md/P002",
    "ct_volumes/cip_ct64/dicom",
)
SLICE_MARK = "#slice="  # "<series folder>#slice=<k>": one axial slice of a volume, as a record's path


@functools.lru_cache(maxsize=len(CT_VOLUME_SERIES))
def _route_planes(folder: str) -> np.ndarray:
    from medpipe.io import ct

    return ct_route_planes(ct.load_volume(folder))


def _ct_volumes(root: Path) -> Iterator[tuple[str, str]]:
    for name in CT_VOLUME_SERIES:
        folder = root / name
        if not folder.is_dir():
            continue
        for k in range(len(_route_planes(str(folder)))):
            yield f"{folder}{SLICE_MARK}{k}", name


def features_of(path: str) -> np.ndarray:
    """Guard features of an image file, or of a volume slice named `<series folder>#slice=<k>`."""
    if SLICE_MARK in path:
        folder, k = path.split(SLICE_MARK)
        return image_features(_route_planes(folder)[int(k)])
    return file_features(path)


# name: (modality, records, role) — role "split": group-aware fit/held-out; "fit": fit only; "held-out": measure only
SOURCES = {
    "brain_mri_yes_no": ("brain_mri", _brain_yes_no, "split"),
    "brain_mri_4class": ("brain_mri", _brain_4class, "held-out"),
    "covid_cxr": ("chest_xray", _cxr, "split"),
    "covid_ct_seg": ("ct", _ct, "split"),
    "covid_ct_seg/extra_medseg_infnet": ("ct", _ct_infnet, "held-out"),
    "real CT series": ("ct", _ct_volumes, "fit"),
}
FIT_PER_GROUP = {"real CT series": 25}  # slices per series: 100 in all, as from every other fit source


def _pick(rng: np.random.Generator, paths: list[str], n: int) -> list[str]:
    return sorted(rng.choice(paths, min(n, len(paths)), replace=False).tolist()) if paths else []


def draw(
    data_root: str | Path, seed: int = SEED, exclude: tuple[str, ...] = ()
) -> dict[str, dict[str, list[str]]]:
    """{source: {'fit': paths, 'held_out': paths}}: a seeded, group-aware draw from every source that exists; groups
    named in `exclude` (e.g. a CT series, to measure the guard on a scanner it never saw) are left out."""
    root = Path(data_root)
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, list[str]]] = {}
    for name, (_, records, role) in SOURCES.items():
        try:
            rows = sorted((p, g) for p, g in records(root) if g not in exclude)
        except FileNotFoundError:
            continue  # the DICOM series are optional; the three image sets are checked below
        fit = [p for p, g in rows if role == "fit" or (role == "split" and not _held_out(g))]
        held = [p for p, g in rows if role == "held-out" or (role == "split" and _held_out(g))]
        if name in FIT_PER_GROUP:  # the same number from each group (series), so no series outweighs the others
            groups = sorted({g for _, g in rows})
            fit = [p for g in groups for p in _pick(rng, [p for p, h in rows if h == g], FIT_PER_GROUP[name])]
        else:
            fit = _pick(rng, fit, FIT_PER_SOURCE)
        parts[name] = {"fit": fit, "held_out": _pick(rng, held, HELD_OUT_PER_SOURCE)}
    missing = {m for m in MODALITIES} - {SOURCES[n][0] for n, p in parts.items() if p["fit"]}
    if missing:
        raise MedpipeError(f"no training images for {sorted(missing)} under '{root}': set MEDPIPE_DATA to the shared "
                           "data folder (brain_mri_yes_no, covid_cxr, covid_ct_seg)")  # fmt: skip
    return parts


def fit_model(features: np.ndarray, modalities: list[str]) -> ModalityModel:
    """Standardised multinomial logistic regression (sklearn, lbfgs: deterministic for the same data)."""
    from sklearn.linear_model import LogisticRegression

    classes = sorted(MODALITIES)
    y = np.array([classes.index(m) for m in modalities])
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=2000).fit((features - mean) / scale, y)
    return ModalityModel(classes, mean, scale, clf.coef_, clf.intercept_)


def measure(model: ModalityModel, held_out: dict[str, tuple[str, np.ndarray]]) -> dict[str, Any]:
    """Per expected modality (bundle): share of its own held-out images flagged (wrongly) and share of every
    other source's held-out images flagged (correctly)."""
    table: dict[str, Any] = {}
    for expected in sorted(MODALITIES):
        column = model.classes.index(expected)
        rows = {}
        for source, (modality, feats) in held_out.items():
            flagged = model.probabilities(feats)[:, column] < MIN_PROBABILITY
            key = "wrongly_flagged" if modality == expected else "correctly_flagged"
            rows[source] = {key: round(float(flagged.mean()), 4), "n": len(feats)}
        table[expected] = rows
    return table


def fit_features(data_root: str | Path, seed: int = SEED, exclude: tuple[str, ...] = ()) -> ModalityModel:
    """The guard fitted on the seeded draw without the groups in `exclude`; nothing saved, nothing measured."""
    parts = draw(data_root, seed, exclude)
    feats = [features_of(p) for part in parts.values() for p in part["fit"]]
    return fit_model(np.stack(feats), [SOURCES[n][0] for n, part in parts.items() for _ in part["fit"]])


def fit_guard(
    data_root: str | Path, out: str | Path | None = None, seed: int = SEED, measure_held_out: bool = True
) -> dict[str, Any]:
    """Draw, fit, measure on the held-out parts (unless told not to), save the coefficient file; returns the
    measurement."""
    started = time.time()
    parts = draw(data_root, seed)
    fit_feats, fit_mods, held = [], [], {}
    for name, part in parts.items():
        modality = SOURCES[name][0]
        for path in part["fit"]:
            fit_feats.append(features_of(path))
            fit_mods.append(modality)
        if part["held_out"] and measure_held_out:
            held[name] = (modality, np.stack([features_of(p) for p in part["held_out"]]))
    model = fit_model(np.stack(fit_feats), fit_mods)
    out_path = Path(out) if out else default_guard_file()
    command = f"medpipe guard fit --data_root <shared data> --seed {seed}"
    model.save(out_path, command=command, fit_images=str(len(fit_mods)), seed=str(seed), recipe=GUARD_RECIPE)
    return {
        "written_to": str(out_path),
        "fit_images": {n: len(p["fit"]) for n, p in parts.items() if p["fit"]},
        "held_out": measure(model, held),
        "seconds": round(time.time() - started, 1),
    }


def format_measurement(result: dict[str, Any]) -> str:
    lines = [f"fitted on {sum(result['fit_images'].values())} images {result['fit_images']} in {result['seconds']} s",
             f"wrote {result['written_to']}", "", "| bundle expects | held-out source | n | flagged |",
             "|---|---|---|---|"]  # fmt: skip
    for expected, rows in result["held_out"].items():
        for source, row in rows.items():
            kind = "wrongly" if "wrongly_flagged" in row else "correctly"
            lines.append(f"| {expected} | {source} | {row['n']} | {row[f'{kind}_flagged']:.1%} ({kind}) |")
    return "\n".join(lines)
