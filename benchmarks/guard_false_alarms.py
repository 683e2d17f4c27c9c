"""False alarms of the wrong-input guard (medpipe.inference.input_guard) on every real CT series in $MEDPIPE_DATA, and
its power to flag a brain MRI or a chest X-ray sent to the CT route.

CT series, each rendered as the route that checks it renders it: the DICOM volumes (`dicom/*`, `covid_ct_md/P002`,
`ct_volumes/cip_ct64/dicom`) as covid_ct_seg's volumetric inference does (HU lung window, axial display orientation,
256²: medpipe.inference.input_guard.ct_route_planes) and file by file as `medpipe guard check` reads a DICOM file
(where pydicom can decode it), the development PNG slices (`covid_ct_seg` per volume group, `extra_medseg_infnet`)
as image files. Per series: the share of slices flagged one by one, the range
of P(CT), and the CT route's verdict for the series (InputGuard.check_volume: the mean probabilities of
GUARD_SLICES central slices). Wrong inputs: brain MRI (brain_mri_yes_no, brain_mri_4class) and chest X-rays
(covid_cxr) as single images (a one-slice "series"), and a brain MRI / X-ray image stacked into a volume, as a CT
route would get it.

`--leave_one_out` also refits the guard once per real CT volume series without that series' slices and measures it
on them (a scanner the guard never saw). Features are computed once and cached (`--cache`).

    OMP_NUM_THREADS=1 MEDPIPE_DATA=/work/shared/data python benchmarks/guard_false_alarms.py --leave_one_out
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medpipe.errors import MedpipeError  # noqa: E402
from medpipe.inference import guard_fit  # noqa: E402
from medpipe.inference.input_guard import (  # noqa: E402
    GUARD_SLICES,
    MIN_PROBABILITY,
    ModalityModel,
    ct_route_planes,
    file_features,
    image_features,
    series_probabilities,
)

NEGATIVE_SAMPLE = 300  # images drawn (seeded) from each wrong-modality set


def _ct_sets(root: Path) -> dict[str, tuple[str, list[str] | Path]]:
    """{series name: ("volume", folder) or ("images", files)} for every real CT series in the shared data."""
    sets: dict[str, tuple[str, list[str] | Path]] = {}
    for name in guard_fit.CT_VOLUME_SERIES:
        if (root / name).is_dir():
            sets[name] = ("volume", root / name)
            # the same series file by file, as `medpipe guard check FILE.dcm --expected ct` reads it
            sets[f"{name} (files)"] = ("images", sorted(str(p) for p in (root / name).glob("*.dcm")))
    datalist = root / "covid_ct_seg" / "datalist.json"
    if datalist.is_file():
        groups: dict[str, list[str]] = {}
        for item in json.loads(datalist.read_text())["training"]:
            groups.setdefault(item["volume_group"], []).append(str(root / "covid_ct_seg" / item["image"]))
        for group, files in sorted(groups.items()):
            sets[f"covid_ct_seg/{group}"] = ("images", sorted(files))
    infnet = root / "covid_ct_seg" / "extra_medseg_infnet" / "images"
    if infnet.is_dir():
        sets["covid_ct_seg/extra_medseg_infnet"] = ("images", sorted(str(p) for p in infnet.iterdir()))
    return sets


def _negative_sets(root: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    sets = {}
    for name, listing, column in (("brain_mri_yes_no", "MANIFEST.csv", "path"),
                                  ("brain_mri_4class", "MANIFEST.csv", "path"),
                                  ("covid_cxr", "labels.csv", "image")):  # fmt: skip
        path = root / name / listing
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                files = sorted(str(root / name / row[column]) for row in csv.DictReader(fh))
            sets[name] = sorted(rng.choice(files, min(NEGATIVE_SAMPLE, len(files)), replace=False).tolist())
    return sets


def features(root: Path, cache: Path) -> dict[str, dict]:
    """{set: {"kind": "ct_volume" | "ct_images" | "wrong", "features": (N, F)}}, cached in `cache` (.npz)."""
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as data:
            kinds = json.loads(str(data["kinds"]))
            return {name: {"kind": kind, "features": data[f"f{i}"]} for i, (name, kind) in enumerate(kinds.items())}
    from medpipe.io import ct

    out: dict[str, dict] = {}
    for name, (kind, source) in _ct_sets(root).items():
        if kind == "volume":
            planes = ct_route_planes(ct.load_volume(source))
            feats = np.stack([image_features(p) for p in planes])
            out[name] = {"kind": "ct_volume", "features": feats}
        else:
            try:
                out[name] = {"kind": "ct_images", "features": np.stack([file_features(p) for p in source])}
            except MedpipeError as exc:  # e.g. JPEG-Lossless files without a decoder plugin: the volume reader copes
                print(f"features: {name} skipped: {exc}", file=sys.stderr)
                continue
        print(f"features: {name} ({len(out[name]['features'])} slices)", file=sys.stderr)
    for name, files in _negative_sets(root).items():
        out[name] = {"kind": "wrong", "features": np.stack([file_features(p) for p in files])}
        print(f"features: {name} ({len(files)} images)", file=sys.stderr)
    kinds = {name: entry["kind"] for name, entry in out.items()}
    arrays = {f"f{i}": entry["features"] for i, entry in enumerate(out.values())}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, kinds=np.array(json.dumps(kinds)), **arrays)
    return out


def _row(model: ModalityModel, name: str, kind: str, feats: np.ndarray) -> dict:
    probs = model.probabilities(feats)
    p_ct = probs[:, model.classes.index("ct")]
    flagged = p_ct < MIN_PROBABILITY
    likely = [model.classes[i] for i in probs[flagged].argmax(axis=1)] if flagged.any() else []
    row = {"series": name, "kind": kind, "n": len(feats), "flagged": float(flagged.mean()),
           "p_ct_min": float(p_ct.min()), "p_ct_median": float(np.median(p_ct)), "p_ct_max": float(p_ct.max()),
           "flagged_as": ", ".join(sorted(set(likely)))}  # fmt: skip
    if kind in ("ct_volume", "ct_images"):
        series = dict(zip(model.classes, series_probabilities(model, feats), strict=True))
        row["series_flagged"] = series["ct"] < MIN_PROBABILITY
        row["series_p_ct"] = float(series["ct"])
        row["middle_p_ct"] = float(p_ct[len(p_ct) // 2])  # what the route judged on before: one middle slice
    else:  # one image is its own series; and a stack of the set's images as one volume
        row["series_flagged"] = bool(flagged.all())
        series = dict(zip(model.classes, series_probabilities(model, feats), strict=True))
        row["stack_flagged"] = series["ct"] < MIN_PROBABILITY
    return row


def table(model: ModalityModel, sets: dict[str, dict], title: str) -> list[dict]:
    rows = [_row(model, name, entry["kind"], entry["features"]) for name, entry in sets.items()]
    print(f"\n### {title}\n")
    print("| series | kind | slices | flagged one by one | P(CT) min – median – max | flagged as | middle slice alone "
          "| route verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] == "wrong":
            middle = "–"
            verdict = f"{r['flagged']:.1%} of images flagged; stacked as a volume: " + (
                "flagged" if r["stack_flagged"] else "PASSES")
        else:
            middle = ("FLAGGED" if r["middle_p_ct"] < MIN_PROBABILITY else "passes") + f" ({r['middle_p_ct']:.2f})"
            verdict = ("FLAGGED" if r["series_flagged"] else "passes") + f" (mean P(CT) {r['series_p_ct']:.2f})"
        print(f"| {r['series']} | {r['kind']} | {r['n']} | {r['flagged']:.1%} | {r['p_ct_min']:.2f} – "
              f"{r['p_ct_median']:.2f} – {r['p_ct_max']:.2f} | {r['flagged_as'] or '–'} | {middle} | {verdict} |")
    return rows


def leave_one_out(root: Path, sets: dict[str, dict]) -> list[dict]:
    """Refit without each real CT volume series' slices; measure on that series only."""
    rows = []
    for name in guard_fit.CT_VOLUME_SERIES:
        if name not in sets:
            continue
        result = guard_fit.fit_features(root, exclude=(name,))
        rows.append(_row(result, name, "ct_volume", sets[name]["features"]))
    print("\n### each real CT volume series measured by a guard fitted without it\n")
    print("| series | slices | flagged one by one | P(CT) min – median – max | route verdict |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['series']} | {r['n']} | {r['flagged']:.1%} | {r['p_ct_min']:.2f} – {r['p_ct_median']:.2f} – "
              f"{r['p_ct_max']:.2f} | {'FLAGGED' if r['series_flagged'] else 'passes'} (mean P(CT) "
              f"{r['series_p_ct']:.2f}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", default=os.environ.get("MEDPIPE_DATA", str(REPO.parent / "shared" / "data")))
    parser.add_argument("--model_file", default=None, help="a guard .npz (default: the cached fit, fitted if missing)")
    parser.add_argument("--cache", default="/tmp/medpipe_guard_false_alarms.npz", help="features cache (.npz)")
    parser.add_argument("--leave_one_out", action="store_true")
    args = parser.parse_args()
    root = Path(args.data_root)
    sets = features(root, Path(args.cache))
    model = ModalityModel.load(args.model_file)
    print(f"guard: {args.model_file or 'cached default fit'}; a slice is flagged when P(CT) < {MIN_PROBABILITY}; "
          f"the CT route decides per series on the mean probabilities of {GUARD_SLICES} central slices")
    table(model, sets, "every real CT series, and wrong inputs, through the CT route's guard")
    if args.leave_one_out:
        leave_one_out(root, sets)


if __name__ == "__main__":
    main()
