"""Pull mode for sites that do not push: C-GET a study from a PACS straight into the node's work folder and queue.

The instances are stored exactly as the SCP stores pushed ones (on disk, then in the queue), so the running node
turns them into jobs after its quiet period. Only the image SOP classes the node reads are requested."""

from __future__ import annotations

import re
from typing import Any

from pydicom import Dataset

from medpipe.errors import MedpipeError
from medpipe.serve.queue import JobQueue
from medpipe.serve.routing import Peer, Settings
from medpipe.serve.scp import STATUS_OK, STATUS_OUT_OF_RESOURCES, STORAGE_CLASSES, store_instance


def parse_peer(text: str) -> Peer:
    """'AE@host:port' → Peer."""
    match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d+)", str(text).strip())
    if not match:
        raise MedpipeError(f"--source must look like AE_TITLE@HOST:PORT, got '{text}'")
    return Peer(match.group(1), match.group(2), int(match.group(3)))


def pull_study(settings: Settings, source: Peer, study_uid: str, timeout_s: float = 120.0) -> int:
    """C-GET every instance of `study_uid` from `source`; returns how many were stored."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    queue = JobQueue(settings.work_dir / "queue.sqlite")
    incoming = settings.work_dir / "incoming"
    stored: list[str] = []

    def handle_store(event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            store_instance(queue, incoming, ds, event.encoded_dataset(), source.ae_title)
        except Exception:
            return STATUS_OUT_OF_RESOURCES
        stored.append(str(ds.SOPInstanceUID))
        return STATUS_OK

    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for uid in STORAGE_CLASSES:
        ae.add_requested_context(uid, ALL_TRANSFER_SYNTAXES[:4])
    roles = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    try:
        assoc = ae.associate(source.host, source.port, ae_title=source.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, handle_store)])  # fmt: skip
        if not assoc.is_established:
            raise MedpipeError(f"no association with {source.ae_title}@{source.host}:{source.port}")
        query = Dataset()
        query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", study_uid
        final = None
        for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            final = int(status.Status) if status is not None and "Status" in status else None
        assoc.release()
    finally:
        queue.close()
    if final not in (0x0000, 0xB000):
        shown = "no response" if final is None else f"0x{final:04X}"
        raise MedpipeError(f"C-GET of study {study_uid} from {source.ae_title} ended with status {shown}")
    return len(stored)
