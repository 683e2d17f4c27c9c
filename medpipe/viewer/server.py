"""One loopback origin for the browser: OHIF's prebuilt files, its `app-config.js`, and Orthanc's DICOMweb API passed
through under `/dicom-web/`. The browser then makes no cross-origin request, so neither Orthanc nor OHIF needs CORS.

OHIF is a single-page app: a path that names no file (`/viewer?StudyInstanceUIDs=…`) gets `index.html`."""

from __future__ import annotations

import http.client
import logging
import mimetypes
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from medpipe.errors import MedpipeError
from medpipe.viewer.ohif import app_config

logger = logging.getLogger(__name__)

PROXIED = ("/dicom-web/", "/dicom-web?")
# request headers passed to the archive; Host stays the browser's, so the BulkDataURIs Orthanc writes into the
# metadata point back at this origin
FORWARDED_REQUEST = ("Accept", "Content-Type", "Content-Length", "Range", "Host", "If-None-Match")
FORWARDED_RESPONSE = ("Content-Type", "Content-Length", "Content-Range", "ETag", "Cache-Control", "Last-Modified")
TYPES = {
    ".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript", ".json": "application/json",
    ".css": "text/css", ".svg": "image/svg+xml", ".woff2": "font/woff2", ".html": "text/html; charset=utf-8",
}  # fmt: skip
CHUNK = 1 << 16


class ViewerServer:
    """Serve OHIF's `dist` folder and pass `/dicom-web/` to `archive_url` (e.g. Orthanc's `http://127.0.0.1:8042`),
    in a background thread, on `host:port` (port 0: a free one)."""

    def __init__(self, dist: str | Path, archive_url: str, host: str = "127.0.0.1", port: int = 3000,
                 dicomweb_root: str = "/dicom-web", investigational_notice: bool = True) -> None:  # fmt: skip
        self.dist = Path(dist).resolve()
        if not (self.dist / "index.html").is_file():
            raise MedpipeError(f"'{self.dist}' holds no OHIF build (index.html missing): run `medpipe viewer install`")
        archive = urllib.parse.urlsplit(archive_url)
        if archive.scheme != "http" or not archive.hostname:
            raise MedpipeError(f"archive URL must be http://HOST:PORT, got '{archive_url}'")
        self.archive = (archive.hostname, archive.port or 80, archive.path.rstrip("/") + dicomweb_root)
        config = app_config("/dicom-web", investigational_notice).encode()
        handler = type("Handler", (_Handler,), {"server_ref": self, "config_js": config})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise MedpipeError(f"viewer cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def study_url(self, study_uid: str) -> str:
        """OHIF's basic viewer on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}"


class _Handler(BaseHTTPRequestHandler):
    server_ref: ViewerServer
    config_js: bytes
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        logger.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith(PROXIED):
            self._proxy()
        else:
            self._static()

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_POST(self) -> None:  # noqa: N802 - QIDO/WADO are GETs; STOW (an upload) is a POST
        if self.path.startswith(PROXIED):
            self._proxy()
        else:
            self.send_error(405)

    # ---------------------------------------------------------------------------------------------- files
    def _static(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path == "/app-config.js":
            return self._send(200, self.config_js, "text/javascript")
        root = self.server_ref.dist
        target = (root / path.lstrip("/")).resolve()
        if not target.is_relative_to(root):
            return self.send_error(404)
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            if "." in Path(path).name:  # a missing asset stays a 404; a route of the app gets the app
                return self.send_error(404)
            target = root / "index.html"
        ctype = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(target.stat().st_size))
        self.end_headers()
        if self.command == "HEAD":
            return
        try:
            with open(target, "rb") as f:
                while chunk := f.read(CHUNK):
                    self.wfile.write(chunk)
        except OSError:  # the browser went away mid-file
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    # ---------------------------------------------------------------------------------------------- archive
    def _proxy(self) -> None:
        host, port, root = self.server_ref.archive
        upstream_path = root + self.path[len("/dicom-web") :]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k in FORWARDED_REQUEST if (v := self.headers.get(k)) is not None}
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            try:
                conn.request(self.command, upstream_path, body=body, headers=headers)
                resp = conn.getresponse()
                data = None if resp.getheader("Content-Length") else resp.read()  # chunked upstream: one piece here
            except (OSError, http.client.HTTPException) as exc:
                logger.warning(f"archive {host}:{port} did not answer {self.command} {upstream_path}: {exc}")
                return self.send_error(502, "the DICOMweb archive did not answer")
            self.send_response(resp.status)
            for key in FORWARDED_RESPONSE:
                value = resp.getheader(key)
                if value is not None and not (key == "Content-Length" and data is not None):
                    self.send_header(key, value)
            if data is not None:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if data is not None:
                self.wfile.write(data)
            else:
                while chunk := resp.read(CHUNK):
                    self.wfile.write(chunk)
        except OSError:  # the browser went away (a cancelled prefetch): nothing to answer
            self.close_connection = True
        finally:
            conn.close()
