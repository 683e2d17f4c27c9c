"""DICOM-SEG output for volumetric CT segmentations (highdicom), referencing the source series.

Derived objects copy the patient and study modules from their source. De-identified research series often lack
type-2 attributes (PatientName, PatientID, StudyID, AccessionNumber, ReferringPhysicianName, StudyDate/Time …);
the standard lets a type-2 attribute be present with an empty value, so the SEG gets empty values — no invented
identities. The identifiers a SEG must point at (type 1: Study/Series/SOP Instance UIDs, Frame of Reference UID)
cannot be filled that way: without them the SEG could not be tied to its images, so `seg_blocker` names what is
missing and the caller decides (volumetric inference then skips the SEG and says so in its report).
Optional reference sequences a source may carry malformed (a ReferencedStudySequence item without its
ReferencedSOPClassUID) are not copied as they are: `prepare_source` drops the broken items, so every derived object
(SEG, SR, secondary capture) passes dciodvfy.

Segments are coded as PS3.16 asks (CID 7150 category, CID 7151 / 7159 type): a label named "lung…" is the anatomical
structure Lung, one naming an infection, lesion, consolidation or opacity is a morphologically abnormal structure of
type Lesion in the lung; each gets a recommended display colour (lesions warm, lung cool), so viewers such as OHIF
draw them apart."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import UID

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write
from medpipe.io.dicom import Volume
from medpipe.io.dicom_scan import invalid_uid_messages

# type-2 attributes of the Patient and General Study modules that highdicom copies from the source image
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# type-3 reference sequences of the Patient and General Study modules that highdicom copies from the source; each item
# is a SOP Instance Reference Macro whose two UIDs are type 1
COPIED_REFERENCE_SEQUENCES = ("ReferencedStudySequence", "ReferencedPatientSequence")
# type-1 identifiers a SEG references: per slice (SOP instance) and per series
_TYPE1_PER_SLICE = ("SOPInstanceUID",)
_TYPE1_PER_SERIES = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


@dataclass(frozen=True)
class SegmentCoding:
    """How one segment is coded and drawn: PS3.16 category (CID 7150) and type (CID 7151 / 7159), an optional
    anatomic region, and the recommended display colour as sRGB (written as CIELab)."""

    category: pydicom.sr.coding.Code
    type: pydicom.sr.coding.Code
    rgb: tuple[int, int, int]
    anatomic_region: pydicom.sr.coding.Code | None = None


LESION_WORDS = re.compile(r"\b(infection|lesion|consolidation|ground[- ]glass|opacity|opacities|ggo|covid)", re.I)


def segment_coding(label: str) -> SegmentCoding:
    """The coding of a segment named `label`: lung (cool blue), an infection / lesion in the lung (warm orange), or
    generic tissue (grey). "lung (not infected)" is lung: only the nouns of a finding count, not "infected"."""
    from pydicom.sr.codedict import codes

    if LESION_WORDS.search(label):
        return SegmentCoding(
            codes.cid7150.MorphologicallyAbnormalStructure, codes.cid7159.Lesion, (255, 110, 0), codes.SCT.Lung
        )
    if re.match(r"\s*lungs?\b", label, re.I):
        return SegmentCoding(codes.cid7150.AnatomicalStructure, codes.SCT.Lung, (30, 144, 255))
    return SegmentCoding(codes.cid7150.Tissue, codes.SCT.Tissue, (128, 128, 128))


def write_dicom_seg(
    mask: np.ndarray,
    volume: Volume,
    path: str | Path,
    labels: Mapping[int, str],
    property_types: Mapping[int, pydicom.sr.coding.Code] | None = None,
    algorithm: str = "medpipe",
    series_description: str = "medpipe segmentation",
    codings: Mapping[int, SegmentCoding] | None = None,
) -> Path:
    """Write the mask as a binary DICOM-SEG referencing the volume's source series (DICOM-loaded volumes only).

    `labels` names each label value (e.g. {1: "lung", 2: "lesion"}); each segment's codes and display colour come
    from `codings` or else from its name (`segment_coding`); `property_types` overrides just the type code. The SEG
    copies patient and study from the source, as PACS expects: it is not de-identified.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    frames, sources = _seg_frames(np.asarray(mask), volume)
    blocker = seg_blocker(sources)
    if blocker:
        raise MedpipeError(f"write_dicom_seg: {blocker}")
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
    property_types, codings = property_types or {}, codings or {}
    descriptions = []
    for segment, label in enumerate(numbers, start=1):
        coding = codings.get(label) or segment_coding(str(labels[label]))
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=segment,
                segment_label=str(labels[label]),
                segmented_property_category=coding.category,
                segmented_property_type=property_types.get(label, coding.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                anatomic_regions=[coding.anatomic_region] if coding.anatomic_region is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(*coding.rgb),
            )
        )
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
        omit_empty_frames=False,  # one frame per slice and segment: viewers and tests can count on the layout
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
    for ds in sources:
        prepare_source(ds)
    return np.ascontiguousarray(frames[keep]), sources


def volume_seg_blocker(volume: Volume) -> str | None:
    """Why no DICOM-SEG can be written for this DICOM-loaded volume (see `seg_blocker`), or None."""
    with invalid_uid_messages():  # pydicom warns per file on malformed UIDs; the blocker's message names them once
        sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.source_files if f is not None]
        return seg_blocker(sources) if sources else "the volume has no source DICOM files"


def fill_type2(ds: pydicom.Dataset) -> list[str]:
    """Add the absent type-2 patient/study attributes with empty values (in memory); return the keywords added."""
    added = [keyword for keyword in TYPE2_COPIED if keyword not in ds]
    for keyword in added:
        setattr(ds, keyword, "")
    return added


def drop_malformed_references(ds: pydicom.Dataset) -> list[str]:
    """Drop the items of the copied reference sequences (COPIED_REFERENCE_SEQUENCES) that lack a valid
    ReferencedSOPClassUID or ReferencedSOPInstanceUID, and a sequence left empty (all are type 3, so leaving them out
    is valid; a broken one copied would make every derived object fail validation). Returns what was dropped."""
    dropped = []
    for keyword in COPIED_REFERENCE_SEQUENCES:
        if keyword not in ds:
            continue
        items = list(ds[keyword].value or [])
        kept = [
            item
            for item in items
            if all(_valid_uid(item, k) for k in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID"))
        ]
        if len(kept) < len(items):
            dropped.append(f"{keyword}: {len(items) - len(kept)} item(s) without valid referenced SOP UIDs")
        if kept:
            ds[keyword].value = kept
        else:
            del ds[keyword]
    return dropped


def prepare_source(ds: pydicom.Dataset) -> list[str]:
    """Make a source header fit to be copied into a derived object (in memory): empty type-2 attributes added
    (`fill_type2`), malformed optional references dropped (`drop_malformed_references`). Returns what changed."""
    return [f"{k} added empty" for k in fill_type2(ds)] + drop_malformed_references(ds)


def prepare_sources(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    for ds in datasets:
        prepare_source(ds)
    return list(datasets)


def _valid_uid(ds: pydicom.Dataset, keyword: str) -> bool:
    value = str(ds.get(keyword, "") or "")
    return bool(value) and UID(value).is_valid


def seg_blocker(sources: list[pydicom.Dataset]) -> str | None:
    """Why a DICOM-SEG cannot reference these source headers (missing or malformed type-1 UIDs), or None."""
    problems = []
    for keyword in _TYPE1_PER_SERIES + _TYPE1_PER_SLICE:
        scope = sources if keyword in _TYPE1_PER_SLICE else sources[:1]
        bad = [str(ds.get(keyword, "") or "") for ds in scope if not UID(str(ds.get(keyword, "") or "")).is_valid]
        if bad:
            what = f"'{bad[0]}' is not a valid UID" if bad[0] else "is empty"
            problems.append(f"{keyword} {what}" + (f" in {len(bad)} of {len(scope)} files" if len(scope) > 1 else ""))
    if problems:
        return (
            f"the source series' type-1 identifiers are unusable ({'; '.join(problems)}), so a DICOM-SEG could not "
            "reference its images; the NIfTI masks hold the result"
        )
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    if len(set(uids)) < len(uids):
        return "the source slices share SOPInstanceUIDs, so a DICOM-SEG could not tell its frames' images apart"
    return None


def _version() -> str:
    from medpipe import __version__

    return __version__
