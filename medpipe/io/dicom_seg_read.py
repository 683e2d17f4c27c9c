"""DICOM-SEG read back as a label volume on the grid of the series it segments (highdicom), the reverse of
medpipe.io.dicom_seg.write_dicom_seg.

A SEG (what PACS, 3D Slicer or OHIF export) holds one binary frame per source slice and segment; each frame names
its source slice by ReferencedSOPInstanceUID. The frames are placed by that UID, never by their order or position
alone, so the label lands on exactly the voxels of the series `medpipe.io.dicom.load_series` read; a label value is
the segment's number (its name is the segment's SegmentLabel). Refused, each in one line: a SEG of another series,
frames naming slices the series lacks, fractional segments, segments that overlap (one value per voxel)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medpipe.errors import MedpipeError
from medpipe.io.dicom import Volume


@dataclass(frozen=True)
class SegHeader:
    """What a SEG says about itself: its segments (number -> SegmentLabel) and the series it references."""

    path: Path
    segments: dict[int, str]
    series_uids: tuple[str, ...]
    segmentation_type: str
    patient_id: str = ""  # the SEG's PatientID (a SEG carries its source series' patient module)


def is_seg_file(path: Path) -> bool:
    """Whether `path` is a DICOM file with Modality SEG (headers only; anything unreadable is not one)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return False
    return str(ds.get("Modality", "")) == "SEG"


def read_seg_header(path: str | Path) -> SegHeader:
    """The segments and referenced series of the SEG at `path` (pixel data not read)."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise MedpipeError(f"{path}: not a readable DICOM file ({type(exc).__name__})") from None
    if str(ds.get("Modality", "")) != "SEG":
        raise MedpipeError(f"{path}: Modality {ds.get('Modality', '(none)')}, not a DICOM-SEG (SEG)")
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "") or f"segment {s.SegmentNumber}")
                for s in ds.get("SegmentSequence", [])}  # fmt: skip
    series = tuple(str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", []))
    return SegHeader(path, segments, series, str(ds.get("SegmentationType", "")), str(ds.get("PatientID", "")).strip())


def _frame_sources(ds: pydicom.Dataset) -> list[str]:
    """The ReferencedSOPInstanceUID of each frame's source slice ("" when a frame names none)."""
    uids = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        refs = [src.ReferencedSOPInstanceUID for der in frame.get("DerivationImageSequence", [])
                for src in der.get("SourceImageSequence", [])]  # fmt: skip
        uids.append(str(refs[0]) if refs else "")
    return uids


def read_seg_labels(path: str | Path, image: Volume) -> Volume:
    """The SEG at `path` as a label volume on `image`'s grid (a DICOM-loaded volume): value = segment number, 0
    where no segment is; uint8 (uint16 past 255 segments)."""
    import highdicom as hd  # imported here: only the DICOM-SEG layout needs it

    path = Path(path)
    header = read_seg_header(path)
    if header.segmentation_type != "BINARY":
        raise MedpipeError(f"{path}: SegmentationType {header.segmentation_type or '(none)'}; medpipe reads binary "
                           "segments only (a fractional SEG has no one label per voxel)")  # fmt: skip
    if not image.source_files or not any(image.source_files):
        raise MedpipeError(f"{path}: the image it labels was not read from a DICOM series")
    slices = [pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SeriesInstanceUID"])
              if f is not None else None for f in image.source_files]  # fmt: skip
    series_uid = str(next(s for s in slices if s is not None).SeriesInstanceUID)
    if series_uid not in header.series_uids:
        raise MedpipeError(f"{path}: references series {', '.join(header.series_uids) or '(none)'}, not the series "
                           f"beside it ({series_uid})")  # fmt: skip
    present = {str(s.SOPInstanceUID): k for k, s in enumerate(slices) if s is not None}
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # highdicom raises several types for a malformed SEG
        raise MedpipeError(f"{path}: highdicom cannot read it ({type(exc).__name__}: {exc})") from None
    sources = _frame_sources(seg)
    unplaced = [uid for uid in sources if uid not in present]
    if unplaced:
        what = "name no source slice" if "" in unplaced else f"reference instance(s) the series lacks ({unplaced[0]})"
        raise MedpipeError(f"{path}: {len(unplaced)} of {len(sources)} frame(s) {what}")
    rows, cols = image.array.shape[1], image.array.shape[0]  # the volume is indexed (column, row, slice)
    if (int(seg.Rows), int(seg.Columns)) != (rows, cols):
        raise MedpipeError(f"{path}: frames of {seg.Rows} × {seg.Columns} pixels, the series' slices {rows} × {cols}")
    numbers = sorted(header.segments)
    uids = sorted(present, key=present.get)  # type: ignore[arg-type]
    try:
        pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=False,
                                                   assert_missing_frames_are_empty=True, dtype=np.uint8)  # fmt: skip
    except Exception as exc:
        raise MedpipeError(f"{path}: highdicom cannot place its frames ({type(exc).__name__}: {exc})") from None
    overlap = int((pixels.sum(axis=-1, dtype=np.int64) > 1).sum())
    if overlap:
        raise MedpipeError(f"{path}: {overlap:,} voxel(s) lie in more than one segment; medpipe needs one label per "
                           "voxel (export the segments without overlap)")  # fmt: skip
    dtype = np.uint8 if max(numbers, default=0) <= 255 else np.uint16
    values = (pixels.astype(dtype) * np.asarray(numbers, dtype=dtype)).sum(axis=-1, dtype=dtype)  # (slice, row, col)
    labels = np.zeros(image.array.shape, dtype=dtype)
    labels[:, :, [present[u] for u in uids]] = values.transpose(2, 1, 0)
    return Volume(labels, np.asarray(image.affine, dtype=float).copy())
