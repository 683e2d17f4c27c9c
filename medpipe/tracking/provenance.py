"""What a tracked run records about where it came from: git SHA, library versions, bundle name and version, a
fingerprint of the data it saw, and the merged config of the job."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
from pathlib import Path
from typing import Any


def git_sha(path: str | Path) -> str:
    """HEAD of the checkout holding `path`, with '-dirty' when tracked files changed; 'unknown' outside git."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else False
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def data_fingerprint(datalists: dict[str, list[dict[str, Any]]], dataset_dir: str | None = None) -> str:
    """sha256 over the cases a job used: split, keys, values, with files as (path relative to the data set, size).

    Two runs with the same fingerprint saw the same files in the same splits, wherever the data set was mounted.
    """
    digest = hashlib.sha256()
    for split in sorted(datalists):
        for item in datalists[split]:
            row = []
            for key in sorted(item):
                value = item[key]
                if isinstance(value, str) and os.path.isfile(value):
                    rel = os.path.relpath(value, dataset_dir) if dataset_dir else os.path.basename(value)
                    value = [Path(rel).as_posix(), os.path.getsize(value)]
                elif not isinstance(value, (str, int, float, bool, type(None))):
                    continue
                row.append([key, value])
            digest.update(json.dumps([split, row], sort_keys=True).encode())
    return digest.hexdigest()


def running_config() -> dict[str, Any] | None:
    """The merged config (all files + overrides) of the MONAI ConfigParser that is instantiating the caller.

    Found on the call stack: a config component cannot be handed its own parser, and MONAI records the merged
    config only when its own `--tracking` is used.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner.get()
        frame = frame.f_back
    return None


def versions() -> dict[str, str]:
    import monai
    import torch

    import medpipe

    versions = {"medpipe": medpipe.__version__, "monai": monai.__version__, "torch": torch.__version__}
    return {f"versions.{k}": v for k, v in versions.items()}


def bundle_meta(bundle_root: str) -> tuple[str, str]:
    """(bundle name, version) from the bundle folder and its metadata.json."""
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    version = json.loads(meta_file.read_text()).get("version", "unknown") if meta_file.is_file() else "unknown"
    return Path(bundle_root).resolve().name, version
