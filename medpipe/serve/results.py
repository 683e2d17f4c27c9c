"""Structured reports for the node's results (highdicom), in the source study and referencing the source images.

CT: a TID 1500 measurement report (Comprehensive 3D SR) with lung and infection volume in mL and the percent of
lung involved, the values of the run's report.json; where the report has it, the highest slice probability of
infection; and when the volume holds no infection, the finding in words ("no infection detected") as a TEXT item.
CXR / brain MRI: a Comprehensive SR whose measurement group holds one probability per class, with the model's name
and version as the algorithm identification, and, when the route asks for it, the Grad-CAM overlay as a
secondary-capture image.
(The CT DICOM-SEG itself is written by covid_ct_seg's VolumeSegmenter via medpipe.io.dicom_seg.)

What viewers need, beyond the standard's minimum (docs/serve.md, "Viewing the results"):
- Each SR has an image library (TID 1600) of its source images; the CT SR names the DICOM-SEG its volumes come
  from as Pertinent Other Evidence.
- Every measurement (TID 300) is INFERRED FROM a spatial coordinate on a source image: OHIF's SR viewport anchors
  each measurement on an image through that SCOORD and fails on a measurement without one. For a CT volume it is the
  centroid of the region on the slice where the region is largest; for a whole-image classification, the image's
  outline.
- Source headers go through `dicom_seg.prepare_source`: absent type-2 attributes are written empty (de-identified
  series lack PatientName, PatientBirthDate …) and malformed optional references are not copied.
- Each kind of result is its own series per source series: series number = the source's + an offset per kind
  (SEG +1000, measurements SR +2000, classification SR +3000, Grad-CAM +4000), a description naming what it holds,
  and a series UID derived from the source series and the kind, so the SRs of a series' images share one series."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.coding import Code

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write
from medpipe.io.dicom_seg import prepare_source
from medpipe.serve.models import ModelInfo

MILLILITER = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "Percent")
NO_UNITS = Code("1", "UCUM", "no units")
# codes for concepts no public coding scheme names; "99" marks a private coding scheme (PS3.16 8.2)
SCHEME = "99MEDPIPE"
INFECTION_PERCENT = Code("infection_percent_of_lung", SCHEME, "Infection volume as percent of lung volume")
COVID19_INFECTION = Code("840539006", "SCT", "COVID-19")
# series number of each kind of result: the source series' number + this (the DICOM-SEG takes + 1000)
SERIES_OFFSET = {"measurements": 2000, "classification": 3000, "gradcam": 4000}
SOURCE = Code("260753009", "SCT", "Source")  # the concept of an image library entry, as highdicom's ImageLibrary
SEGMENT_LESION_CATEGORY = "49755003"  # SCT Morphologically Abnormal Structure: the SEG's infection segment
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500's container for them
WARNING = Code("warning", SCHEME, "Warning")  # a doubt the node sends with the result (docs/serve.md)
FINDING = Code("finding", SCHEME, "Finding")  # the result in words ("no infection detected"), beside the codes
INFECTION_PROBABILITY = Code("p_infection_max", SCHEME, "Highest slice probability of infection")


def probability_code(class_name: str) -> Code:
    return Code(f"p_{class_name}"[:16], SCHEME, f"Probability of {class_name}")


def result_series(source: pydicom.Dataset, kind: str, info: ModelInfo) -> dict[str, Any]:
    """Series UID, number and description of the `kind` results made from `source`'s series (see the module doc)."""
    from pydicom.uid import generate_uid

    number = int(source.get("SeriesNumber", 0) or 0) + SERIES_OFFSET[kind]
    uid = generate_uid(entropy_srcs=[str(source.get("SeriesInstanceUID", "")), kind, info.name])
    what = {"measurements": "measurements", "classification": "classification",
            "gradcam": "Grad-CAM (not for diagnosis)"}[kind]  # fmt: skip
    return {"series_instance_uid": uid, "series_number": number, "series_description": f"medpipe {info.name} {what}"}


def _read_sources(files: Sequence[str | Path]) -> list[pydicom.Dataset]:
    """Source headers, fit to be copied into a result (`dicom_seg.prepare_source`)."""
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    for ds in sources:
        prepare_source(ds)
    return sources


def _coordinates(source: pydicom.Dataset, points: np.ndarray, graphic_type: str) -> Any:
    """The SCOORD a measurement is INFERRED FROM: (column, row) image coordinates on `source` (TID 320)."""
    import highdicom as hd

    return hd.sr.CoordinatesForMeasurement(
        graphic_type=graphic_type,
        graphic_data=np.asarray(points, dtype=np.float64).reshape(-1, 2),
        source_image=hd.sr.SourceImageForRegion.from_source_image(source),
    )


def _report(
    groups: Sequence[Any], evidence: Sequence[pydicom.Dataset], info: ModelInfo, warnings: Sequence[str] = (),
    findings: Sequence[str] = (),
) -> Any:  # fmt: skip
    """The TID 1500 content: device observer, procedure and measurement groups; `findings` (the result in words) and
    `warnings` (the node's doubts about the result) as TEXT items of a "Qualitative Evaluations" container."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"medpipe {info.name}", model_name=f"{info.name}/{info.network}"
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion
        if str(evidence[0].get("Modality", "")) == "CT"
        else Code("363679005", "SCT", "Imaging"),
        imaging_measurements=list(groups),
    )
    report[0].ContentSequence.insert(_index_of(report[0], codes.DCM.ImagingMeasurements), _image_library(evidence))
    if warnings or findings:
        contains = hd.sr.RelationshipTypeValues.CONTAINS
        evaluations = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type=contains)
        evaluations.ContentSequence = hd.sr.ContentSequence(
            [hd.sr.TextContentItem(name=name, value=text[:1024], relationship_type=contains)
             for name, texts in ((FINDING, findings), (WARNING, warnings)) for text in texts]
        )  # TEXT values hold up to 1024 characters (UT would allow more; 1024 is plenty for one line)
        report[0].ContentSequence.append(evaluations)
    return report


def _image_library(evidence: Sequence[pydicom.Dataset]) -> Any:
    """TID 1600 Image Library: one group listing every source image (OHIF lists the SR's images from it). Without the
    optional TID 1602 descriptors, which highdicom's ImageLibrary derives from attributes (PatientOrientation,
    ImageOrientationPatient …) that a projection radiograph or a wrapped image may lack, and which repeat the images'
    own headers."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    contains = hd.sr.RelationshipTypeValues.CONTAINS
    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=contains)
    group.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.ImageContentItem(name=SOURCE, referenced_sop_class_uid=ds.SOPClassUID,
                                referenced_sop_instance_uid=ds.SOPInstanceUID, relationship_type=contains)
         for ds in evidence]
    )  # fmt: skip
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=contains)
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _index_of(container: Any, name: Code) -> int:
    codes_ = [(item.ConceptNameCodeSequence[0].CodeValue, item.ConceptNameCodeSequence[0].CodingSchemeDesignator)
              for item in container.ContentSequence]  # fmt: skip
    return codes_.index((name.value, name.scheme_designator))


def _algorithm(info: ModelInfo) -> Any:
    import highdicom as hd

    return hd.sr.AlgorithmIdentification(name=f"{info.name}/{info.network}", version=info.version)


def _group(label: str, info: ModelInfo, measurements: Sequence[Any], finding: Code | None = None) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
        algorithm_id=_algorithm(info),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)] if finding is not None else None,
        measurements=list(measurements),
    )


def _save_sr(
    sr_class: Any, evidence: Sequence[pydicom.Dataset], content: Any, path: Path, series: Mapping[str, Any],
    instance_number: int = 1, pertinent: Sequence[pydicom.Dataset] = (),
) -> Path:  # fmt: skip
    """Write the SR; `pertinent`: objects the content does not reference but the results come from (the SEG), as
    Pertinent Other Evidence (SR Document General module)."""
    import highdicom as hd

    sr = sr_class(
        evidence=list(evidence), content=content, sop_instance_uid=hd.UID(), instance_number=instance_number,
        manufacturer="medpipe", is_complete=True, **series,
    )  # fmt: skip
    if pertinent:
        sr.PertinentOtherEvidenceSequence = _hierarchical_references(pertinent)
    return atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))


def _hierarchical_references(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """SOP Instance Reference Macro items, by study and series (Hierarchical SOP Instance Reference Macro)."""
    studies: dict[str, dict[str, list[pydicom.Dataset]]] = {}
    for ds in datasets:
        studies.setdefault(str(ds.StudyInstanceUID), {}).setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    out = []
    for study_uid, series in studies.items():
        study = pydicom.Dataset()
        study.StudyInstanceUID, study.ReferencedSeriesSequence = study_uid, []
        for series_uid, instances in series.items():
            item = pydicom.Dataset()
            item.SeriesInstanceUID, item.ReferencedSOPSequence = series_uid, []
            for ds in instances:
                ref = pydicom.Dataset()
                ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
                item.ReferencedSOPSequence.append(ref)
            study.ReferencedSeriesSequence.append(item)
        out.append(study)
    return out


def _seg_regions(seg_path: Path, evidence: Sequence[pydicom.Dataset]) -> tuple[Any, dict[str, Any]]:
    """The written DICOM-SEG and, per ROI ("lung": every segment, "infection": the lesion segments), the (source,
    centroid) where its area is largest, (None, None) where it is empty."""
    import highdicom as hd

    if not seg_path.is_file():
        raise MedpipeError(f"write_ct_measurement_sr: the DICOM-SEG {seg_path} the SR must reference is missing")
    seg = hd.seg.segread(seg_path)
    lesions = [int(s.SegmentNumber) for s in seg.SegmentSequence
               if str(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue) == SEGMENT_LESION_CATEGORY]  # fmt: skip
    by_uid = {str(ds.SOPInstanceUID): ds for ds in evidence}
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns)).astype(bool)
    planes: dict[str, dict[str, np.ndarray]] = {"lung": {}, "infection": {}}
    for frame, item in zip(pixels, seg.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for roi in ("lung", "infection") if number in lesions else ("lung",):
            planes[roi][uid] = planes[roi].get(uid, np.zeros_like(frame)) | frame
    regions: dict[str, Any] = {}
    for roi, by_source in planes.items():
        uid = max(by_source, key=lambda u: int(by_source[u].sum()), default=None)
        if uid is None or not by_source[uid].any() or uid not in by_uid:
            regions[roi] = (None, None)
            continue
        rows, cols = np.nonzero(by_source[uid])
        regions[roi] = (by_uid[uid], np.array([[cols.mean() + 0.5, rows.mean() + 0.5]]))  # pixel centres
    return seg, regions


def write_ct_measurement_sr(
    volume_entry: Mapping[str, Any], source_files: Sequence[str | Path], info: ModelInfo, path: str | Path,
    warnings: Sequence[str] = (), seg_file: str | Path | None = None,
) -> Path:  # fmt: skip
    """TID 1500 SR with the lung and infection volumes of one report.json volume entry, referencing the DICOM-SEG
    `seg_file` (default: the entry's `dicom_seg` file beside `path`) and the source images."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence = _read_sources(source_files)
    seg_path = Path(seg_file) if seg_file else Path(path).parent / str(volume_entry.get("files", {}).get("dicom_seg"))
    seg, regions = _seg_regions(seg_path, evidence)
    middle = evidence[len(evidence) // 2]
    fallback = (middle, np.array([[int(middle.Columns) / 2, int(middle.Rows) / 2]]))  # an empty lung: image centre
    lung_at = regions["lung"] if regions["lung"][0] is not None else fallback
    infection_at = regions["infection"] if regions["infection"][0] is not None else lung_at  # none: on the lung

    def measurement(name: Code, value: float, unit: Code, at: tuple[pydicom.Dataset, np.ndarray]) -> Any:
        return hd.sr.Measurement(name=name, value=value, unit=unit, referenced_coordinates=[_coordinates(*at, "POINT")])

    lung = measurement(codes.SCT.Volume, float(volume_entry["lung_volume_ml"]), MILLILITER, lung_at)
    infection = [measurement(codes.SCT.Volume, float(volume_entry["infection_volume_ml"]), MILLILITER, infection_at)]
    if volume_entry.get("infection_percent_of_lung") is not None:
        percent = float(volume_entry["infection_percent_of_lung"])
        infection.append(measurement(INFECTION_PERCENT, percent, PERCENT, infection_at))
    if volume_entry.get("infection_probability_max") is not None:
        p = float(volume_entry["infection_probability_max"])
        infection.append(measurement(INFECTION_PROBABILITY, p, NO_UNITS, infection_at))
    # TID 1501 groups, not TID 1411 volumetric ROIs naming the SEG segment: TID 1411 allows no SCOORD under its
    # measurements, which OHIF needs; the SEG is named as pertinent other evidence instead
    groups = [_group("lung", info, [lung], codes.SCT.Lung), _group("infection", info, infection, COVID19_INFECTION)]
    # the finding in words only where the measurements cannot say it (no infection, no lung); infected volumes'
    # SRs keep their earlier form. (OHIF's "stack viewport has been destroyed", first blamed on a coded finding item,
    # later came with this earlier form too: a race in OHIF, tests/test_viewer.py OHIF_VIEWPORT_RACE)
    finding = str(volume_entry.get("finding") or "")
    findings = [finding] if finding and not volume_entry.get("infection_detected", True) else []
    content = _report(groups, evidence, info, warnings, findings)
    series = result_series(evidence[0], "measurements", info)
    return _save_sr(hd.sr.Comprehensive3DSR, evidence, content, Path(path), series, pertinent=[seg])


def write_classification_sr(
    probabilities: Mapping[str, float], source_file: str | Path, info: ModelInfo, path: str | Path,
    warnings: Sequence[str] = (),
) -> Path:  # fmt: skip
    """Comprehensive SR with one probability per class for one source image, each inferred from the whole image."""
    import highdicom as hd

    evidence = _read_sources([source_file])
    source = evidence[0]
    rows, cols = int(source.Rows), int(source.Columns)
    outline = [[0, 0], [cols, 0], [cols, rows], [0, rows], [0, 0]]  # the whole image, as a closed polygon
    measurements = [
        hd.sr.Measurement(name=probability_code(name), value=float(p), unit=NO_UNITS,
                          referenced_coordinates=[_coordinates(source, np.array(outline), "POLYLINE")])
        for name, p in probabilities.items()
    ]  # fmt: skip
    content = _report([_group("classification", info, measurements)], evidence, info, warnings)
    series = result_series(source, "classification", info)
    number = int(source.get("InstanceNumber", 1) or 1)
    return _save_sr(hd.sr.ComprehensiveSR, evidence, content, Path(path), series, instance_number=number)


def read_measurements(sr_path: str | Path) -> dict[str, dict[str, float]]:
    """{group tracking identifier: {measurement meaning: value}} from an SR written here (for tests and status)."""
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    out: dict[str, dict[str, float]] = {}
    for group in [*sr.content.get_image_measurement_groups(), *sr.content.get_volumetric_roi_measurement_groups()]:
        out[str(group.tracking_identifier)] = {str(m.name.meaning): float(m.value) for m in group.get_measurements()}
    return out


def read_findings(sr_path: str | Path) -> dict[str, Any]:
    """{"findings": [the TEXT findings], "warnings": [...]} from an SR written here (for tests and status)."""
    sr = pydicom.dcmread(sr_path)
    out: dict[str, Any] = {"findings": [], "warnings": []}

    def walk(items: Any) -> None:
        for item in items:
            concept = item.get("ConceptNameCodeSequence") or [pydicom.Dataset()]
            name = concept[0].get("CodeValue") or concept[0].get("LongCodeValue")
            if item.ValueType == "TEXT" and name in (FINDING.value, WARNING.value):
                out["findings" if name == FINDING.value else "warnings"].append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return out


def write_gradcam_sc(rgb: np.ndarray, source_file: str | Path, info: ModelInfo, path: str | Path) -> Path:
    """The Grad-CAM overlay as an RGB secondary-capture image in the source study, on the source image's grid.

    PatientOrientation comes from the source; without one, a frontal chest radiograph's display convention (L, F)."""
    import highdicom as hd

    (source,) = _read_sources([source_file])
    orientation = tuple(source.get("PatientOrientation") or ()) or ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
        sop_instance_uid=hd.UID(), instance_number=int(source.get("InstanceNumber", 1) or 1), manufacturer="medpipe",
        **result_series(source, "gradcam", info),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )  # fmt: skip
    # General Series: Laterality is type 2C, required for a paired body part; name the body part (an unpaired chest
    # needs none) and copy the source's laterality where it has one
    for keyword in ("BodyPartExamined", "Laterality"):
        if source.get(keyword):
            setattr(sc, keyword, source.get(keyword))
    return atomic_write(path, lambda tmp: sc.save_as(tmp, enforce_file_format=True))
