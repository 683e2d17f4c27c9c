"""`ingest`: every valid DICOM series under a folder to one NIfTI volume + one de-identified JSON sidecar,
with a summary of what was written and what was skipped and why.

All or nothing: the files are written into a staging folder inside OUT_DIR and moved into place, the summary last,
only when every series was written; a failure midway (a full disk, a read-only folder, an unexpected error) removes
what this run had written and leaves OUT_DIR as it was. Invalid series are an error before anything is written,
or, with `skip_invalid`, left out and listed in the summary."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write, staged_outputs
from medpipe.io.deid import _number, burned_in_files, deidentified_sidecar
from medpipe.io.dicom import SeriesLayout, _check_on_gap, check_series, load_series
from medpipe.io.dicom_scan import Skipped, find_series

log = logging.getLogger(__name__)
SUMMARY = "ingest_summary.json"
_MAX_SHIFT_DAYS = 36_525  # a century: larger shifts overflow dates and hide nothing more


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a NIfTI with the affine as both sform and qform (scanner coordinates), atomically."""
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return atomic_write(Path(path), lambda tmp: nib.save(image, tmp))


def _write_json(data: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _output_name(layout: SeriesLayout) -> str:
    """File stem without identifiers: modality, series number and a hash of the series UID."""
    ds = layout.first
    modality = re.sub(r"[^a-z0-9]", "", str(ds.get("Modality", "")).lower()) or "img"
    number = _number(ds.get("SeriesNumber"))
    number_part = f"s{int(number):03d}" if isinstance(number, int) else "s"
    return f"{modality}_{number_part}_{hashlib.sha256(layout.series.uid.encode()).hexdigest()[:8]}"


def ingest(
    dicom_dir: str | Path,
    out_dir: str | Path,
    on_gap: str = "error",
    skip_invalid: bool = False,
    date_shift_days: int | None = None,
    allow_burned_in: bool = False,
) -> dict[str, Any]:
    """Write one NIfTI + de-identified sidecar per valid series under `dicom_dir`; return the summary.

    Invalid series and damaged DICOM files raise MedpipeError before anything is written, unless `skip_invalid`,
    which leaves them out and lists them in the summary; a series that a damaged file may belong to is left out
    whole, never written a slice short. Files that are not DICOM are ignored and counted.
    A series with BurnedInAnnotation YES is invalid too (its pixels may show names and IDs that header
    de-identification cannot remove) unless `allow_burned_in`, which ingests it with a warning in the summary and
    `burned_in_annotation` in its sidecar.
    """
    _check_on_gap(on_gap)
    shift = date_shift(date_shift_days)
    root, out = Path(dicom_dir), Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MedpipeError(f"output folder '{out}' is a file, not a folder; pass a folder path")
    scan = find_series(root)
    if scan.n_files == 0:
        raise MedpipeError(f"{root}: empty folder, no DICOM files to ingest")
    layouts: list[SeriesLayout] = []
    # (summary entry, one-line message naming the file or series)
    problems = [(d, f"{d.path}: {d.reason}; re-export the series or remove the file") for d in scan.damaged]
    for series in scan.series:
        damaged = scan.damaged_in(series)
        if damaged:
            reason = (
                f"series in {series.folder} left out whole: {len(damaged)} damaged file(s) may belong to it "
                f"(first {damaged[0].path}); without them the volume could be short of slices"
            )
            problems.append((Skipped(str(series.folder), reason), reason))
            continue
        try:
            layout = check_series(series, on_gap)
            _check_burned_in(layout, allow_burned_in)
            layouts.append(layout)
        except MedpipeError as exc:
            problems.append((Skipped(str(series.folder), str(exc)), str(exc)))
    if problems and not skip_invalid:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise MedpipeError(f"{problems[0][1]}{more}; nothing was written")
    if not layouts:
        # a DICOM file's reason (multi-frame, not an image) says more than a stray README's
        why = sorted(scan.skipped, key=lambda s: s.reason == "not a DICOM file")
        example = f" (e.g. {why[0].path}: {why[0].reason})" if why else ""
        raise MedpipeError(f"{root}: no valid DICOM image series among {scan.n_files} file(s){example}")

    ingested = []
    with staged_outputs(out, "the ingested series", last=(SUMMARY,)) as staging:
        for layout in layouts:
            try:
                ingested.append(_export(layout, staging, shift))
            except MedpipeError as exc:
                if not skip_invalid:
                    raise MedpipeError(f"{exc}; nothing was written") from exc
                problems.append((Skipped(str(layout.series.folder), str(exc)), str(exc)))
        summary = {
            "dicom_dir": str(root),
            "out_dir": str(out),
            "on_gap": on_gap,
            "counts": scan.counts(),
            "ingested": ingested,
            "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped + [p for p, _ in problems]],
        }
        _write_json(summary, staging / SUMMARY)
    return summary


def _check_burned_in(layout: SeriesLayout, allow: bool) -> None:
    """PS3.15: an image with burned-in annotation is not de-identified by cleaning its header; refuse it, or with
    the explicit opt-in keep it with a warning (the sidecar records it too, see deid.deidentified_sidecar)."""
    files = [f for f in layout.slices if f is not None]
    burned_in = burned_in_files(f.ds for f in files)
    if not burned_in:
        return
    where = f"series {layout.series.uid} in {layout.series.folder}"
    what = f"BurnedInAnnotation YES in {burned_in} of {len(files)} file(s)"
    if not allow:
        raise MedpipeError(
            f"{where}: {what} — its pixels may show patient identifiers that de-identification cannot remove; "
            "pass --allow_burned_in true to ingest it anyway (recorded in its sidecar)"
        )
    message = f"{where}: {what}: ingested with identifying text possibly left in the pixels (--allow_burned_in)"
    log.warning(message)
    layout.warnings.append(message)


def date_shift(value: Any) -> int | None:
    """`--date_shift_days` as a whole number of days (fire passes '-10' as an int, '1.5' as a float, 'abc' as a
    string); None keeps dates out of the sidecars."""
    if value is None:
        return None
    number: Any = value
    if isinstance(number, str):
        try:
            number = float(number.strip())
        except ValueError:
            number = None
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if not isinstance(number, int) or isinstance(number, bool):
        raise MedpipeError(f"--date_shift_days {value!r}: expected a whole number of days, e.g. -30")
    if abs(number) > _MAX_SHIFT_DAYS:
        raise MedpipeError(f"--date_shift_days {value!r}: out of range; shift by at most {_MAX_SHIFT_DAYS} days")
    return number


def _export(layout: SeriesLayout, out: Path, date_shift_days: int | None) -> dict[str, Any]:
    """Load one checked series and write its NIfTI and sidecar; return its summary entry."""
    volume = load_series(layout)
    sidecar = deidentified_sidecar(layout, volume, date_shift_days)
    stem = _output_name(layout)
    save_nifti(volume.array, volume.affine, out / f"{stem}.nii.gz")
    _write_json(sidecar, out / f"{stem}.json")
    return {
        "nifti": f"{stem}.nii.gz",
        "sidecar": f"{stem}.json",
        "source": str(layout.series.folder),
        "n_files": sidecar["n_source_files"],
        "modality": sidecar["modality"],
        "shape": sidecar["shape"],
        "spacing_mm": sidecar["spacing_mm"],
        "series_description": sidecar["series_description"],
        "warnings": layout.warnings,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable summary lines, as `medpipe ingest` prints them."""
    lines = [f"ingested {len(summary['ingested'])} series into {summary['out_dir']}:"]
    for item in summary["ingested"]:
        shape = "x".join(str(v) for v in item["shape"])
        spacing = "x".join(f"{v:.3f}" for v in item["spacing_mm"])
        lines.append(
            f"  {item['nifti']}  {item['modality']} {shape} voxels, {spacing} mm, {item['n_files']} files, "
            f"{item['series_description']!r}"
        )
        lines.extend(f"    warning: {w}" for w in item["warnings"])
    counts = summary.get("counts", {})
    lines.append(
        f"skipped {len(summary['skipped'])}: {counts.get('not_dicom', 0)} not DICOM, {counts.get('not_a_slice', 0)} "
        f"not a volume slice, {counts.get('damaged', 0)} damaged DICOM file(s)"
    )
    lines.extend(f"  {s['path']}: {s['reason']}" for s in summary["skipped"])
    lines.append(f"summary: {Path(summary['out_dir']) / SUMMARY}")
    return "\n".join(lines)
