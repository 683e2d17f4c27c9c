"""`ingest`: every valid DICOM series under a folder to one NIfTI volume + one de-identified JSON sidecar,
with a summary of what was written and what was skipped and why."""

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
from medpipe.files import atomic_write
from medpipe.io.deid import _number, deidentified_sidecar
from medpipe.io.dicom import SeriesLayout, Skipped, _check_on_gap, check_series, find_series, load_series

log = logging.getLogger(__name__)





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
) -> dict[str, Any]:
    """Write one NIfTI + de-identified sidecar per valid series under `dicom_dir`; return the summary.

    Invalid series (and unreadable DICOM files) raise MedpipeError before anything is written, unless
    `skip_invalid`, which leaves them out and lists them in the summary.
    """
    _check_on_gap(on_gap)
    root, out = Path(dicom_dir), Path(out_dir)
    scan = find_series(root)
    if scan.n_files == 0:
        raise MedpipeError(f"{root}: empty folder, no DICOM files to ingest")
    layouts: list[SeriesLayout] = []
    # (summary entry, one-line message naming the file or series)
    problems = [(u, f"{u.path}: {u.reason}; remove or re-export it") for u in scan.unreadable]
    for series in scan.series:
        try:
            layouts.append(check_series(series, on_gap))
        except MedpipeError as exc:
            problems.append((Skipped(str(series.folder), str(exc)), str(exc)))
    if problems and not skip_invalid:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise MedpipeError(f"{problems[0][1]}{more}; nothing was written")
    if not layouts:
        example = f" (e.g. {scan.skipped[0].path}: {scan.skipped[0].reason})" if scan.skipped else ""
        raise MedpipeError(f"{root}: no valid DICOM image series among {scan.n_files} file(s){example}")

    out.mkdir(parents=True, exist_ok=True)
    ingested = []
    for layout in layouts:
        try:
            ingested.append(_export(layout, out, date_shift_days))
        except MedpipeError as exc:
            if not skip_invalid:
                raise
            problems.append((Skipped(str(layout.series.folder), str(exc)), str(exc)))
    summary = {
        "dicom_dir": str(root),
        "out_dir": str(out),
        "on_gap": on_gap,
        "ingested": ingested,
        "skipped": [vars(s) for s in scan.skipped + [p for p, _ in problems]],
    }
    _write_json(summary, out / "ingest_summary.json")
    return summary


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
    lines.append(f"skipped {len(summary['skipped'])}:")
    lines.extend(f"  {s['path']}: {s['reason']}" for s in summary["skipped"])
    lines.append(f"summary: {Path(summary['out_dir']) / 'ingest_summary.json'}")
    return "\n".join(lines)
