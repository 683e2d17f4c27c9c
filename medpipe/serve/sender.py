"""Send result objects (DICOM-SEG, SR) to the destination AE by C-STORE; any failure is a SendError to retry later."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom

from medpipe.serve.routing import Peer


class SendError(Exception):
    """The destination did not take every file: the job stays waiting to send."""


def backoff_seconds(send_attempts: int, base_s: float, max_s: float) -> float:
    """Exponential back-off: base, 2×base, 4×base … capped at max_s."""
    return float(min(max_s, base_s * 2 ** max(0, send_attempts)))


def send_files(paths: Sequence[str | Path], destination: Peer, calling_ae: str, timeout_s: float = 30.0) -> None:
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
