"""Share trained bundles: `package` one into a versioned zip, `index` a folder of zips, `install` from a folder or URL.

A package `<name>_v<version>.zip` holds `<name>/` with configs, docs, LICENSE, models/model.pt (plain state dict),
its exports models/model.ts (TorchScript), models/model.onnx (and models/model.int8.onnx when one was exported beside
the checkpoint), each with its sidecar `<file>.json` (medpipe.export.sidecar), and large_files.yml (sha256 of each
weight and export file). `model_info.json` beside the zips
maps `<name>_v<version>` to the zip, its sha256 and the MONAI/PyTorch versions it was made with (the MONAI model
zoo's index, with sha256). `install` trusts nothing it downloads: it checks the zip's sha256 against the index,
refuses absolute paths, `..` and links in the archive, checks each weight's sha256, that each export matches its
sidecar and was made from the packaged model.pt, the versions, and loads the weights with `weights_only=True`."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write, atomic_write_text, sha256_file

INDEX_FILE = "model_info.json"
MAX_ARCHIVE_BYTES = 4 << 30  # refuse zip bombs and runaway downloads
MAX_MEMBERS = 10_000
ZIP_DATE = (2020, 1, 1, 0, 0, 0)  # fixed member timestamps: the same inputs give the same zip and sha256




def default_install_dir() -> Path:
    """`$MEDPIPE_ZOO_DIR`, else ~/.cache/medpipe/bundles (like MONAI's torch-hub bundle folder)."""
    return Path(os.environ.get("MEDPIPE_ZOO_DIR") or Path.home() / ".cache" / "medpipe" / "bundles")


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.+-]", version))


def _major_minor(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else (0, 0)


def _entry(name: str, meta: dict[str, Any], zip_path: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "version": meta["version"],
        "source": zip_path.name,
        "checksum": sha256_file(zip_path),
        "checksum_type": "sha256",
        "size": zip_path.stat().st_size,
        "monai_version": meta.get("monai_version"),
        "pytorch_version": meta.get("pytorch_version"),
        **(extra or {}),
    }


def package(
    bundle: str, out_dir: str = "dist", ckpt: str | None = None, network: str | None = None, **overrides: Any
) -> Path:
    """Zip a trained bundle as `<out_dir>/<name>_v<version>.zip` and add its entry to `<out_dir>/model_info.json`.

    `ckpt` defaults to the bundle's models/model.pt; `network` and `overrides` (e.g. image_size) must be the ones
    it was trained with: the weights are loaded strictly into that network and exported to TorchScript.
    """
    import yaml

    from medpipe.bundle.config import find_bundle
    from medpipe.export.exporters import bundle_network, load_weights

    bundle_dir = find_bundle(bundle)
    name, meta = bundle_dir.resolve().name, json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    weights = Path(ckpt) if ckpt else bundle_dir / "models" / "model.pt"
    if not weights.is_file():
        raise MedpipeError(f"no weights '{weights}': train the bundle first or pass --ckpt")
    bundle_net = bundle_network(bundle_dir, network, overrides)
    load_weights(bundle_net.net, weights)  # a checkpoint of another network is refused before anything is written

    zip_path = Path(out_dir) / f"{name}_v{meta['version']}.zip"
    with tempfile.TemporaryDirectory(prefix="medpipe-zoo-") as tmp:
        models = _exports(bundle_net, weights, Path(tmp))
        members: dict[str, Path] = {}
        for sub in ("configs", "docs"):
            for f in sorted((bundle_dir / sub).rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    members[f"{sub}/{f.relative_to(bundle_dir / sub).as_posix()}"] = f
        if (bundle_dir / "LICENSE").is_file():
            members["LICENSE"] = bundle_dir / "LICENSE"
        members.update({f"models/{f.name}": f for f in models})
        weight_files = [p for p in members if p.startswith("models/") and not p.endswith(".json")]
        large = [{"path": p, "url": None, "hash_val": sha256_file(members[p]), "hash_type": "sha256"}
                 for p in sorted(weight_files)]  # fmt: skip
        record = {"large_files": large, "packaged": {"network": network, "overrides": overrides}}
        (Path(tmp) / "large_files.yml").write_text(yaml.safe_dump(record, sort_keys=False))
        members["large_files.yml"] = Path(tmp) / "large_files.yml"

        def write(target: Path) -> None:
            with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as zf:
                for arcname, src in sorted(members.items()):
                    info = zipfile.ZipInfo(f"{name}/{arcname}", ZIP_DATE)
                    info.external_attr = (stat.S_IFREG | 0o644) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, src.read_bytes())

        atomic_write(zip_path, write)
    entries = _read_index_file(Path(out_dir) / INDEX_FILE) if (Path(out_dir) / INDEX_FILE).is_file() else {}
    key = f"{name}_v{meta['version']}"
    entries[key] = _entry(name, meta, zip_path, {"network": network})
    atomic_write_text(Path(out_dir) / INDEX_FILE, json.dumps(entries, indent=2, sort_keys=True))
    print(f"packaged {zip_path} (sha256 {entries[key]['checksum']})")
    return zip_path


def _exports(bundle_net: Any, weights: Path, folder: Path) -> list[Path]:
    """models/ of a package in `folder`: model.pt, fresh TorchScript and ONNX exports with their sidecars, and the
    int8 ONNX exported beside `weights` if there is one (verified to come from `weights`, its sidecar renamed)."""
    from medpipe.export.exporters import export_network
    from medpipe.export.sidecar import export_path, sidecar_path, verify_export

    ckpt = folder / "model.pt"
    shutil.copyfile(weights, ckpt)
    files = [ckpt]
    for fmt in ("torchscript", "onnx"):
        out = export_network(bundle_net, ckpt, fmt)
        files += [out, sidecar_path(out)]
    int8 = export_path(weights, "onnx", "int8")
    if int8.is_file():
        hint = f"medpipe export {bundle_net.bundle_dir} --format onnx --quantize int8 --ckpt {weights}"
        record = verify_export(int8, weights, hint)
        target = export_path(ckpt, "onnx", "int8")
        shutil.copyfile(int8, target)
        record.update(file=target.name, checkpoint=ckpt.name)
        sidecar_path(target).write_text(json.dumps(record, indent=2, sort_keys=True))
        files += [target, sidecar_path(target)]
    return files


def _read_index_file(path: Path) -> dict[str, Any]:
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MedpipeError(f"cannot read zoo index '{path}': {exc}") from None
    if not isinstance(entries, dict):
        raise MedpipeError(f"zoo index '{path}' is not a JSON object")
    return entries


def _zip_metadata(zip_path: Path) -> tuple[str, dict[str, Any]]:
    """(bundle name, metadata.json) of a package, refusing anything that is not one."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            tops = {n.split("/", 1)[0] for n in zf.namelist()}
            if len(tops) != 1:
                raise MedpipeError(f"'{zip_path}' is not a bundle package: one top folder expected, got {sorted(tops)}")
            name = tops.pop()
            return name, json.loads(zf.read(f"{name}/configs/metadata.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise MedpipeError(f"'{zip_path}' is not a valid bundle package: {exc}") from None


def index(folder: str) -> Path:
    """Write `<folder>/model_info.json` listing every `*.zip` bundle package in the folder."""
    root = Path(folder)
    if not root.is_dir():
        raise MedpipeError(f"zoo folder '{root}' does not exist")
    entries = {}
    for zip_path in sorted(root.glob("*.zip")):
        name, meta = _zip_metadata(zip_path)
        entries[f"{name}_v{meta['version']}"] = _entry(name, meta, zip_path)
    path = atomic_write_text(root / INDEX_FILE, json.dumps(entries, indent=2, sort_keys=True))
    print(f"indexed {len(entries)} package(s) in {path}")
    return path


def _is_url(location: str) -> bool:
    return urllib.parse.urlparse(location).scheme in ("http", "https")


def _download(url: str, target: Path, timeout_s: float, what: str) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response, open(target, "wb") as out:  # noqa: S310
            total = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                total += len(block)
                if total > MAX_ARCHIVE_BYTES:
                    raise MedpipeError(f"{what} {url} is larger than {MAX_ARCHIVE_BYTES >> 20} MiB; refusing")
                out.write(block)
    except urllib.error.HTTPError as exc:
        raise MedpipeError(f"{what} {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise MedpipeError(f"{what} {url} is unreachable ({getattr(exc, 'reason', exc)})") from None


def fetch_index(location: str, timeout_s: float = 30.0) -> tuple[dict[str, Any], str]:
    """(entries, base) of a zoo index given as a folder, a model_info.json file or an http(s) URL of either."""
    if _is_url(location):
        url = location if location.endswith(".json") else location.rstrip("/") + "/" + INDEX_FILE
        with tempfile.TemporaryDirectory(prefix="medpipe-zoo-") as tmp:
            _download(url, Path(tmp) / INDEX_FILE, timeout_s, "zoo index")
            return _read_index_file(Path(tmp) / INDEX_FILE), url
    path = Path(location)
    path = path / INDEX_FILE if path.is_dir() else path
    if not path.is_file():
        raise MedpipeError(f"zoo index '{location}' not found (give a folder with {INDEX_FILE}, the file, or a URL)")
    return _read_index_file(path), str(path.resolve())


def select_entry(entries: dict[str, Any], spec: str) -> dict[str, Any]:
    """The entry for `NAME` (newest version) or `NAME==VERSION`."""
    match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:==([A-Za-z0-9_.+-]+))?", spec.strip())
    if not match:
        raise MedpipeError(f"bundle spec '{spec}' must look like NAME or NAME==VERSION")
    name, version = match.groups()
    candidates = [e for e in entries.values() if isinstance(e, dict) and e.get("name") == name]
    if not candidates:
        names = sorted({e.get("name") for e in entries.values() if isinstance(e, dict)})
        raise MedpipeError(f"no bundle '{name}' in the zoo index; available: {names}")
    if version is None:
        return max(candidates, key=lambda e: _version_key(str(e["version"])))
    chosen = [e for e in candidates if str(e.get("version")) == version]
    if not chosen:
        versions = sorted((str(e["version"]) for e in candidates), key=_version_key)
        raise MedpipeError(f"bundle '{name}' has no version {version} in the zoo index; versions: {versions}")
    return chosen[0]


def _fetch_package(entry: dict[str, Any], base: str, target: Path, timeout_s: float) -> None:
    source = str(entry.get("source", ""))
    if _is_url(base) or _is_url(source):
        _download(urllib.parse.urljoin(base, source), target, timeout_s, "package")
        return
    if not source or Path(source).is_absolute() or ".." in Path(source).parts:
        raise MedpipeError(f"zoo index entry source '{source}' must be a file name beside the index")
    src = Path(base).parent / source
    if not src.is_file():
        raise MedpipeError(f"package '{src}' listed in the zoo index does not exist")
    shutil.copyfile(src, target)


def safe_extract(zip_path: Path, name: str, dest: Path) -> None:
    """Extract a package, refusing absolute paths, `..`, links, special files, other top folders and zip bombs."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_ARCHIVE_BYTES:
                raise MedpipeError(f"package '{zip_path.name}' is too large to install")
            for info in infos:
                member = info.filename
                parts = Path(member).parts
                if member.startswith(("/", "\\")) or ".." in parts or "\\" in member or ":" in member:
                    raise MedpipeError(f"package '{zip_path.name}' has an unsafe path '{member}'; refusing it")
                if not parts or parts[0] != name:
                    raise MedpipeError(f"package '{zip_path.name}' has '{member}' outside its folder '{name}/'")
                kind = stat.S_IFMT(info.external_attr >> 16)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise MedpipeError(f"package '{zip_path.name}' has a link or special file '{member}'; refusing it")
            bad = zf.testzip()
            if bad is not None:
                raise MedpipeError(f"package '{zip_path.name}' is corrupt (CRC error in '{bad}')")
            zf.extractall(dest)
    except zipfile.BadZipFile as exc:
        raise MedpipeError(f"package '{zip_path.name}' is not a valid zip ({exc})") from None


def check_versions(meta: dict[str, Any]) -> None:
    """The bundle's MONAI and PyTorch major.minor must not be newer than, or of another major than, the installed."""
    import monai

    for package_name, installed in (("monai", monai.__version__), ("pytorch", torch.__version__)):
        required = meta.get(f"{package_name}_version")
        if not required:
            continue
        have, need = _major_minor(installed), _major_minor(str(required))
        if have[0] != need[0] or have < need:
            raise MedpipeError(
                f"bundle needs {package_name} {required}, installed is {installed}; "
                f"install a matching {package_name} or pass --ignore_versions"
            )


def check_installed_bundle(bundle_dir: Path) -> None:
    """Each weight file matches large_files.yml's sha256, each export its sidecar and model.pt, and model.pt loads as
    plain tensors (weights_only)."""
    import yaml

    from medpipe.export.sidecar import verify_export

    listing = bundle_dir / "large_files.yml"
    record = yaml.safe_load(listing.read_text()) if listing.is_file() else None
    if not isinstance(record, dict) or not isinstance(record.get("large_files"), list):
        raise MedpipeError(f"package has no valid large_files.yml in '{bundle_dir.name}/'")
    for item in record["large_files"]:
        path = bundle_dir / str(item.get("path", ""))
        if not path.resolve().is_relative_to(bundle_dir.resolve()) or not path.is_file():
            raise MedpipeError(f"large_files.yml lists '{item.get('path')}', which the package lacks")
        if item.get("hash_type") != "sha256" or sha256_file(path) != item.get("hash_val"):
            raise MedpipeError(f"'{item.get('path')}' does not match its sha256 in large_files.yml; refusing it")
    ckpt = bundle_dir / "models" / "model.pt"
    listed = {str(item.get("path")) for item in record["large_files"]}
    for export in sorted((bundle_dir / "models").glob("*")):
        if export.suffix in (".onnx", ".ts"):
            if f"models/{export.name}" not in listed:
                raise MedpipeError(f"package has 'models/{export.name}', not listed in large_files.yml; refusing it")
            verify_export(export, ckpt, "package the bundle again with `medpipe zoo package`")
    try:
        torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedpipeError(f"models/model.pt does not load as plain weights (weights_only=True): {exc}") from None


def install(
    spec: str, index: str, dest: str | None = None, overwrite: bool = False, ignore_versions: bool = False,
    timeout_s: float = 30.0, allowed_modules: str | Sequence[str] | None = None,
) -> Path:  # fmt: skip
    """medpipe zoo install NAME[==VERSION] --index FOLDER_OR_URL [--dest DIR] [--overwrite]
    [--allowed_modules medpipe,monai,torch,os]

    Download (file or http), verify and unpack a bundle into `<dest>/<name>` (default $MEDPIPE_ZOO_DIR or
    ~/.cache/medpipe/bundles). Nothing is written there unless every check passes. A bundle's configs are code:
    with --allowed_modules, configs that import or call anything else are refused (medpipe.bundle.trust).
    """
    from medpipe.bundle.trust import TRUST_NOTE, check_allowed_modules

    allowed = _names(allowed_modules)
    entries, base = fetch_index(index, timeout_s)
    entry = select_entry(entries, spec)
    name = str(entry["name"])
    target = Path(dest) if dest else default_install_dir()
    final = target / name
    if final.exists() and not overwrite:
        raise MedpipeError(f"'{final}' already exists; pass --overwrite to replace it")
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=target) as tmp:
        zip_path = Path(tmp) / f"{name}.zip"
        _fetch_package(entry, base, zip_path, timeout_s)
        if entry.get("checksum_type", "sha256") != "sha256" or sha256_file(zip_path) != entry.get("checksum"):
            raise MedpipeError(f"package {entry.get('source')} does not match the sha256 in the zoo index; refusing it")
        safe_extract(zip_path, name, Path(tmp) / "unpacked")
        unpacked = Path(tmp) / "unpacked" / name
        meta = json.loads((unpacked / "configs" / "metadata.json").read_text())
        if str(meta.get("version")) != str(entry["version"]):
            raise MedpipeError(f"package says version {meta.get('version')}, the index {entry['version']}; refusing it")
        if not ignore_versions:
            check_versions(meta)
        check_installed_bundle(unpacked)
        if allowed:
            check_allowed_modules(unpacked, allowed)
        else:
            print(TRUST_NOTE)
        if final.exists():
            old = Path(tmp) / "replaced"
            os.replace(final, old)
        os.replace(unpacked, final)
    print(f"installed {name} {entry['version']} to {final}")
    return final


def _names(value: str | Sequence[str] | None) -> list[str]:
    """`a,b` (fire gives a string or a tuple) → ['a', 'b']."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [v.strip() for v in items if v.strip()]
