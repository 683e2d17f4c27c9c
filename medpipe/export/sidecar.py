"""Where an export lives and how it is trusted: `<ckpt stem>.onnx|.int8.onnx|.ts` beside the checkpoint, and a
sidecar `<file>.json` holding the export's sha256, the checkpoint's sha256 and the exporting versions.

A runtime loads an export only when its bytes match the sidecar (nobody changed it) and the checkpoint beside it
still matches the one it was exported from (it is not stale after retraining)."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text, sha256_file

FORMATS = ("onnx", "torchscript")
QUANTIZE = (None, "int8")


def export_path(ckpt_path: str | Path, fmt: str, quantize: str | None = None) -> Path:
    """`model.pt` -> `model.onnx`, `model.int8.onnx` or `model.ts` in the checkpoint's folder."""
    if fmt not in FORMATS:
        raise MedpipeError(f"export format must be one of {list(FORMATS)}, got '{fmt}'")
    if quantize not in QUANTIZE:
        raise MedpipeError(f"--quantize must be int8 or absent, got '{quantize}'")
    if quantize and fmt != "onnx":
        raise MedpipeError("--quantize int8 needs --format onnx (ONNX Runtime quantization)")
    ckpt = Path(ckpt_path)
    suffix = ".ts" if fmt == "torchscript" else (f".{quantize}.onnx" if quantize else ".onnx")
    return ckpt.with_name(ckpt.stem + suffix)


def sidecar_path(export_file: str | Path) -> Path:
    return Path(f"{export_file}.json")


def versions() -> dict[str, str]:
    """The versions that produced an export: a runtime that differs may round differently."""
    import monai
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            continue
    return found


def write_sidecar(export_file: str | Path, ckpt_path: str | Path, info: dict[str, Any]) -> Path:
    """Write `<export_file>.json`: the export's and the checkpoint's sha256, the versions and `info`."""
    export_file, ckpt = Path(export_file), Path(ckpt_path)
    record = {
        "file": export_file.name,
        "sha256": sha256_file(export_file),
        "checkpoint": ckpt.name,
        "checkpoint_sha256": sha256_file(ckpt),
        "versions": versions(),
        **info,
    }
    return atomic_write_text(sidecar_path(export_file), json.dumps(record, indent=2, sort_keys=True))


def verify_export(export_file: str | Path, ckpt_path: str | Path | None, hint: str) -> dict[str, Any]:
    """The sidecar record of `export_file`, after checking the file against it; one-line errors otherwise.

    hint: the command that (re)makes the export, appended to every error.
    ckpt_path: the checkpoint the export must come from (None: do not check it, e.g. a zoo package's own check).
    """
    export_file = Path(export_file)
    sidecar = sidecar_path(export_file)
    if not export_file.is_file():
        raise MedpipeError(f"no export '{export_file}': make it with `{hint}`")
    try:
        record = json.loads(sidecar.read_text())
        expected = str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise MedpipeError(
            f"export '{export_file}' has no valid sidecar '{sidecar.name}'; re-export: `{hint}`"
        ) from None
    if sha256_file(export_file) != expected:
        raise MedpipeError(
            f"export '{export_file}' does not match the sha256 in '{sidecar.name}' (changed after export); "
            f"refusing it; re-export: `{hint}`"
        )
    if ckpt_path is not None and Path(ckpt_path).is_file():
        if sha256_file(ckpt_path) != record.get("checkpoint_sha256"):
            raise MedpipeError(
                f"export '{export_file}' was made from another checkpoint than '{ckpt_path}' (stale); "
                f"re-export: `{hint}`"
            )
    return record
