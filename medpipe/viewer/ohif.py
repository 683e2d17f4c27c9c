"""OHIF v3 from the npm registry: `@ohif/app` ships a prebuilt `dist/` (index.html, app-config.js, the bundles), so
installing it is fetching one pinned tarball with npm and unpacking its `dist/` into medpipe's cache folder; no build.
The app-config that points OHIF at a DICOMweb archive is written per server (`app_config`), never into the cache."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from medpipe.errors import MedpipeError
from medpipe.files import cache_dir

OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.12.10"
# the registry's `dist.integrity` of that version: the tarball npm fetched must be this one
OHIF_INTEGRITY = "sha512-0kuF66Mq9c9dMD++bUsTjMrJpXJwaZhz9B4uS244DawAjSkTwIYFU93pxPuRUQixaRi7QAHlF3Fe1qudBlZrmA=="
REQUIRED_FILES = ("index.html", "app-config.js")


def ohif_dir(version: str = OHIF_VERSION) -> Path:
    """Where OHIF's `dist/` of `version` is unpacked: `$MEDPIPE_OHIF_DIR/<version>`, else
    `$MEDPIPE_CACHE_DIR/ohif/<version>`, else `~/.cache/medpipe/ohif/<version>`."""
    return Path(os.environ.get("MEDPIPE_OHIF_DIR") or cache_dir() / "ohif") / version


def installed(version: str = OHIF_VERSION) -> Path | None:
    """The unpacked `dist/` of `version`, or None when it is not (wholly) there."""
    folder = ohif_dir(version)
    return folder if all((folder / name).is_file() for name in REQUIRED_FILES) else None


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def install_ohif(version: str = OHIF_VERSION, npm: str | None = None) -> Path:
    """Fetch `@ohif/app@version` with `npm pack` (the tarball only: the prebuilt app needs none of its npm
    dependencies) and unpack its `dist/` into `ohif_dir(version)`; returns that folder. Nothing is left half-written:
    the folder appears whole by one rename. Already installed: returns it at once."""
    done = installed(version)
    if done is not None:
        return done
    npm = npm or shutil.which("npm")
    if npm is None:
        raise MedpipeError("npm is not installed; it fetches OHIF (Debian: apt-get install -y npm)")
    target = ohif_dir(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".install-") as tmp:
        spec = f"{OHIF_PACKAGE}@{version}"
        proc = subprocess.run([npm, "pack", spec, "--json", "--pack-destination", tmp], capture_output=True,
                              text=True, cwd=tmp, timeout=900)  # fmt: skip
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
            raise MedpipeError(f"npm pack {spec} failed: {last}")
        tarballs = list(Path(tmp).glob("*.tgz"))
        if len(tarballs) != 1:
            raise MedpipeError(f"npm pack {spec} wrote {len(tarballs)} tarballs, expected one")
        if version == OHIF_VERSION and _integrity(tarballs[0]) != OHIF_INTEGRITY:
            raise MedpipeError(f"{spec} from the registry does not match its pinned integrity {OHIF_INTEGRITY}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(unpacked, members=members, filter="data")
        dist = unpacked / "package" / "dist"
        missing = [name for name in REQUIRED_FILES if not (dist / name).is_file()]
        if missing:
            raise MedpipeError(f"{spec} has no prebuilt dist/ ({', '.join(missing)} missing)")
        (dist / ".medpipe-ohif.json").write_text(json.dumps({"package": OHIF_PACKAGE, "version": version}))
        if target.exists():  # a half-unpacked folder from an interrupted older install
            shutil.rmtree(target)
        dist.rename(target)
    return target


def app_config(dicomweb_path: str = "/dicom-web", investigational_notice: bool = True) -> str:
    """OHIF's `app-config.js`: one DICOMweb data source at `dicomweb_path` on the page's own origin, so the browser
    makes no cross-origin request (the server behind that origin passes `/dicom-web/` on to the archive)."""
    path = json.dumps(dicomweb_path.rstrip("/"))
    notice = "" if investigational_notice else "\n  investigationalUseDialog: { option: 'never' },"
    return f"""/** OHIF configuration written by medpipe (medpipe/viewer/ohif.py): one DICOMweb archive, same origin. */
const dicomweb = window.location.origin + {path};
window.config = {{
  routerBasename: '/',
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'dicomweb',{notice}
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {{
        friendlyName: 'Orthanc (medpipe)',
        name: 'orthanc',
        wadoUriRoot: dicomweb,
        qidoRoot: dicomweb,
        wadoRoot: dicomweb,
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {{ enabled: true }},
      }},
    }},
  ],
}};
"""
