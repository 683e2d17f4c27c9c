"""Pull mode for sites that do not push: fetch a study from a PACS straight into the node's work folder and queue, by
C-GET from a DICOM peer or by QIDO-RS (list the instances) and WADO-RS (fetch each) from a DICOMweb service.

The instances are stored exactly as the SCP stores pushed ones (on disk, then in the queue), so the running node
turns them into jobs after its quiet period. The node asks for the image SOP classes it reads, and also takes (and
drops) the objects it sends back itself (SEG, SR, secondary capture), so that a study already holding its results
pulls cleanly; over DICOMweb those are listed but never fetched. Anything short of full success (a warning status:
some instances failed; over DICOMweb, any instance not fetched or not stored) is an error that says how many failed
and names the first."""

from __future__ import annotations

import re
from typing import Any

from pydicom import Dataset

from medpipe.errors import MedpipeError
from medpipe.serve.queue import JobQueue
from medpipe.serve.routing import DicomWebService, Peer, Settings
from medpipe.serve.scp import STATUS_OK, STATUS_OUT_OF_RESOURCES, STORAGE_CLASSES, store_instance

# what the node itself writes back into a study (results.py, io.dicom_seg): taken during a pull and dropped
RESULT_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
)


WEB_PREFIX = "dicomweb+"  # --source dicomweb+http://host:8042/dicom-web: a DICOMweb service, not a DICOM peer


def parse_peer(text: str) -> Peer | DicomWebService:
    """'AE@host:port' → Peer; 'dicomweb+http(s)://host[:port]/root' → DicomWebService."""
    text = str(text).strip()
    if text.lower().startswith(WEB_PREFIX):
        url = text[len(WEB_PREFIX) :].rstrip("/")
        if re.fullmatch(r"https?://[^/\s@]+(/\S*)?", url):
            return DicomWebService(url)
    else:
        match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", text)
        if match:
            return Peer(match.group(1), match.group(2), int(match.group(3)))
    raise MedpipeError(
        f"--source must look like AE_TITLE@HOST:PORT (C-GET) or dicomweb+http://HOST:PORT/PATH (QIDO-RS / WADO-RS; "
        f"credentials come from the routing file's destination with the same URL), got '{text}'"
    )


def pull_study(settings: Settings, source: Peer | DicomWebService, study_uid: str, timeout_s: float = 120.0) -> int:
    """Fetch every instance of `study_uid` from `source` into the node's queue; returns how many images were stored.
    Raises MedpipeError unless every instance arrived (the images stored so far stay in the queue)."""
    if isinstance(source, DicomWebService):
        return pull_study_web(settings, source, study_uid, timeout_s)
    return pull_study_c_get(settings, source, study_uid, timeout_s)


def pull_study_c_get(settings: Settings, source: Peer, study_uid: str, timeout_s: float = 120.0) -> int:
    """C-GET every instance of `study_uid` from `source`; returns how many images were stored. Raises MedpipeError
    unless the source reports every sub-operation a success (the images stored so far stay in the queue)."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    queue = JobQueue(settings.work_dir / "queue.sqlite")
    incoming = settings.work_dir / "incoming"
    stored: list[str] = []
    not_stored: list[str] = []  # why an instance the source sent could not be stored here

    def handle_store(event: Any) -> int:
        if str(event.context.abstract_syntax) in RESULT_CLASSES:
            return STATUS_OK  # a result of an earlier run: not an input
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            store_instance(queue, incoming, ds, event.encoded_dataset(), source.ae_title)
        except Exception as exc:
            not_stored.append(f"{type(exc).__name__}: {exc}")
            return STATUS_OUT_OF_RESOURCES
        stored.append(str(ds.SOPInstanceUID))
        return STATUS_OK

    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in (*STORAGE_CLASSES, *RESULT_CLASSES):
        ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES[:4])
    roles = [build_role(uid, scp_role=True) for uid in (*STORAGE_CLASSES, *RESULT_CLASSES)]
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])  # fmt: skip
        if not assoc.is_established:
            raise MedpipeError(f"no association with {source.ae_title}@{source.host}:{source.port}")
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        final: Dataset | None = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = status if status is not None and "Status" in status else None
        assoc.release()
    finally:
        queue.close()
    code = None if final is None else int(final.Status)
    if code != 0x0000:  # 0xB000 is a warning: "one or more sub-operations failed"; not a success
        failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
        warned = int(final.get("NumberOfWarningSuboperations", 0) or 0) if final is not None else 0
        shown = "no response" if code is None else f"0x{code:04X}"
        detail = f"{failed} instance(s) failed" + (f", {warned} with warnings" if warned else "")
        why = f" (here: {not_stored[0]})" if not_stored else ""
        raise MedpipeError(
            f"C-GET of study {study_uid} from {source.ae_title} ended with status {shown}: {detail}{why}; "
            f"the {len(stored)} image(s) stored are in the node's queue and will be processed"
        )
    return len(stored)


def pull_study_web(settings: Settings, source: DicomWebService, study_uid: str, timeout_s: float = 120.0) -> int:
    """QIDO-RS the instances of `study_uid` at `source`, WADO-RS each image the node reads and store it as a C-STORE
    arrival is stored; returns how many were stored. Raises MedpipeError naming the first instance that failed (the
    images stored so far stay in the queue)."""
    from io import BytesIO

    import pydicom
    import requests

    from medpipe.serve.sender import http_problem, web_client

    destination = settings.destination
    if source.auth is None and isinstance(destination, DicomWebService) and destination.url == source.url:
        source = destination  # the routing file's credentials for this service
    client = web_client(source, timeout_s)
    try:
        listed = client.search_for_instances(study_instance_uid=study_uid, get_remaining=True)
    except (requests.RequestException, ValueError) as exc:
        raise MedpipeError(f"QIDO-RS of study {study_uid}: {http_problem(exc, source.url)[0]}") from exc
    if not listed:
        raise MedpipeError(f"QIDO-RS: {source.url} holds no instance of study {study_uid}")
    queue = JobQueue(settings.work_dir / "queue.sqlite")
    incoming = settings.work_dir / "incoming"
    stored: list[str] = []
    failed: list[str] = []  # "<SOP instance UID>: why", in the order met
    try:
        for item in listed:
            found = Dataset.from_json(item)
            series, sop = str(found.get("SeriesInstanceUID", "")), str(found.get("SOPInstanceUID", ""))
            sop_class = str(found.get("SOPClassUID", ""))
            if sop_class in RESULT_CLASSES:
                continue  # a result of an earlier run: not an input, not fetched
            if sop_class not in STORAGE_CLASSES:  # as over C-GET, where it gets no presentation context
                failed.append(f"{sop}: SOP class {sop_class or '(none listed)'} is not one the node reads")
                continue
            try:
                ds = client.retrieve_instance(study_uid, series, sop)
            except (requests.RequestException, ValueError) as exc:
                failed.append(f"{sop}: {http_problem(exc, 'WADO-RS')[0]}")
                continue
            buffer = BytesIO()
            try:
                pydicom.dcmwrite(buffer, ds, enforce_file_format=True)  # as received over C-STORE: a Part 10 file
                store_instance(queue, incoming, ds, buffer.getvalue(), source.url)
            except Exception as exc:
                failed.append(f"{sop}: {type(exc).__name__}: {exc}")
                continue
            stored.append(sop)
    finally:
        queue.close()
    if failed:
        raise MedpipeError(
            f"WADO-RS pull of study {study_uid} from {source.url}: {len(failed)} instance(s) failed (first: "
            f"{failed[0]}); the {len(stored)} image(s) stored are in the node's queue and will be processed"
        )
    return len(stored)
