"""covid_ct_seg's shipped layout (2-D slices listed in `datalist.json`) checked as the bundle reads it
(`medpipe dataset check PATH --bundle covid_ct_seg`, and first thing in every training on it).

The bundle's reader (`medpipe.data.datalists.read_seg_datalist`) lists the entries, noting each refusal instead of
stopping at the first; then every image (with the bundles' loader, `load_grey_2d`) and its label are decoded and
compared, so that what the slice loader (medpipe.transforms.seg.LoadSegSliced) would refuse one file at a time,
mid-job, is listed at once before anything trains. Problems: a missing file or key, a file that does not decode, a
label that is not one channel, a label of another shape than its image, label values outside the bundle's classes, the
same image bytes in two volume groups (a fold could train on one and score the other; the loader cannot see that).
What decoding found is kept by the files' sha256 (as for the classification check), so a later training hashes the
files and decodes only new or changed ones.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.datalists import check_refusal, read_seg_datalist
from medpipe.errors import MedpipeError
from medpipe.files import read_cache, sha256_file, write_cache
from medpipe.io.images import load_grey_2d

CACHE_VERSION = 3
CACHE_NAME = "decoded_slices.json"


@dataclass
class SliceReport:
    """What `check_png_slices` found: the problems (one line each) and what the slices hold."""

    root: Path
    class_names: list[str]
    items: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)  # "WxH" -> slices
    pixels: Counter = field(default_factory=Counter)  # label value -> pixels over all slices
    slices_with: Counter = field(default_factory=Counter)  # label value -> slices holding it

    @property
    def ok(self) -> bool:
        return not self.problems


def _decode(image: str, label: str) -> dict[str, Any]:
    """The image's size as the bundle's loader reads it (`load_grey_2d`: grey, RGB and 16-bit alike), its label's
    size, number of axes and {value: pixels}; MedpipeError naming the file that does not decode."""
    from PIL import Image, UnidentifiedImageError

    rows, cols = load_grey_2d(image).shape
    try:  # the label as medpipe.transforms.seg.load_label_2d reads it (data and transforms never import each other)
        with Image.open(label) as img:
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MedpipeError(f"label '{label}' does not decode ({exc})") from None
    values, counts = np.unique(array, return_counts=True)
    return {"image_size": [int(cols), int(rows)], "label_size": [int(n) for n in array.shape[:2][::-1]],
            "label_ndim": int(array.ndim),
            "label_values": {str(int(v)): int(n) for v, n in zip(values, counts, strict=True)}}  # fmt: skip


def check_png_slices(root: str | Path, class_names: list[str]) -> SliceReport:
    """Check the `datalist.json` slice set in `root` for a bundle with classes `class_names` (label value = index)."""
    root = Path(root)
    if not (root / "datalist.json").is_file():
        raise MedpipeError(f"{root}: no datalist.json; covid_ct_seg's slice layout lists its PNG slices there "
                           "(docs/datasets.md)")  # fmt: skip
    report = SliceReport(root, list(class_names))
    report.items = read_seg_datalist(root, "training", report.problems)
    cache = read_cache(CACHE_NAME, CACHE_VERSION)
    known = len(cache)
    by_sha: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in report.items:
        image_sha, label_sha = sha256_file(item["image"]), sha256_file(item["label"])
        by_sha[image_sha].append(item)
        key = f"{image_sha}:{label_sha}"
        if key not in cache:
            try:
                cache[key] = _decode(item["image"], item["label"])
            except MedpipeError as exc:
                report.problems.append(f"{item['path']}: {exc} (training would stop on it: replace the file)")
                continue
        _check_pair(item, cache[key], report)
    if len(cache) > known:
        write_cache(CACHE_NAME, CACHE_VERSION, cache)
    for copies in by_sha.values():
        groups = sorted({str(it["group"]) for it in copies})
        if len(groups) > 1:
            report.problems.append(f"same image bytes in {len(groups)} volume groups ({', '.join(groups)}): "
                                   f"{', '.join(it['path'] for it in copies)}; a fold can train on one and score the "
                                   "other: delete all but one")  # fmt: skip
    if not report.items and not report.problems:
        report.problems.append(f"'{root / 'datalist.json'}' has an empty 'training' list")
    return report


def _check_pair(item: dict[str, Any], found: dict[str, Any], report: SliceReport) -> None:
    where = item["path"]
    if found["label_ndim"] != 2:
        report.problems.append(f"{where}: label {Path(item['label']).name} has {found['label_ndim']} axes; a label map "
                               "is one channel of class values")  # fmt: skip
        return
    if found["label_size"] != found["image_size"]:
        report.problems.append(f"{where}: label {Path(item['label']).name} is {'x'.join(map(str, found['label_size']))}"
                               f", its image {'x'.join(map(str, found['image_size']))}; the label must lie on the "
                               "image's grid")  # fmt: skip
        return
    values = {int(v): n for v, n in found["label_values"].items()}
    unknown = sorted(v for v in values if not 0 <= v < len(report.class_names))
    if unknown:
        last = len(report.class_names) - 1
        report.problems.append(f"{where}: label values {unknown[:5]} outside the classes 0..{last} "
                               f"({', '.join(report.class_names)})")  # fmt: skip
        return
    report.sizes["x".join(map(str, found["image_size"]))] += 1
    for value, count in values.items():
        report.pixels[value] += count
        report.slices_with[value] += 1


def format_slice_report(report: SliceReport) -> str:
    """The problems (one line each) and the summary table."""
    groups = Counter(str(it["group"]) for it in report.items)
    lines = [f"error: {p}" for p in report.problems]
    lines += [
        f"data set      {report.root} (PNG slices listed in datalist.json, as covid_ct_seg reads them)",
        f"slices        {len(report.items)} listed, in {len(groups)} volume group(s) (folds split by them)",
        "labels        value  class                 slices  pixels",
    ]
    for value, name in enumerate(report.class_names):
        lines.append(f"              {value:>5}  {name:<20}  {report.slices_with[value]:>6}  {report.pixels[value]:,}")
    lines.append("sizes         " + ", ".join(f"{size} ({n})" for size, n in report.sizes.most_common()))
    lines.append(f"result        {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return "\n".join(lines)


def require_clean_slices(dataset_dir: str | Path, class_names: Any, bundle: str = "covid_ct_seg") -> str:
    """The check a training on the slice layout runs first (the first step of covid_ct_seg's `training`): refused
    in one line naming the first problem and how many there are, before anything trains; else a one-line summary."""
    report = check_png_slices(dataset_dir, [str(n) for n in class_names])
    if report.problems:
        raise check_refusal(report.root, report.problems, bundle)
    return f"{report.root}: {len(report.items)} slices checked, ok"
