"""De-identification of DICOM header values for the JSON sidecars ingestion writes: pseudonymous UIDs,
shifted dates, and every string from the header passed through one explicit policy (`SIDECAR_STRINGS`).

Policies: "code" is a technical code string (CS-like: upper-case letters, digits, space, `_`, `-`, `.`, `+`,
`\\`, at most 16 characters per value, e.g. BodyPartExamined "CHEST", PatientPosition "HFS"); a value that does
not look like one (e.g. "CHEST - J SMITH") is cleaned as free text. "text" is free text (descriptions, protocol
and device names): identifier values found anywhere in the header, person-name syntax (A^B), dates and long digit
runs (MRNs, accession numbers) are blanked. Both policies blank identifier values, since a code string can be
abused to hold a name too."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from medpipe.io.dicom import SeriesLayout, Volume

log = logging.getLogger(__name__)

# PS3.15 basic profile, as an allow-list: only technical attributes reach the sidecar, so names, IDs, birth dates,
# institution, physicians, accession numbers, UIDs and dates (unless shifted) never do.
DEID_METHOD = "DICOM PS3.15 Basic Application Confidentiality Profile (allow-list of technical attributes)"
# sidecar key -> (DICOM keyword, policy): the only header strings that reach the sidecar
SIDECAR_STRINGS: dict[str, tuple[str, str]] = {
    "series_description": ("SeriesDescription", "text"),
    "study_description": ("StudyDescription", "text"),
    "protocol_name": ("ProtocolName", "text"),
    "manufacturer": ("Manufacturer", "text"),
    "manufacturer_model_name": ("ManufacturerModelName", "text"),
    "convolution_kernel": ("ConvolutionKernel", "code"),
    "body_part_examined": ("BodyPartExamined", "code"),
    "patient_position": ("PatientPosition", "code"),
}
_CODE = re.compile(r"[A-Z0-9 _.+\-]{0,16}")
# attributes whose values must not appear inside the free-text fields we keep (Clean Descriptors option)
_IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansOfRecord",
    "RequestingPhysician",
    "OperatorsName",
    "StationName",
    "StudyID",
    "DeviceSerialNumber",
)
_DATE_LIKE = re.compile(r"\b(19|20)\d{2}[-/.]?\d{2}[-/.]?\d{2}\b|\b\d{1,2}[-/.]\d{1,2}[-/.](19|20)?\d{2}\b")
_PERSON_NAME = re.compile(r"[^\s^=]*\^[^\s=]*")  # DICOM PN syntax: Family^Given^Middle
_LONG_NUMBER = re.compile(r"\d{6,}")  # record, accession and phone numbers; no technical value needs six digits
# identifier values shorter than this (in a script with spaces between words) are only removed as whole words
_MIN_SUBSTRING = 3


def deidentified_sidecar(layout: SeriesLayout, volume: Volume, date_shift_days: int | None = None) -> dict[str, Any]:
    """The JSON sidecar: geometry and acquisition technique, with identifiers removed and dates dropped or shifted."""
    ds = layout.first
    shape = [int(v) for v in volume.array.shape]
    sidecar: dict[str, Any] = {
        "modality": str(ds.get("Modality", "")),
        "shape": shape,
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "affine_ras": np.round(volume.affine, 6).tolist(),
        "dtype": str(volume.array.dtype),
        "units": "HU" if ds.get("Modality") == "CT" else str(ds.get("RescaleType", "")),
        "slice_thickness_mm": _number(ds.get("SliceThickness")),
        "series_number": _number(ds.get("SeriesNumber")),
        "n_source_files": sum(s is not None for s in layout.slices),
        "series_uid_pseudonym": pseudonym_uid(layout.series.uid),
    }
    forbidden = _identifier_strings(ds)
    for key, (keyword, policy) in SIDECAR_STRINGS.items():
        sidecar[key] = clean_value(_as_text(ds.get(keyword, "")), policy, forbidden)
    sidecar["kvp"] = _number(ds.get("KVP"))
    sidecar["gantry_detector_tilt_deg"] = _number(ds.get("GantryDetectorTilt"))  # also in the geometry, if honest
    if layout.missing:
        sidecar["missing_slices"] = layout.missing
    burned_in = burned_in_files(f.ds for f in layout.slices if f is not None)
    study_date = _parse_date(str(ds.get("StudyDate", "")))
    if date_shift_days is not None and study_date is not None:
        sidecar["study_date_shifted"] = (study_date + timedelta(days=int(date_shift_days))).isoformat()
    sidecar["deidentification"] = {
        "method": DEID_METHOD,
        "dates": f"shifted by {int(date_shift_days)} days" if date_shift_days is not None else "removed",
        # DCM codes for PS3.15 options: basic profile, clean descriptors, (modified dates when shifted)
        "codes": ["113100", "113105"] + (["113107"] if date_shift_days is not None else []),
    }
    if burned_in:  # only reached with an explicit opt-in (ingest's allow_burned_in): say so where the data go
        sidecar["burned_in_annotation"] = True
        sidecar["deidentification"]["pixel_data"] = (
            f"BurnedInAnnotation YES in {burned_in} file(s): identifying text may remain in the pixels "
            "(not removed; no Clean Pixel Data option, code 113101)"
        )
    return sidecar


def burned_in_files(headers: Iterable[Dataset]) -> int:
    """How many images declare BurnedInAnnotation YES: text in the pixels (names, IDs, dates) that a header-only
    de-identification cannot remove (PS3.15 Clean Pixel Data option)."""
    return sum(str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES" for ds in headers)


def pseudonym_uid(uid: str) -> str:
    """A stable replacement UID (2.25 + 128-bit hash): the same series always maps to the same pseudonym."""
    return "2.25." + str(int(hashlib.sha256(uid.encode()).hexdigest()[:32], 16))


def clean_value(text: str, policy: str, forbidden: Sequence[str]) -> str:
    """One sidecar string under its policy ("code" or "text", see the module docstring)."""
    if policy not in ("code", "text"):
        raise ValueError(f"unknown de-identification policy {policy!r}")
    if policy == "code" and all(_CODE.fullmatch(part) for part in text.split("\\")):
        return clean_identifiers(text, forbidden)
    return clean_text(text, forbidden)


def clean_identifiers(text: str, forbidden: Sequence[str]) -> str:
    """Blank out every identifier value found in the header, in one pass (longest first), ignoring case.

    A value of three or more characters, or any value in a script without spaces between words (CJK names have
    parts of one or two characters, written without spaces: 山田太郎), is removed wherever it occurs; a shorter
    Latin value ("Li", "X") only as a whole word, so "Li^Bo" does not also remove the "li" of "liver"."""
    alternatives = []
    for value in sorted(forbidden, key=len, reverse=True):
        pattern = re.escape(value)
        if len(value) < _MIN_SUBSTRING and value.isascii():
            pattern = rf"(?<![^\W_]){pattern}(?![^\W_])"  # a whole word: no letter or digit on either side
        alternatives.append(pattern)
    if not alternatives:
        return text
    # one pass, so a value is never found inside the "[removed]" that replaced a longer one
    return re.sub("|".join(alternatives), "[removed]", text, flags=re.IGNORECASE)


def clean_text(text: str, forbidden: Sequence[str]) -> str:
    """Blank out identifiers, person names (A^B), dates and long numbers in a free-text field (PS3.15 Clean
    Descriptors, best effort: a name typed in free text that appears nowhere else in the header can survive)."""
    text = clean_identifiers(text, forbidden)
    text = _PERSON_NAME.sub(lambda m: "[removed]" if m.group(0).strip("^") else m.group(0), text)
    text = _DATE_LIKE.sub("[date]", text)
    return _LONG_NUMBER.sub("[number]", text).strip()


def _identifier_strings(ds: Dataset) -> list[str]:
    """Every name part, ID and similar value in the header. Person names count whatever their length (a one-letter
    given name, a CJK family name of one or two characters) and in every component group (alphabetic,
    ideographic, phonetic: "Yamada^Tarou=山田^太郎=やまだ^たろう"); other values from 3 characters (a StudyID "1"
    identifies no one, and blanking every "1" would wreck the descriptions)."""
    out: set[str] = set()
    for keyword in _IDENTIFYING:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        shortest = 1 if pydicom.datadict.dictionary_VR(keyword) == "PN" else _MIN_SUBSTRING
        values = value if isinstance(value, pydicom.multival.MultiValue) else [value]
        for v in values:
            text = str(v)
            parts = [text, *text.split("="), *re.split(r"[\^=\s,]+", text)]  # whole, each group (山田^太郎), parts
            out.update(p.strip() for p in parts if len(p.strip()) >= shortest)
    return sorted(out)


def _as_text(value: Any) -> str:
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _number(value: Any) -> float | int | None:
    if value is None or value == "":
        return None
    number = float(value)
    return int(number) if number.is_integer() else number


def _parse_date(text: str) -> date | None:
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return None
