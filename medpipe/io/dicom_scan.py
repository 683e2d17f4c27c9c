"""Scanning a DICOM folder under one strict reader policy: every file under a DICOM folder is exactly one of
not DICOM (ignored, counted), a complete DICOM file (used or skipped for a stated reason), or a damaged DICOM file
(an error, or skipped and listed with `skip_invalid`) — never a damaged file mistaken for "not an image".

pydicom reads leniently: a file cut inside its header parses as a shorter data set (no ImagePositionPatient, no
pixel data), and garbage after the DICM marker parses as one bogus element. So a file that claims to be DICOM (the
DICM marker, or a raw data set that starts with group 0002/0008) must also be whole: file meta information present,
a SOP Class in the data set, the last element ending exactly at the end of the file, and pixel data in every image.
A raw data set without the Part 10 header is reported the same way: its pixels cannot be decoded reliably, and
skipping it quietly would leave its series a slice short.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from medpipe.errors import MedpipeError

log = logging.getLogger("medpipe.io.dicom")  # one logger for scanning and loading, as callers filter on it
# values longer than this stay on disk until needed, so scanning a tree reads headers only
_DEFER_BYTES = 4096
INVALID_UID = "Invalid value for VR UI"  # pydicom's message for a non-conformant UID (UUID-style, some sets)


class _Collect(logging.Filter):
    """Drop, and keep, the log records of one pydicom message."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.messages = text, []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.text in record.getMessage():
            self.messages.append(record.getMessage())
            return False
        return True


@contextlib.contextmanager
def invalid_uid_messages() -> Iterator[list[str]]:
    """Inside: pydicom's per-file "Invalid value for VR UI" is neither warned nor logged; the list it yields gets
    each message, so the caller can say it once. pydicom sends it both ways (`warn_and_log`): a bundle's logging.conf
    prints the log record of every file (133 lines for one COVID-CT-MD series) even where the warning is caught."""
    collect = _Collect(INVALID_UID)
    pydicom_log = logging.getLogger("pydicom")
    pydicom_log.addFilter(collect)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=INVALID_UID)
            yield collect.messages
    finally:
        pydicom_log.removeFilter(collect)

PIXEL_DATA = 0x7FE00010
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR: a complete file without a SOP Class in its data set
_UNDEFINED_LENGTH = 0xFFFFFFFF
_DEFLATED = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"}
# a Sequence Delimitation Item (FFFE,E0DD) with zero length, little and big endian: ends undefined-length values
_DELIMITERS = (b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", b"\xff\xfe\xe0\xdd\x00\x00\x00\x00")


@dataclass
class HeaderRead:
    """One file as the policy sees it: `ds` is None for files that are not DICOM or cannot be parsed at all."""

    path: Path
    ds: Dataset | None
    damage: str | None = None  # why a DICOM file cannot be trusted (truncated, garbage, pixel data short)

    @property
    def is_dicom(self) -> bool:
        return self.ds is not None or self.damage is not None

    @property
    def series_uid(self) -> str | None:
        """The SeriesInstanceUID when the header got that far, to tie a damaged file to its series."""
        if self.ds is None or "SeriesInstanceUID" not in self.ds:
            return None
        try:
            return str(self.ds.SeriesInstanceUID) or None
        except Exception:  # a garbled value in a damaged file
            return None


def _claims_dicom(head: bytes) -> tuple[bool, bool]:
    """(claims DICOM, has the Part 10 preamble): the DICM marker, or a raw data set starting with group 0002/0008."""
    if head[128:132] == b"DICM":
        return True, True
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False, False
    explicit_vr = head[4:6].isalpha() and head[4:6].isupper()
    implicit_length = int.from_bytes(head[4:8], "little") < 1024  # group 0008 values are short
    return explicit_vr or implicit_length, False


def read_header(path: str | Path, defer_size: int = 4096) -> HeaderRead:
    """Read a file's header (values over `defer_size` bytes stay on disk) and judge it by the policy above."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(132)
    claims, preamble = _claims_dicom(head)
    if not claims:
        return HeaderRead(path, None)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=defer_size, force=not preamble)
    except Exception as exc:  # pydicom raises many types on broken files; all mean "cannot read this one"
        return HeaderRead(path, None, f"damaged DICOM file, unreadable ({type(exc).__name__}: {exc})")
    early_end = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    if early_end:
        return HeaderRead(path, ds, f"damaged DICOM file, truncated ({early_end[0]})")
    return HeaderRead(path, ds, _damage(path, ds, preamble))


def _damage(path: Path, ds: Dataset, preamble: bool) -> str | None:
    """Why a parsed DICOM file is not whole, or None."""
    meta = getattr(ds, "file_meta", None)
    if preamble and not ({"TransferSyntaxUID", "MediaStorageSOPClassUID"} & set(_keywords(meta))):
        return (
            "damaged DICOM file: the file meta information after the DICM marker is missing or garbled "
            "(truncated header or garbage body)"
        )
    if len(ds) == 0:
        return "damaged DICOM file: no data set after the file meta information (truncated header)"
    syntax = str(getattr(meta, "TransferSyntaxUID", "")) if meta is not None else ""
    short = None if syntax in _DEFLATED else _truncation(path, ds)  # deflated: offsets are not file offsets
    if short:
        return short
    if not preamble:
        return (
            "DICOM data set without the Part 10 file header (no DICM marker), so its transfer syntax is unknown; "
            "re-export it as a DICOM file"
        )
    media_class = str(getattr(meta, "MediaStorageSOPClassUID", "")) if meta is not None else ""
    if media_class == MEDIA_STORAGE_DIRECTORY:
        return None
    if "SOPClassUID" not in ds:
        return "damaged DICOM file: no SOPClassUID in the data set (garbage body or truncated header)"
    if is_image(ds) and PIXEL_DATA not in ds:
        return "damaged DICOM file: image without pixel data (truncated or stripped file)"
    return None


def _truncation(path: Path, ds: Dataset) -> str | None:
    """The last top-level element must end exactly where the file ends; otherwise the file was cut."""
    size = path.stat().st_size
    tag = max(ds.keys())
    element = ds.get_item(tag, keep_deferred=True)
    if not isinstance(element, RawDataElement) or element.value_tell is None:
        return None  # an undefined-length sequence pydicom parsed whole: it found its delimiter
    if element.length == _UNDEFINED_LENGTH:
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 8))
            tail = fh.read(8)
        if tail not in _DELIMITERS:
            return f"damaged DICOM file, truncated: {_name(tag)} has no end delimiter"
        return None
    end = element.value_tell + element.length
    if end > size:
        present = max(0, size - element.value_tell)
        return f"damaged DICOM file, truncated: {_name(tag)} needs {element.length} bytes, only {present} present"
    if end < size:
        return (
            f"damaged DICOM file, truncated: {size - end} byte(s) after the last element {_name(tag)} "
            "do not form an element"
        )
    return None


def _keywords(meta: Dataset | None) -> list[str]:
    return [] if meta is None else [str(element.keyword) for element in meta]


def _name(tag: int) -> str:
    keyword = pydicom.datadict.keyword_for_tag(tag)
    return keyword or f"element ({tag >> 16:04X},{tag & 0xFFFF:04X})"


def sop_class(ds: Dataset) -> object:
    return ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")


def is_image(ds: Dataset) -> bool:
    """Image objects (CT/MR/... Image Storage) carry Rows; SR, RT plans, DICOMDIR and the like do not."""
    return "Rows" in ds or PIXEL_DATA in ds or "Image Storage" in getattr(sop_class(ds), "name", "")


@dataclass
class SliceFile:
    """One single-frame DICOM image: its path and header (pixel data stay on disk until loaded)."""

    path: Path
    ds: Dataset


@dataclass
class Series:
    """Image files sharing one SeriesInstanceUID, in the order found (not yet sorted or checked)."""

    uid: str
    files: list[SliceFile]

    @property
    def folder(self) -> Path:
        """The folder of the first file, to name the series in messages."""
        return self.files[0].path.parent


@dataclass
class Skipped:
    """A file or series left out, and why."""

    path: str
    reason: str


@dataclass
class Damaged(Skipped):
    """A DICOM file that is not whole (see `read_header`); `series_uid` when its header got that far."""

    series_uid: str | None = None


@dataclass
class Scan:
    """What `find_series` found under a folder."""

    series: list[Series]
    skipped: list[Skipped]  # not DICOM, or whole DICOM that is not a 3-D image slice: fine to leave out
    damaged: list[Damaged]  # DICOM files that are not whole: an error unless the caller skips invalid input
    n_files: int = 0
    n_not_dicom: int = 0

    def counts(self) -> dict[str, int]:
        """How many files were found, used in series, left out as not DICOM / not a slice, and damaged."""
        in_series = sum(len(s.files) for s in self.series)
        return {
            "files": self.n_files,
            "in_series": in_series,
            "not_dicom": self.n_not_dicom,
            "not_a_slice": len(self.skipped) - self.n_not_dicom,
            "damaged": len(self.damaged),
        }

    def damaged_in(self, series: Series) -> list[Damaged]:
        """Damaged files that may belong to `series`: the same SeriesInstanceUID, or one unknown (or cut short, so it
        matches no series) in a folder that holds its files. Such a series is left out whole: without the file it
        would be a volume a slice short."""
        folders = {f.path.parent for f in series.files}
        known = {s.uid for s in self.series}
        return [
            d for d in self.damaged
            if d.series_uid == series.uid or (d.series_uid not in known and Path(d.path).parent in folders)
        ]  # fmt: skip


def find_series(root: str | Path) -> Scan:
    """Group every DICOM image file under `root` by SeriesInstanceUID; list what was left out and why."""
    root = Path(root)
    if not root.is_dir():
        raise MedpipeError(f"{root}: not a directory; pass the folder that holds the DICOM files")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    by_uid: dict[str, list[SliceFile]] = {}
    skipped: list[Skipped] = []
    damaged: list[Damaged] = []
    n_not_dicom = 0
    invalid_uids: list[str] = []
    for path in paths:
        try:
            header = read_header(path, _DEFER_BYTES)
        except OSError as exc:
            damaged.append(Damaged(str(path), f"cannot read the file ({exc.strerror or exc})"))
            continue
        if header.damage:
            log.warning("%s: %s", path, header.damage)
            damaged.append(Damaged(str(path), header.damage, header.series_uid))
            continue
        if header.ds is None:
            log.warning("skipping %s: not a DICOM file", path)
            skipped.append(Skipped(str(path), "not a DICOM file"))
            n_not_dicom += 1
            continue
        ds = header.ds
        reason = _not_a_slice(ds)
        if reason:
            log.info("skipping %s: %s", path, reason)
            skipped.append(Skipped(str(path), reason))
            continue
        with invalid_uid_messages() as messages:
            uid = str(ds.get("SeriesInstanceUID", "")) or f"(no SeriesInstanceUID: {path.parent})"
        invalid_uids += messages
        by_uid.setdefault(uid, []).append(SliceFile(path, ds))
    if invalid_uids:  # one line for the whole folder (UUID-style UIDs of some de-identified sets), read as they are
        log.warning("%s: %d file(s) carry UIDs that are not DICOM-conformant, read as they are (%s)", root,
                    len(invalid_uids), invalid_uids[0].split(".")[0])  # fmt: skip
    series = [Series(uid, files) for uid, files in by_uid.items()]
    return Scan(series, skipped, damaged, len(paths), n_not_dicom)


def _not_a_slice(ds: Dataset) -> str | None:
    """Why this whole DICOM file is not a slice of a 3-D volume, or None if it may be one."""
    if not is_image(ds):
        sop = sop_class(ds)
        return f"not an image ({getattr(sop, 'name', sop) or 'no SOP class'})"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames): volumes are read from single-frame series only"
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        return "image without ImagePositionPatient/ImageOrientationPatient (not part of a 3-D volume)"
    return None
