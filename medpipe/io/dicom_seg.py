"""DICOM-SEG output for volumetric CT segmentations (highdicom), referencing the source series."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from nibabel.orientations import axcodes2ornt

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write
from medpipe.io.dicom import Volume

# (window level, window width) in HU
WINDOWS: dict[str, tuple[float, float]] = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0)}
# axis codes of the display grid: array axes (x, y, z) point to patient Left, Posterior, Superior
_DISPLAY = axcodes2ornt(("L", "P", "S"))


# ----------------------------------------------------------------------------------------------------------- loading




def write_dicom_seg(
    mask: np.ndarray,
    volume: Volume,
    path: str | Path,
    labels: Mapping[int, str],
    property_types: Mapping[int, pydicom.sr.coding.Code] | None = None,
    algorithm: str = "medpipe",
    series_description: str = "medpipe segmentation",
) -> Path:
    """Write the mask as a binary DICOM-SEG referencing the volume's source series (DICOM-loaded volumes only).

    `labels` names each label value (e.g. {1: "lung", 2: "lesion"}); `property_types` gives SNOMED codes per label
    (default: SCT "Tissue"). The SEG copies patient and study from the source, as PACS expects: it is not
    de-identified.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames, sources = _seg_frames(np.asarray(mask), volume)
    numbers = sorted(int(k) for k in labels)
    unknown = sorted(set(np.unique(frames).tolist()) - {0, *numbers})
    if unknown:
        raise MedpipeError(f"write_dicom_seg: mask has label(s) {unknown} that `labels` does not name")
    lut = np.zeros(256, dtype=np.uint8)
    for segment, label in enumerate(numbers, start=1):  # SEG segment numbers must run 1..N
        lut[label] = segment
    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=algorithm, version=_version(), family=codes.cid7162.ArtificialIntelligence
    )
    property_types = property_types or {}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=segment,
            segment_label=str(labels[label]),
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=property_types.get(label, codes.SCT.Tissue),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_id,
        )
        for segment, label in enumerate(numbers, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lut[frames],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(sources[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medpipe",
        manufacturer_model_name=algorithm,
        software_versions=_version(),
        device_serial_number="none",
        series_description=series_description,
    )
    return atomic_write(Path(path), lambda tmp: seg.save_as(tmp))


def _seg_frames(mask: np.ndarray, volume: Volume) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Mask frames (rows, cols) paired with the source DICOM headers; filled gap slices have no source and drop out."""
    if not volume.source_files:
        raise MedpipeError("write_dicom_seg: the volume has no source DICOM files (from NIfTI?); load the DICOM series")
    if mask.shape != volume.array.shape:
        raise MedpipeError(f"write_dicom_seg: mask shape {mask.shape} differs from volume shape {volume.array.shape}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise MedpipeError("write_dicom_seg: mask labels must be 0..255")
    frames = mask.astype(np.uint8).transpose(2, 1, 0)  # (i=col, j=row, k) → (k, row, col), the source frame layout
    keep = [k for k, f in enumerate(volume.source_files) if f is not None]
    sources = [pydicom.dcmread(volume.source_files[k], stop_before_pixels=True) for k in keep]
    return np.ascontiguousarray(frames[keep]), sources


def _version() -> str:
    from medpipe import __version__

    return __version__
