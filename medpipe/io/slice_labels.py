"""Slice-level labels of DICOM series: a CSV with `file` and `infection` (0/1) columns, one row per slice, as
COVID-CT-MD's `slice_labels.csv`. Scoring (medpipe.evaluation.real_dicom) and infection-free training slices
(medpipe.transforms.infection_free) read it here."""

from __future__ import annotations

import csv
from pathlib import Path

from medpipe.errors import MedpipeError


def read_slice_label_rows(path: str | Path) -> list[tuple[Path, int]]:
    """(file, 0/1) per row; relative files are resolved against the CSV's folder. Bad files are one line."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedpipeError(f"cannot read slice labels '{path}': {exc}") from exc
    if not rows or not {"file", "infection"} <= set(rows[0]):
        raise MedpipeError(f"'{path}' needs `file` and `infection` columns (one row per slice)")
    bad = sorted({str(r["infection"]) for r in rows} - {"0", "1"})
    if bad:
        raise MedpipeError(f"'{path}': infection labels must be 0 or 1, got {bad[:3]}")
    return [(path.parent / str(r["file"]).strip(), int(r["infection"])) for r in rows]
