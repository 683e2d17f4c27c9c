"""A real PACS for the DICOM-node tests and benchmark: Orthanc (Debian package) on loopback ports, driven by REST."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
# the DICOMweb plugin (Debian package orthanc-dicomweb): STOW-RS / QIDO-RS / WADO-RS under <url>/dicom-web
_DICOMWEB_SO = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
DICOMWEB_PLUGIN = str(_DICOMWEB_SO) if _DICOMWEB_SO.exists() else None
PLUGINS = [DICOMWEB_PLUGIN] if DICOMWEB_PLUGIN else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OrthancRest:
    """REST calls to an Orthanc that runs at `url` (started by `Orthanc` below, or by `medpipe viewer`)."""

    def __init__(self, url: str) -> None:
        self.url = url

    # ------------------------------------------------------------------------------------------------- REST
    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        ctype = resp.headers.get("Content-Type", "")
        return json.loads(data) if "json" in ctype else data

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, datasets: Iterable[pydicom.Dataset]) -> str:
        """POST every instance; returns the Orthanc series ID (one series expected)."""
        from io import BytesIO

        series = set()
        for ds in datasets:
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            series.add(self.request("POST", "/instances", buffer.getvalue())["ParentSeries"])
        if len(series) != 1:
            raise RuntimeError(f"expected one series, uploaded {len(series)}")
        return series.pop()

    def push_to_medpipe(self, series_id: str, asynchronous: bool = False) -> Any:
        body = json.dumps({"Resources": [series_id], "Synchronous": not asynchronous}).encode()
        return self.request("POST", "/modalities/medpipe/store", body)

    def study_series(self, series_id: str) -> list[dict[str, Any]]:
        """Every series of the study that holds `series_id`, with their main tags."""
        study = self.get(f"/series/{series_id}")["ParentStudy"]
        return self.get(f"/studies/{study}/series")

    def instance_files(self, series_id: str) -> list[pydicom.Dataset]:
        from io import BytesIO

        return [
            pydicom.dcmread(BytesIO(self.request("GET", f"/instances/{i['ID']}/file")))
            for i in self.get(f"/series/{series_id}/instances")
        ]

    def wait_for_modality(self, series_id: str, modality: str, count: int = 1, timeout_s: float = 120) -> list[str]:
        """IDs of the study's series of `modality` once there are `count`; AssertionError naming what is there."""
        deadline = time.time() + timeout_s
        found: list[str] = []
        while time.time() < deadline:
            found = [s["ID"] for s in self.study_series(series_id) if s["MainDicomTags"].get("Modality") == modality]
            if len(found) >= count:
                return found
            time.sleep(0.5)
        raise AssertionError(f"Orthanc holds {len(found)} {modality} series after {timeout_s}s, expected {count}")


class Orthanc(OrthancRest):
    """An Orthanc subprocess with its storage in `root`; `medpipe_port` is where it sends to the MEDPIPE modality."""

    def __init__(self, root: Path, medpipe_port: int, ae_title: str = "ORTHANC", http_port: int | None = None) -> None:
        if ORTHANC is None:
            raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
        self.root, self.ae_title, self.medpipe_port = Path(root), ae_title, medpipe_port
        self.dicom_port, self.http_port = free_port(), http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"  # answers only when DICOMWEB_PLUGIN is loaded
        config = {
            "Name": "medpipe-test", "DicomAet": ae_title, "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "StorageDirectory": str(self.root / "storage"), "IndexDirectory": str(self.root / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": PLUGINS,
            "DicomModalities": {"medpipe": ["MEDPIPE", "127.0.0.1", medpipe_port]},
            "DicomScuTimeout": 30, "StableAge": 1, "HttpTimeout": 60,
            # Orthanc 1.10 has no DICOM bind address (its DICOM port listens on every interface): it answers only
            # the MEDPIPE modality, and only from 127.0.0.1; its REST API refuses remote hosts
            "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowFindWorklist": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
            "DicomCheckModalityHost": True,
        }  # fmt: skip
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = open(self.root / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([ORTHANC, str(self.root / "orthanc.json")], stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                if self.process.poll() is not None:
                    break
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {self.root / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.log.close()
