"""Structured reports for the node's results (highdicom), in the source study and referencing the source images.

CT: a TID 1500 measurement report (Comprehensive 3D SR) with lung and infection volume in mL and the percent of
lung involved, the values of the run's report.json. CXR / brain MRI: a Comprehensive SR whose measurement group
holds one probability per class, with the model's name and version as the algorithm identification, and, when the
route asks for it, the Grad-CAM overlay as a secondary-capture image.
(The CT DICOM-SEG itself is written by covid_ct_seg's VolumeSegmenter via medpipe.io.dicom_seg.)"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.sr.coding import Code

from medpipe.files import atomic_write
from medpipe.serve.models import ModelInfo

MILLILITER = Code("mL", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "Percent")
NO_UNITS = Code("1", "UCUM", "no units")
# codes for concepts no public coding scheme names; "99" marks a private coding scheme (PS3.16 8.2)
SCHEME = "99MEDPIPE"
INFECTION_PERCENT = Code("infection_percent_of_lung", SCHEME, "Infection volume as percent of lung volume")
COVID19_INFECTION = Code("840539006", "SCT", "COVID-19")
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9001, 9002


def probability_code(class_name: str) -> Code:
    return Code(f"p_{class_name}"[:16], SCHEME, f"Probability of {class_name}")


def _report(groups: Sequence[Any], evidence: Sequence[pydicom.Dataset], info: ModelInfo) -> Any:
    """The TID 1500 content: device observer, procedure and measurement groups."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"medpipe {info.name}", model_name=f"{info.name}/{info.network}"
        ),
    )
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.cid100.CTUnspecifiedBodyRegion
        if str(evidence[0].get("Modality", "")) == "CT"
        else Code("363679005", "SCT", "Imaging"),
        imaging_measurements=list(groups),
    )  # no image library: optional in TID 1500, slow for 100s of slices; the evidence sequence names every image


def _group(label: str, info: ModelInfo, measurements: Sequence[Any], finding: Code | None = None) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label),
        algorithm_id=hd.sr.AlgorithmIdentification(name=f"{info.name}/{info.network}", version=info.version),
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)] if finding is not None else None,
        measurements=list(measurements),
    )


def _save_sr(sr_class: Any, evidence: Sequence[pydicom.Dataset], content: Any, path: Path, description: str) -> Path:
    import highdicom as hd

    sr = sr_class(
        evidence=list(evidence), content=content, series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medpipe", is_complete=True,
        series_description=description,
    )  # fmt: skip
    return atomic_write(path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))


def write_ct_measurement_sr(
    volume_entry: Mapping[str, Any], source_files: Sequence[str | Path], info: ModelInfo, path: str | Path
) -> Path:
    """TID 1500 SR with the lung and infection volumes of one report.json volume entry."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    evidence = [pydicom.dcmread(f, stop_before_pixels=True) for f in source_files]
    lung = hd.sr.Measurement(name=codes.SCT.Volume, value=float(volume_entry["lung_volume_ml"]), unit=MILLILITER)
    infection = [
        hd.sr.Measurement(name=codes.SCT.Volume, value=float(volume_entry["infection_volume_ml"]), unit=MILLILITER)
    ]
    if volume_entry.get("infection_percent_of_lung") is not None:
        infection.append(
            hd.sr.Measurement(
                name=INFECTION_PERCENT, value=float(volume_entry["infection_percent_of_lung"]), unit=PERCENT
            )
        )
    groups = [_group("lung", info, [lung], codes.SCT.Lung), _group("infection", info, infection, COVID19_INFECTION)]
    content = _report(groups, evidence, info)
    return _save_sr(hd.sr.Comprehensive3DSR, evidence, content, Path(path), f"{info.name} lung volumes")


def write_classification_sr(
    probabilities: Mapping[str, float], source_file: str | Path, info: ModelInfo, path: str | Path
) -> Path:
    """Comprehensive SR with one probability per class for one source image."""
    import highdicom as hd

    evidence = [pydicom.dcmread(source_file, stop_before_pixels=True)]
    measurements = [
        hd.sr.Measurement(name=probability_code(name), value=float(p), unit=NO_UNITS)
        for name, p in probabilities.items()
    ]
    content = _report([_group("classification", info, measurements)], evidence, info)
    return _save_sr(hd.sr.ComprehensiveSR, evidence, content, Path(path), f"{info.name} class probabilities")


def read_measurements(sr_path: str | Path) -> dict[str, dict[str, float]]:
    """{group tracking identifier: {measurement meaning: value}} from an SR written here (for tests and status)."""
    import highdicom as hd

    sr = hd.sr.srread(sr_path)
    out: dict[str, dict[str, float]] = {}
    for group in sr.content.get_image_measurement_groups():
        out[str(group.tracking_identifier)] = {str(m.name.meaning): float(m.value) for m in group.get_measurements()}
    return out


def write_gradcam_sc(rgb: np.ndarray, source_file: str | Path, info: ModelInfo, path: str | Path) -> Path:
    """The Grad-CAM overlay as an RGB secondary-capture image in the source study, on the source image's grid.

    PatientOrientation comes from the source; without one, a frontal chest radiograph's display convention (L, F)."""
    import highdicom as hd

    source = pydicom.dcmread(source_file, stop_before_pixels=True)
    orientation = tuple(source.get("PatientOrientation") or ()) or ("L", "F")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=np.ascontiguousarray(rgb, dtype=np.uint8), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation,
        series_instance_uid=hd.UID(), series_number=SC_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="medpipe", series_description=f"{info.name} Grad-CAM (not for diagnosis)",
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )  # fmt: skip
    return atomic_write(path, lambda tmp: sc.save_as(tmp, enforce_file_format=True))
