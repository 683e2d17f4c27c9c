"""DICOM ingestion: find series in a folder tree, validate their geometry, load them as HU volumes, export NIfTI.

Files are found by medpipe.io.dicom_scan under one strict reader policy: a damaged DICOM file is an error naming
it, never skipped as "not an image" and never a volume a slice short.

Slices are ordered by their position along the slice normal (ImageOrientationPatient row x column cosines, dotted
with ImagePositionPatient), never by InstanceNumber, and must lie on one evenly spaced line: NIfTI has one affine per
volume, so a gap or an uneven step would silently misplace every slice after it.
Pixel data are decoded with pydicom; transfer syntaxes that pydicom cannot decode fall back to MONAI's ITKReader.
`medpipe ingest DICOM_DIR OUT_DIR` (medpipe.io.ingest) writes one NIfTI + one de-identified JSON sidecar per series."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medpipe.errors import MedpipeError
from medpipe.io.dicom_scan import Series, SliceFile, find_series, invalid_uid_messages

log = logging.getLogger(__name__)

ON_GAP = ("error", "warn")
# positions closer than this along the normal are the same slice (IPP is usually written to 0.01 mm or better)
_SAME_POSITION_MM = 0.01
# a slice may sit this fraction of the slice step off the regular grid before the spacing counts as uneven
_GRID_TOLERANCE = 0.05
_ORIENTATION_TOLERANCE = 1e-3
# a stack sheared more than this (gantry tilt) gets a warning: readers of the NIfTI qform see it unsheared
_SHEAR_NOTED_DEG = 0.5
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3-D image on a voxel grid: what `load_series` and `medpipe.io.ct.load_nifti` both return.

    `array` is indexed (i, j, k) = (column, row, slice) for DICOM input and as stored for NIfTI input;
    `affine` maps voxel indices to RAS+ millimetres (NIfTI convention).
    """

    array: np.ndarray
    affine: np.ndarray
    # the DICOM file of each slice k (None where a missing slice was filled); empty for NIfTI input
    source_files: tuple[Path | None, ...] = ()
    # de-identified description (the JSON sidecar's fields)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (the affine's column lengths)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class SeriesLayout:
    """A validated series: slices sorted along the normal and the voxel-to-RAS affine."""

    series: Series
    slices: list[SliceFile | None]  # sorted by position; None marks a missing slice (only with on_gap="warn")
    affine: np.ndarray
    missing: list[dict[str, Any]]  # {"index": k, "position_lps_mm": [x, y, z]} for each missing slice
    duplicates_dropped: list[Path]
    warnings: list[str]

    @property
    def first(self) -> Dataset:
        """Header of the first present slice, for the series-level attributes."""
        return next(s for s in self.slices if s is not None).ds


def check_series(series: Series, on_gap: str = "error") -> SeriesLayout:
    """Sort and validate one series; raise MedpipeError naming the series or file when it cannot be one volume."""
    _check_on_gap(on_gap)
    name = f"series {series.uid} in {series.folder}"
    files = series.files
    _check_one_subject(files, name)
    _check_greyscale(files, name)
    _check_same(files, name, "Modality", lambda ds: str(ds.get("Modality", "")))
    _check_same(files, name, "Rows x Columns", lambda ds: (int(ds.Rows), int(ds.Columns)))
    _check_orientation(files, name)
    _check_same(files, name, "PixelSpacing", lambda ds: tuple(round(float(v), 4) for v in _pixel_spacing(ds, name)))

    iop = np.asarray(files[0].ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([[float(v) for v in f.ds.ImagePositionPatient] for f in files])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    files = [files[i] for i in order]
    positions, along = positions[order], along[order]

    files, positions, along, dropped = _drop_duplicates(files, positions, along, name)
    messages = [f"dropped {p}: a copy of another file (same SOPInstanceUID and position)" for p in dropped]
    step_mm, index = _grid(files, along, name)
    direction = _slice_direction(files, positions, along, normal, name)

    n = int(index[-1]) + 1 if len(index) else 0
    slices: list[SliceFile | None] = [None] * n
    for f, k in zip(files, index, strict=True):
        slices[int(k)] = f
    missing = [
        {"index": k, "position_lps_mm": [round(float(v), 3) for v in positions[0] + direction * step_mm * k]}
        for k in range(n)
        if slices[k] is None
    ]
    if missing:
        message = _gap_message(name, missing, slices, step_mm)
        if on_gap == "error":
            raise MedpipeError(message + "; pass --on_gap warn to ingest it with the gap filled")
        log.warning(message)
        messages.append(message)

    shear = float(np.degrees(np.arccos(min(1.0, 1.0 / max(float(np.linalg.norm(direction)), 1.0)))))
    if shear > _SHEAR_NOTED_DEG:  # gantry tilt: tilted planes stacked along the table; NIfTI's qform cannot shear
        message = (
            f"{name}: slices are sheared {shear:.1f}° (gantry tilt); the NIfTI sform holds the exact geometry, the "
            "qform only the nearest rotation"
        )
        log.warning(message)
        messages.append(message)
    affine = _affine_ras(files[0].ds, positions[0], direction * step_mm)
    return SeriesLayout(series, slices, affine, missing, dropped, messages)


def _check_on_gap(on_gap: str) -> None:
    if on_gap not in ON_GAP:
        raise MedpipeError(f"on_gap={on_gap!r}: use one of {', '.join(ON_GAP)}")


def _check_same(files: Sequence[SliceFile], name: str, what: str, key: Callable[[Dataset], Any]) -> None:
    """All files agree on `key`; otherwise name the first file that differs from the first one."""
    first = key(files[0].ds)
    for f in files[1:]:
        value = key(f.ds)
        if value != first:
            raise MedpipeError(
                f"{f.path}: {what} {value} differs from {first} in {files[0].path.name} ({name}); "
                "one volume needs one value — remove the odd file or split the series"
            )


def _check_one_subject(files: Sequence[SliceFile], name: str) -> None:
    """One patient and one study per series: a SeriesInstanceUID reused across patients (a buggy exporter or
    anonymiser) would otherwise stack two people into one volume. The values stay out of the message."""
    for keyword in ("PatientID", "StudyInstanceUID"):
        with invalid_uid_messages():  # non-conformant UIDs: the scan said so once for the folder
            each = [str(f.ds.get(keyword, "")).strip() for f in files]
        if len(set(each)) > 1:
            odd = files[next(i for i, v in enumerate(each) if v != each[0])]
            raise MedpipeError(
                f"{name}: holds more than one {keyword} ({len(set(each))} different values, e.g. {odd.path.name} "
                f"differs from {files[0].path.name}); one SeriesInstanceUID must not span patients or studies — "
                "split the files by patient and study"
            )


def _check_greyscale(files: Sequence[SliceFile], name: str) -> None:
    """A volume is one value per voxel (HU for CT): colour images (RGB, YBR, palette indices) are screen captures
    or colour-mapped exports whose pixels hold no rescaled values."""
    for f in files:
        photometric = str(f.ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
        samples = int(f.ds.get("SamplesPerPixel", 1) or 1)
        if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise MedpipeError(
                f"{f.path}: PhotometricInterpretation {photometric} with {samples} sample(s) per pixel ({name}); "
                "a volume needs greyscale (MONOCHROME) images — colour pixels hold no HU; export the original "
                "greyscale series"
            )


def _check_orientation(files: Sequence[SliceFile], name: str) -> None:
    """One ImageOrientationPatient for the whole series (a localizer's three planes cannot stack)."""
    first = np.asarray(files[0].ds.ImageOrientationPatient, dtype=float)
    for f in files[1:]:
        iop = np.asarray(f.ds.ImageOrientationPatient, dtype=float)
        if iop.shape != (6,) or not np.allclose(iop, first, atol=_ORIENTATION_TOLERANCE):
            raise MedpipeError(
                f"{f.path}: ImageOrientationPatient {[round(v, 4) for v in iop.tolist()]} differs from "
                f"{[round(v, 4) for v in first.tolist()]} in {files[0].path.name} ({name}); mixed orientations "
                "cannot form one volume — remove the odd slices"
            )


def _pixel_spacing(ds: Dataset, name: str) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: PixelSpacing[0] is the distance between rows."""
    if "PixelSpacing" not in ds:
        raise MedpipeError(f"{name}: no PixelSpacing in the header, so the voxel size is unknown")
    rows_mm, cols_mm = (float(v) for v in ds.PixelSpacing)
    return rows_mm, cols_mm


def _drop_duplicates(
    files: list[SliceFile], positions: np.ndarray, along: np.ndarray, name: str
) -> tuple[list[SliceFile], np.ndarray, np.ndarray, list[Path]]:
    """Drop exact copies (same SOPInstanceUID and position); two different images at one position are an error."""
    keep = [0]
    dropped: list[Path] = []
    for i in range(1, len(files)):
        j = keep[-1]
        if along[i] - along[j] >= _SAME_POSITION_MM:
            keep.append(i)
            continue
        a, b = files[j], files[i]
        uid = str(a.ds.get("SOPInstanceUID", ""))
        if uid and uid == str(b.ds.get("SOPInstanceUID", "")):
            log.warning("dropping %s: same SOPInstanceUID and position as %s", b.path, a.path)
            dropped.append(b.path)
            continue
        raise MedpipeError(
            f"{b.path}: duplicate slice — same position {along[i]:.2f} mm along the normal as {a.path} but a "
            f"different image ({name}); remove one of them"
        )
    return [files[i] for i in keep], positions[keep], along[keep], dropped


def _grid(files: list[SliceFile], along: np.ndarray, name: str) -> tuple[float, np.ndarray]:
    """Slice step (mm) and each slice's index on the regular grid; a step of 2 grid units means one missing slice."""
    if len(files) == 1:
        ds = files[0].ds
        step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0)
        return abs(step), np.zeros(1, dtype=int)
    steps = np.diff(along)
    _check_spacing_change(files, along, steps, name)
    rough = steps.min()
    index = np.concatenate([[0], np.cumsum(np.rint(steps / rough))]).astype(int)
    if 2 * np.sum(np.diff(index) == 1) < len(steps):  # the smallest step is an outlier, not the slice spacing
        close = int(steps.argmin()) + 1
        raise MedpipeError(
            f"{files[close].path}: uneven slice spacing — only {steps[close - 1]:.3f} mm from the previous slice "
            f"while most steps are {np.median(steps):.3f} mm ({name}); NIfTI needs evenly spaced slices"
        )
    step = (along[-1] - along[0]) / index[-1]  # fit through the end slices so errors do not accumulate
    off = np.abs(along - (along[0] + index * step))
    worst = int(off.argmax())
    if off[worst] > _GRID_TOLERANCE * step:
        raise MedpipeError(
            f"{files[worst].path}: uneven slice spacing — this slice is {off[worst]:.3f} mm off the regular "
            f"{step:.3f} mm grid ({name}); NIfTI needs evenly spaced slices"
        )
    return float(step), index


def _check_spacing_change(files: list[SliceFile], along: np.ndarray, steps: np.ndarray, name: str) -> None:
    """Refuse a series whose slice spacing changes part-way (e.g. 1.25 mm slices, then 5 mm ones): its larger steps
    are whole multiples of the small one, so they would pass for missing slices and `--on_gap warn` would invent
    them. A gap is a lone larger step between regular ones; a change is a second run of two or more equal steps
    of another size, or a larger step where SliceThickness changes too."""
    def same(a: float, b: float) -> bool:
        return abs(a - b) <= _GRID_TOLERANCE * min(abs(a), abs(b))

    runs: list[tuple[int, int]] = []  # (first step, number of steps) of each run of equal steps
    for i, step in enumerate(steps):
        if runs and same(step, steps[runs[-1][0]]):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    if len(runs) == 1:
        return
    long_runs = [r for r in runs if r[1] >= 2]
    for before, after in zip(long_runs, long_runs[1:], strict=False):
        if not same(steps[before[0]], steps[after[0]]):
            _refuse_spacing_change(files, along, steps[before[0]], steps[after[0]], after[0], name)
    thickness = [_number_or(f.ds.get("SliceThickness"), float("nan")) for f in files]
    for j in range(1, len(files)):
        changed = not (np.isnan(thickness[j]) or np.isnan(thickness[j - 1]) or same(thickness[j], thickness[j - 1]))
        before = steps[j - 2] if j >= 2 else steps[j]
        if changed and not same(before, steps[j - 1]):  # a new reconstruction, not a grid with holes
            extra = f"; SliceThickness changes from {thickness[j - 1]:g} to {thickness[j]:g} mm there"
            _refuse_spacing_change(files, along, before, steps[j - 1], j - 1, name, extra)


def _refuse_spacing_change(
    files: list[SliceFile], along: np.ndarray, old: float, new: float, step: int, name: str, extra: str = ""
) -> None:
    """One line: the spacing before and after, and where it changes (between which files, mm along the normal)."""
    raise MedpipeError(
        f"{name}: slice spacing changes from {old:.3f} mm to {new:.3f} mm between {files[step].path.name} and "
        f"{files[step + 1].path.name} (sorted slices {step} and {step + 1} of {len(files)}, {along[step]:.2f} and "
        f"{along[step + 1]:.2f} mm along the normal){extra}; a variable spacing is not a gap, and NIfTI holds one "
        "spacing — split the series where the spacing changes, or resample it to one spacing"
    )


def _slice_direction(
    files: list[SliceFile], positions: np.ndarray, along: np.ndarray, normal: np.ndarray, name: str
) -> np.ndarray:
    """Unit-normal-scaled step direction from first to last slice; not always the normal (gantry tilt shears it)."""
    if len(files) == 1:
        return normal
    direction = (positions[-1] - positions[0]) / (along[-1] - along[0])  # mm moved per mm along the normal
    fitted = positions[0] + np.outer(along - along[0], direction)
    off = np.linalg.norm(positions - fitted, axis=1)
    worst = int(off.argmax())
    if off[worst] > _SAME_POSITION_MM * 10:
        raise MedpipeError(
            f"{files[worst].path}: slice origin is {off[worst]:.2f} mm off the line through the other slices "
            f"({name}); the series mixes stacks — split it"
        )
    return direction


def _gap_message(name: str, missing: list[dict[str, Any]], slices: list[SliceFile | None], step: float) -> str:
    """One line: how many slices are missing, where (LPS mm), and between which files."""
    first = missing[0]["index"]
    before = next(s for s in reversed(slices[:first]) if s is not None)
    after = next(s for s in slices[first:] if s is not None)
    where = ", ".join(str(tuple(m["position_lps_mm"])) for m in missing[:3]) + (" …" if len(missing) > 3 else "")
    return (
        f"{name}: {len(missing)} missing slice(s) in the {step:.3f} mm grid at LPS position {where} "
        f"(first gap between {before.path.name} and {after.path.name})"
    )


def _affine_ras(ds: Dataset, origin_lps: np.ndarray, slice_step_lps: np.ndarray) -> np.ndarray:
    """Voxel (column i, row j, slice k) → RAS mm; DICOM patient coordinates are LPS, so x and y flip sign."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    rows_mm, cols_mm = (float(v) for v in ds.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * cols_mm  # moving along a row (column index i) steps one column spacing
    affine[:3, 1] = iop[3:] * rows_mm  # moving down a column (row index j) steps one row spacing
    affine[:3, 2] = slice_step_lps
    affine[:3, 3] = origin_lps
    return _LPS_TO_RAS @ affine


def load_series(source: str | Path | Series | SeriesLayout, on_gap: str = "error") -> Volume:
    """Load one series (a folder holding exactly one, a found Series, or a checked layout) as an HU volume."""
    if isinstance(source, SeriesLayout):
        layout = source
    elif isinstance(source, Series):
        layout = check_series(source, on_gap)
    else:
        layout = check_series(_only_series(Path(source)), on_gap)
    array = _load_pixels(layout)
    volume = Volume(array, layout.affine, tuple(s.path if s else None for s in layout.slices))
    from medpipe.io.deid import deidentified_sidecar  # deid imports this module's types

    volume.meta = deidentified_sidecar(layout, volume)
    return volume


def _only_series(folder: Path) -> Series:
    """The single image series under `folder`; anything else is an error naming what was found."""
    scan = find_series(folder)
    if scan.damaged:
        bad = scan.damaged[0]
        more = f" (and {len(scan.damaged) - 1} more damaged file(s))" if len(scan.damaged) > 1 else ""
        raise MedpipeError(f"{bad.path}: {bad.reason}{more}; re-export the series or remove the file")
    if not scan.series:  # say why each DICOM file was left out (a multi-frame image, an SR, ...)
        why = next((s for s in scan.skipped if s.reason != "not a DICOM file"), None)
        example = f" ({Path(why.path).name}: {why.reason})" if why else ""
        raise MedpipeError(f"{folder}: no DICOM image series found{example}")
    if len(scan.series) != 1:
        raise MedpipeError(
            f"{folder}: {len(scan.series)} series found (need exactly one); use `medpipe ingest` for a folder tree"
        )
    return scan.series[0]


def _load_pixels(layout: SeriesLayout) -> np.ndarray:
    """Stack the slices as (column, row, slice); int16 when the rescale keeps HU integral and in range."""
    first = layout.first
    rows, cols = int(first.Rows), int(first.Columns)
    stack = np.empty((len(layout.slices), rows, cols), dtype=np.float32)
    integral = True
    present = []
    for k, sl in enumerate(layout.slices):
        if sl is None:
            continue
        stack[k], exact = _decode_hu(sl)
        integral &= exact
        present.append(k)
    if len(present) < len(layout.slices):  # fill missing slices with the darkest value: clearly "no data"
        fill = min(float(stack[k].min()) for k in present)
        for k in set(range(len(layout.slices))) - set(present):
            stack[k] = fill
    info = np.iinfo(np.int16)
    if integral and stack.size and info.min <= stack.min() and stack.max() <= info.max:
        stack = stack.astype(np.int16)
    return stack.transpose(2, 1, 0)  # (slice, row, col) → (i=col, j=row, k=slice); a view, Fortran-ordered


def _decode_hu(sl: SliceFile) -> tuple[np.ndarray, bool]:
    """One slice as (rows, cols) rescaled values (HU for CT), and whether they are whole numbers."""
    ts = getattr(getattr(sl.ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        # pixel_array(path) reads the file's bytes as they lie, so a deflated data set (the whole data set is
        # zlib-compressed after the file meta) must be read, and inflated, by dcmread first
        deflated = ts == pydicom.uid.DeflatedExplicitVRLittleEndian
        raw = pydicom.pixels.pixel_array(pydicom.dcmread(sl.path) if deflated else sl.path)
    except (RuntimeError, NotImplementedError) as exc:  # no pydicom decoder for this transfer syntax
        if ts is None or not ts.is_compressed:
            raise MedpipeError(f"{sl.path}: cannot decode pixel data ({exc})") from exc
        return _decode_with_itk(sl), True
    except Exception as exc:
        raise MedpipeError(f"{sl.path}: cannot read pixel data ({type(exc).__name__}: {exc})") from exc
    slope = _number_or(sl.ds.get("RescaleSlope"), 1.0)
    if slope == 0:
        raise MedpipeError(f"{sl.path}: RescaleSlope 0 would map every pixel to one value; fix the header")
    intercept = _number_or(sl.ds.get("RescaleIntercept"), 0.0)
    values = raw.astype(np.float32)
    if slope != 1:
        values *= slope
    if intercept:
        values += intercept
    return values, bool(slope.is_integer() and intercept.is_integer())


def _number_or(value: Any, default: float) -> float:
    """A numeric header value, `default` when absent or empty (an empty type-2 value means "not given")."""
    return default if value is None or value == "" else float(value)


def _decode_with_itk(sl: SliceFile) -> np.ndarray:
    """Fallback decoder: MONAI's ITKReader (GDCM), which applies RescaleSlope/Intercept itself."""
    from monai.data import ITKReader  # imported here: torch + ITK cost seconds and are rarely needed

    log.info("decoding %s with ITK (pydicom has no decoder for %s)", sl.path, sl.ds.file_meta.TransferSyntaxUID.name)
    reader = ITKReader()
    try:
        array, _ = reader.get_data(reader.read(str(sl.path)))
    except Exception as exc:
        raise MedpipeError(
            f"{sl.path}: neither pydicom nor ITK can decode {sl.ds.file_meta.TransferSyntaxUID.name} "
            f"({exc}); install pylibjpeg or gdcm, or re-export uncompressed"
        ) from exc
    # ITKReader indexes (x=column, y=row); back to pydicom's (row, column)
    return np.asarray(array, dtype=np.float32).reshape(int(sl.ds.Columns), int(sl.ds.Rows)).T
