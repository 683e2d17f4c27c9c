"""Send result objects (DICOM-SEG, SR) to the destination: a DICOM peer by C-STORE, or a DICOMweb service by STOW-RS.

Any failure that may pass (no connection, a timeout, an HTTP 5xx, an out-of-resources status) is a SendError: the job
waits and the node tries again after its back-off. A refusal that no retry can change (an HTTP 4xx such as 400, 401,
403, 404, 413 or 415; a STOW-RS failure reason such as "cannot understand") is a SendRefused, which the node reports
as a failed job instead of retrying forever."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom

from medpipe.serve.routing import DicomWebService, Peer

# HTTP statuses of the 4xx class that say "not now" rather than "never": Request Timeout, Too Early, Too Many Requests
RETRYABLE_HTTP = (408, 425, 429)
# STOW-RS FailureReason (PS3.18 Table I.2-1) values that may pass: processing failure, resource limitation,
# out of resources (0xA7xx); any other failure reason (cannot understand, SOP class not supported …) is final
RETRYABLE_REASONS = (0x0110, 0x0213)


class SendError(Exception):
    """The destination did not take every file: the job stays waiting to send."""


class SendRefused(SendError):
    """The destination refused the files for a reason no retry changes: the job fails with this reason."""


def backoff_seconds(send_attempts: int, base_s: float, max_s: float) -> float:
    """Exponential back-off: base, 2×base, 4×base … capped at max_s."""
    return float(min(max_s, base_s * 2 ** max(0, send_attempts)))


def send_files(
    paths: Sequence[str | Path], destination: Peer | DicomWebService, calling_ae: str, timeout_s: float | None = None
) -> None:
    """Send every file to `destination` (C-STORE or STOW-RS, as the routing file says); raises SendError unless the
    destination accepts them all, SendRefused when it never will. `timeout_s`: the destination's own by default."""
    timeout = destination.timeout_s if timeout_s is None else timeout_s
    if isinstance(destination, DicomWebService):
        stow_files(paths, destination, timeout)
    else:
        c_store_files(paths, destination, calling_ae, timeout)


def c_store_files(paths: Sequence[str | Path], destination: Peer, calling_ae: str, timeout_s: float = 30.0) -> None:
    """C-STORE every file in one association; raises SendError unless the destination accepts them all."""
    from pynetdicom import AE

    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        syntaxes = sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets if ds.SOPClassUID == sop_class})
        ae.add_requested_context(sop_class, syntaxes)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise SendError(f"no association with {destination.ae_title}@{destination.host}:{destination.port}")
    try:
        for path, ds in zip(paths, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status and "Status" in status else None
            if code is None or not (code == 0x0000 or 0xB000 <= code <= 0xBFFF):  # success or warning
                shown = "no response" if code is None else f"0x{code:04X}"
                raise SendError(f"{destination.ae_title} answered C-STORE of {Path(path).name} with status {shown}")
    finally:
        assoc.release()


def web_client(service: DicomWebService, timeout_s: float | None = None) -> Any:
    """A dicomweb_client DICOMwebClient for `service`, with its credentials and without the client's own retries
    (they would hold the worker for seconds on end; the node's back-off retries instead)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    auth = service.auth
    if auth is not None and auth.token is not None:
        session.headers["Authorization"] = f"Bearer {auth.token}"
    elif auth is not None:
        session.auth = (auth.username or "", auth.password or "")
    # permissive_uid: a study may hold a UID that breaks the DICOM rule; the node's store path refuses it by name
    client = DICOMwebClient(service.url, session=session, timeout=timeout_s or service.timeout_s, permissive_uid=True)
    client.set_http_retry_params(retry=False)
    return client


def http_problem(exc: Exception, what: str) -> tuple[str, bool]:
    """A requests error from a DICOMweb call as one line, and whether it may pass (no connection, a timeout, an HTTP
    5xx, 408, 425 or 429) or never will (any other HTTP 4xx: a wrong URL, credentials, a refused object)."""
    import requests

    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    if isinstance(exc, requests.HTTPError) and code is not None:
        detail = f"{what} answered HTTP {code} {getattr(response, 'reason', '') or ''}".rstrip()
        reasons = _failure_reasons(response)
        return detail + (f" ({reasons})" if reasons else ""), not (400 <= code < 500 and code not in RETRYABLE_HTTP)
    if isinstance(exc, requests.Timeout):
        return f"{what}: no answer within the timeout ({type(exc).__name__})", True
    if isinstance(exc, requests.ConnectionError):
        return f"{what}: cannot connect ({_root_cause(exc)})", True
    return f"{what}: {type(exc).__name__}: {exc}", True


def http_failure(exc: Exception, what: str) -> SendError:
    """A requests error from STOW-RS as SendError (try again later) or SendRefused (an HTTP 4xx that will not pass)."""
    detail, may_pass = http_problem(exc, what)
    if may_pass:
        return SendError(detail)
    return SendRefused(f"{detail}: refused, not retried (check the destination's URL, credentials and logs)")


def _root_cause(exc: BaseException) -> str:
    """'Connection refused' from urllib3's long wrapper text of a requests ConnectionError, else its first line."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text) or re.search(r"(timed out)", text)
    return found.group(1).strip() if found else text.splitlines()[0][:200]


def _failure_reasons(response: Any) -> str:
    """The FailedSOPSequence of a STOW-RS error response, as 'UID: 0xC000, …' (empty when there is none)."""
    try:
        failed = pydicom.Dataset.from_json(response.json()).get("FailedSOPSequence", [])
    except Exception:  # not DICOM JSON (an HTML error page, an empty body): the HTTP status says it all
        return ""
    return ", ".join(f"{item.get('ReferencedSOPInstanceUID', '?')}: 0x{int(item.get('FailureReason', 0)):04X}"
                     for item in failed)  # fmt: skip


def stow_files(paths: Sequence[str | Path], service: DicomWebService, timeout_s: float | None = None) -> None:
    """STOW-RS every file in one request; raises SendError unless the service stored them all, SendRefused when it
    refused them for a reason no retry changes."""
    import requests

    datasets = [pydicom.dcmread(p) for p in paths]
    client = web_client(service, timeout_s)
    what = f"STOW-RS to {service.url}"
    try:
        answer = client.store_instances(datasets)
    except (requests.RequestException, ValueError) as exc:  # ValueError: an answer that is not DICOM JSON / XML
        raise http_failure(exc, what) from exc
    # 200: all stored; 202: some failed (PS3.18 10.5.3): each failure names its instance and reason
    failed = {str(item.get("ReferencedSOPInstanceUID", "?")): int(item.get("FailureReason", 0))
              for item in answer.get("FailedSOPSequence", [])}  # fmt: skip
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.get("ReferencedSOPSequence", [])}
    sent = {str(ds.SOPInstanceUID): Path(path).name for path, ds in zip(paths, datasets, strict=True)}
    if "ReferencedSOPSequence" in answer:  # a service that lists what it stored must list every instance
        failed.update({uid: 0x0110 for uid in sent if uid not in stored and uid not in failed})
    if failed:
        shown = ", ".join(f"{sent.get(uid, uid)}: 0x{code:04X}" for uid, code in failed.items())
        final = [code for code in failed.values() if code not in RETRYABLE_REASONS and not 0xA700 <= code <= 0xA7FF]
        if final:
            raise SendRefused(f"{what}: {len(failed)} of {len(sent)} object(s) refused ({shown}), not retried")
        raise SendError(f"{what}: {len(failed)} of {len(sent)} object(s) not stored ({shown})")
