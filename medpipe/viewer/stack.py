"""The viewer stack on one machine, loopback only: Orthanc (Debian's package) with the DICOMweb plugin as the node's
destination, the node itself (`medpipe serve`, in a thread), and OHIF served with Orthanc's `/dicom-web/` from one
origin (`ViewerServer`). `medpipe viewer ROUTING_FILE` starts it; docs/viewer.md."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.serve.routing import Peer, Settings
from medpipe.viewer.ohif import OHIF_VERSION, install_ohif
from medpipe.viewer.server import ViewerServer

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc/plugins", "/usr/local/share/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"


def find_orthanc() -> str | None:
    return shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)


def find_dicomweb_plugin() -> Path | None:
    return next((Path(d) / DICOMWEB_PLUGIN for d in PLUGIN_DIRS if (Path(d) / DICOMWEB_PLUGIN).is_file()), None)


def orthanc_config(settings: Settings, root: Path, http_port: int, plugin: Path) -> dict[str, Any]:
    """Orthanc as the node's destination: its AE title and DICOM port are the routing file's `destination`, the node
    is its one modality, DICOMweb is on at `/dicom-web/`. Loopback only: the REST API refuses remote hosts, and the
    DICOM port (Orthanc 1.10 cannot bind it to one address) answers only the node, from 127.0.0.1."""
    destination = settings.destination
    assert isinstance(destination, Peer)
    return {
        "Name": "medpipe", "DicomAet": destination.ae_title, "DicomPort": destination.port, "HttpPort": http_port,
        "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Ssl": False},
        "DicomModalities": {"medpipe": [settings.ae_title, "127.0.0.1", settings.port]},
        "DicomAlwaysAllowEcho": False, "DicomAlwaysAllowStore": False, "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowFindWorklist": False, "DicomAlwaysAllowGet": False, "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True, "DicomScuTimeout": 30, "HttpTimeout": 60,
    }  # fmt: skip


def check_loopback(settings: Settings) -> None:
    """The stack runs Orthanc on this machine for the node: the routing file must say so."""
    destination = settings.destination
    if not isinstance(destination, Peer):
        raise MedpipeError("medpipe viewer: the routing file needs a DICOM `destination` (ae_title, host, port): the "
                           "viewer stack runs Orthanc there for the node to send its results to")  # fmt: skip
    if destination.host not in LOOPBACK:
        raise MedpipeError(f"medpipe viewer: destination.host is '{destination.host}'; the stack runs its Orthanc on "
                           "this machine only (127.0.0.1)")  # fmt: skip
    if settings.host not in LOOPBACK:
        raise MedpipeError(f"medpipe viewer: node.host is '{settings.host}'; the stack listens on 127.0.0.1 only")


class OrthancProcess:
    """Orthanc as a child process, with its configuration, storage and log under `root`."""

    def __init__(self, config: dict[str, Any], root: Path, timeout_s: float = 60) -> None:
        orthanc = find_orthanc()
        if orthanc is None:
            raise MedpipeError("Orthanc is not installed (Debian: apt-get install -y orthanc orthanc-dicomweb)")
        self.root = root
        self.url = f"http://127.0.0.1:{config['HttpPort']}"
        root.mkdir(parents=True, exist_ok=True)
        (root / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log_path = root / "orthanc.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([orthanc, str(root / "orthanc.json")], stdout=self.log, stderr=self.log)
        deadline = time.time() + timeout_s
        # Orthanc gone (a port in use) ends the wait at once: whatever else listens on the port is not it
        while time.time() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.url + "/dicom-web/studies", timeout=5) as resp:
                    resp.read()
                if self.process.poll() is None:
                    return
            except urllib.error.HTTPError as exc:
                self.stop()
                raise MedpipeError(f"Orthanc answers /dicom-web/ with HTTP {exc.code}: is the DICOMweb plugin "
                                   f"loaded? see {self.log_path}") from exc  # fmt: skip
            except OSError:  # not listening yet (URLError, refused, timed out)
                time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
        raise MedpipeError(f"Orthanc did not start on port {config['HttpPort']} / {config['DicomPort']} "
                           f"(a port in use?): {tail[0]} (log: {self.log_path})")  # fmt: skip

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class ViewerStack:
    """Orthanc + the node + OHIF, started in that order and stopped in reverse; `url` is the viewer's study list."""

    def __init__(self, settings: Settings, orthanc_http_port: int = 8042, port: int = 3000,
                 ohif_version: str = OHIF_VERSION, investigational_notice: bool = True) -> None:  # fmt: skip
        from medpipe.serve.worker import Node

        check_loopback(settings)
        plugin = find_dicomweb_plugin()
        if find_orthanc() is None or plugin is None:
            raise MedpipeError("Orthanc with its DICOMweb plugin is not installed "
                               "(Debian: apt-get install -y orthanc orthanc-dicomweb)")  # fmt: skip
        dist = install_ohif(ohif_version)
        self.settings = settings
        self.orthanc = OrthancProcess(
            orthanc_config(settings, settings.work_dir / "orthanc", orthanc_http_port, plugin),
            settings.work_dir / "orthanc",
        )
        try:
            self.viewer = ViewerServer(dist, self.orthanc.url, "127.0.0.1", port,
                                       investigational_notice=investigational_notice)  # fmt: skip
            self.node = Node(settings)
            self.node_error: BaseException | None = None
            self.node_thread = threading.Thread(target=self._serve, name="medpipe-node", daemon=True)
            self.node_thread.start()
            deadline = time.time() + 600  # loading the models
            while self.node.scp.server is None and self.node_thread.is_alive() and time.time() < deadline:
                time.sleep(0.05)
            if self.node.scp.server is None:
                raise self.node_error or MedpipeError("the node did not start listening")
            self.viewer.start()
        except BaseException:
            self.stop()
            raise
        self.url = self.viewer.url + "/"

    def _serve(self) -> None:
        try:
            self.node.serve_forever()
        except BaseException as exc:  # a bad checkpoint: reported by __init__, which waits for the node
            self.node_error = exc

    def study_url(self, study_uid: str) -> str:
        return self.viewer.study_url(study_uid)

    def stop(self) -> None:
        viewer, node = getattr(self, "viewer", None), getattr(self, "node", None)
        if viewer is not None and viewer.thread.is_alive():
            viewer.stop()
        if node is not None:
            node.stopping.set()
            self.node_thread.join(60)
        self.orthanc.stop()
