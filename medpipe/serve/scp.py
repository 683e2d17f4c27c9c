"""The Storage SCP: C-ECHO and C-STORE for CT, CR, DX and MR images (pynetdicom).

Each instance is written to disk (fsync, then an atomic rename) and recorded in the queue before the store is
acknowledged, so nothing the node has acknowledged can be lost. Associations from calling AE titles outside the
allow-list (when one is set) are rejected; SOP classes outside STORAGE_CLASSES get no presentation context.
UIDs that name files are checked against the DICOM rule first, so no received value can point a path elsewhere."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom.uid import RE_VALID_UID

from medpipe.errors import MedpipeError, first_line
from medpipe.files import atomic_write
from medpipe.serve.queue import JobQueue

logger = logging.getLogger(__name__)

# the image SOP classes the routes can read: CT, CR, DX (for presentation and for processing) and MR
STORAGE_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
}
STATUS_OK, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
_UID = re.compile(RE_VALID_UID)  # PS3.5 9.1: digits in components separated by '.', no leading zero


def _safe_uid(value: Any, what: str) -> str:
    """A UID by PS3.5 9.1 (at most 64 characters, trailing NUL padding and spaces removed), else ValueError."""
    text = str(value or "").rstrip("\0 ").strip()
    if len(text) > 64 or not _UID.fullmatch(text):
        raise ValueError(f"{what} {text[:80]!r} is not a DICOM UID")
    return text


def dataset_digest(encoded: bytes) -> str:
    """sha256 of the data set as sent, without preamble and file meta (which name the sender, not the content)."""
    start = 0
    # (0002,0000) File Meta Information Group Length, UL, explicit VR little endian, right after "DICM"
    if encoded[128:132] == b"DICM" and encoded[132:138] == b"\x02\x00\x00\x00UL":
        start = 144 + int.from_bytes(encoded[140:144], "little")
    return hashlib.sha256(memoryview(encoded)[start:]).hexdigest()


def instance_meta(ds: Dataset, calling_ae: str | None = None) -> dict[str, Any]:
    """What the queue needs to know about one received instance (no patient data)."""
    return {
        "sop_instance_uid": _safe_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID"),
        "series_instance_uid": _safe_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID"),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")) or None,
        "sop_class_uid": str(ds.get("SOPClassUID", "")) or None,
        "modality": str(ds.get("Modality", "")).upper() or None,
        "body_part": str(ds.get("BodyPartExamined", "")).upper() or None,
        "calling_ae": calling_ae,
    }


class StoreError(Exception):
    """A valid instance the node could not store (disk full, state file locked …): the sender should retry."""


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def store_instance(queue: JobQueue, incoming_dir: Path, ds: Dataset, encoded: bytes, calling_ae: str | None) -> Path:
    """Write one received instance (`encoded`: the file bytes, preamble and meta included) and record it.

    The file is named by its SOP instance UID and a hash of its content: a copy with other content never overwrites
    one a job holds. ValueError: the instance names no valid UIDs (refuse it). Any other error: it is not stored,
    and its series is held until the sender sends it again (never processed without it)."""
    meta = instance_meta(ds, calling_ae)
    meta["digest"] = dataset_digest(encoded)
    incoming = Path(incoming_dir).resolve()
    path = incoming / meta["series_instance_uid"] / f"{meta['sop_instance_uid']}_{meta['digest'][:16]}.dcm"
    if path.resolve().parent.parent != incoming:  # cannot happen with valid UIDs; never write outside incoming/
        raise ValueError(f"SeriesInstanceUID {meta['series_instance_uid']!r} does not name a folder in {incoming}")
    new_file = not path.exists()
    try:
        atomic_write(path, lambda tmp: _write_synced(tmp, encoded))
        dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        replaced = queue.add_instance(meta, path)
    except Exception as exc:
        if new_file:
            path.unlink(missing_ok=True)
        reason = _reason(exc)
        queue.record_unstored(meta["series_instance_uid"], meta["sop_instance_uid"], reason)
        raise StoreError(reason) from exc
    if replaced:
        Path(replaced).unlink(missing_ok=True)
    return path


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return first_line(exc)


class StorageSCP:
    """A pynetdicom application entity that stores what it receives into the node's work folder and queue."""

    def __init__(self, queue: JobQueue, incoming_dir: Path, ae_title: str, allowed_calling_aes: tuple[str, ...] = ()):
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
        from pynetdicom.sop_class import Verification

        self.queue, self.incoming_dir = queue, Path(incoming_dir)
        self.ae = AE(ae_title=ae_title)
        self.ae.add_supported_context(Verification)
        for uid in STORAGE_CLASSES:
            self.ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        if allowed_calling_aes:
            self.ae.require_calling_aet = list(allowed_calling_aes)
        # answer only associations addressed to this node's AE title (as Orthanc with DicomCheckCalledAet: true):
        # a PACS configured for another node is told so ("called AE title not recognised") instead of being served
        self.ae.require_called_aet = True
        self.ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for 0.5 MB CT slices
        self.server: Any = None

    def handle_store(self, event: Any) -> int:
        """EVT_C_STORE: acknowledge only once the instance is on disk and in the queue."""
        calling = event.assoc.requestor.ae_title
        calling = calling.decode(errors="replace") if isinstance(calling, bytes) else str(calling)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            store_instance(self.queue, self.incoming_dir, ds, event.encoded_dataset(), calling.strip())
        except ValueError as exc:
            logger.warning(f"C-STORE from {calling} refused: {exc}")
            return STATUS_CANNOT_UNDERSTAND
        except Exception as exc:  # disk full, database locked …: tell the sender to try again later
            logger.error(f"C-STORE from {calling} not stored: {exc}")
            return STATUS_OUT_OF_RESOURCES
        return STATUS_OK

    def start(self, host: str, port: int) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self.handle_store)]
        try:
            self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers)
        except OSError as exc:  # port taken, address not on this machine, port < 1024 without the right
            raise MedpipeError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; is another node or program on that port? "
                "choose another with --port or the routing file's node.port"
            ) from exc
        logger.info(f"DICOM node {self.ae.ae_title} listening on {host}:{port}")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
