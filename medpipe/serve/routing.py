"""The node's settings file (YAML or JSON): its own AE, where results go, and which bundle reads which series.

A route matches a series by modality, and optionally by BodyPartExamined and SOP class; the first match wins and a
series no route matches is skipped with its reason. Relative paths are relative to the settings file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, first_line

TASKS = ("ct_segmentation", "classification")


@dataclass(frozen=True)
class Peer:
    """A remote application entity (the PACS that receives the results)."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    name: str
    bundle: Path
    task: str
    checkpoints: tuple[Path, ...]
    modality: tuple[str, ...]
    body_part: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    network: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    gradcam: bool = False  # classification only: also send a Grad-CAM overlay as a secondary-capture image

    def why_not(self, modality: str | None, body_part: str | None, sop_class: str | None) -> str | None:
        """None when the series matches, else the reason it does not."""
        if (modality or "").upper() not in self.modality:
            return f"modality {modality!r} not in {list(self.modality)}"
        if self.body_part and (body_part or "").upper() not in self.body_part:
            return f"body part {body_part!r} not in {list(self.body_part)}"
        if self.sop_class and sop_class not in self.sop_class:
            return f"SOP class {sop_class} not in {list(self.sop_class)}"
        return None


@dataclass(frozen=True)
class Settings:
    ae_title: str
    port: int
    host: str
    work_dir: Path
    allowed_calling_aes: tuple[str, ...]
    quiet_seconds: float
    destination: Peer | None
    routes: tuple[Route, ...]
    max_attempts: int = 2
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0

    def route_for(self, modality: str | None, body_part: str | None, sop_class: str | None) -> tuple[Route | None, str]:
        """The first matching route, or None and every route's reason for not matching."""
        reasons = []
        for route in self.routes:
            why = route.why_not(modality, body_part, sop_class)
            if why is None:
                return route, ""
            reasons.append(f"{route.name}: {why}")
        return None, "no route matches (" + "; ".join(reasons or ["no routes configured"]) + ")"


def _upper_tuple(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise MedpipeError(f"routing: {what} must be a string or a list, got {value!r}")
    return tuple(str(v).strip().upper() for v in items)


def _peer(raw: Any, what: str) -> Peer:
    if not isinstance(raw, dict) or not {"ae_title", "host", "port"} <= set(raw):
        raise MedpipeError(f"routing: {what} needs ae_title, host and port, got {raw!r}")
    return Peer(str(raw["ae_title"]), str(raw["host"]), int(raw["port"]))


def _route(raw: dict[str, Any], base: Path, index: int) -> Route:
    from medpipe.bundle.config import find_bundle
    from medpipe.values import flag

    name = str(raw.get("name", f"route{index}"))
    missing = [k for k in ("bundle", "task", "modality", "checkpoints") if k not in raw]
    if missing:
        raise MedpipeError(f"routing: route '{name}' lacks {missing}")
    if raw["task"] not in TASKS:
        raise MedpipeError(f"routing: route '{name}' task must be one of {list(TASKS)}, got {raw['task']!r}")
    bundle_ref = str(raw["bundle"])
    bundle = base / bundle_ref if (base / bundle_ref / "configs").is_dir() else find_bundle(bundle_ref)
    ckpts = [raw["checkpoints"]] if isinstance(raw["checkpoints"], str) else list(raw["checkpoints"])
    if not ckpts:
        raise MedpipeError(f"routing: route '{name}' lists no checkpoints")
    paths = tuple((base / str(c)).resolve() for c in ckpts)
    for path in paths:
        if not path.is_file():
            raise MedpipeError(f"routing: route '{name}' checkpoint '{path}' not found")
    gradcam = flag(raw.get("gradcam", False))
    if gradcam and raw["task"] != "classification":
        raise MedpipeError(f"routing: route '{name}' sets gradcam, which only classification routes have")
    options = raw.get("options") or {}
    if not isinstance(options, dict):
        raise MedpipeError(f"routing: route '{name}' options must be a mapping of config keys, got {options!r}")
    return Route(
        name=name, bundle=bundle.resolve(), task=str(raw["task"]), checkpoints=paths,
        modality=_upper_tuple(raw["modality"], "modality"), body_part=_upper_tuple(raw.get("body_part"), "body_part"),
        sop_class=tuple(str(s) for s in (raw.get("sop_class") or [])), network=raw.get("network"), options=options,
        gradcam=gradcam,
    )  # fmt: skip


def load_settings(path: str | Path, **overrides: Any) -> Settings:
    """Read and check the settings file; `overrides` (ae_title, port, work_dir, quiet_seconds …) win over it."""
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"routing file '{path}' not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as exc:
        raise MedpipeError(f"cannot parse routing file '{path}': {first_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise MedpipeError(f"routing file '{path}' must hold a mapping (node, destination, routes)")
    base = path.resolve().parent
    node = {**(raw.get("node") or {}), **{k: v for k, v in overrides.items() if v is not None}}
    unknown = set(node) - {"ae_title", "port", "host", "work_dir", "allowed_calling_aes", "quiet_seconds",
                           "max_attempts", "backoff_s", "backoff_max_s"}  # fmt: skip
    if unknown:
        raise MedpipeError(f"routing file '{path}': unknown node setting(s) {sorted(unknown)}")
    routes = raw.get("routes") or []
    if not isinstance(routes, list):
        raise MedpipeError(f"routing file '{path}': routes must be a list")
    allowed = node.get("allowed_calling_aes") or []
    return Settings(
        ae_title=str(node.get("ae_title", "MEDPIPE")),
        port=int(node.get("port", 11112)),
        host=str(node.get("host", "127.0.0.1")),
        work_dir=(base / str(node.get("work_dir", "medpipe_node"))).resolve(),
        allowed_calling_aes=tuple(str(a) for a in ([allowed] if isinstance(allowed, str) else allowed)),
        quiet_seconds=float(node.get("quiet_seconds", 5.0)),
        destination=_peer(raw["destination"], "destination") if raw.get("destination") else None,
        routes=tuple(_route(r, base, i) for i, r in enumerate(routes)),
        max_attempts=int(node.get("max_attempts", 2)),
        backoff_s=float(node.get("backoff_s", 5.0)),
        backoff_max_s=float(node.get("backoff_max_s", 300.0)),
    )
