"""The node's settings file (YAML or JSON): its own AE, where results go, and which bundle reads which series.

The destination is a DICOM peer (`ae_title`, `host`, `port`: C-STORE) or a DICOMweb service (`dicomweb: URL`, with
optional `auth`: STOW-RS); both are retried with the same back-off.

A route matches a series by modality, and optionally by BodyPartExamined and SOP class; the first match wins and a
series no route matches is skipped with its reason. Relative paths are relative to the settings file.

The file is checked against SCHEMA (JSON Schema, jsonschema) and a few rules a schema cannot say (unique route
names, bundles and checkpoints that exist) before anything else happens: every problem is reported, one line each,
before any model loads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, first_line

TASKS = ("ct_segmentation", "classification")
ACTIONS = ("refuse", "send")  # what a route does with a doubtful result: fail the job, or send it with the warning
# total lung volume (mL) of an adult chest CT that covers the lungs (docs/serve.md, "Doubtful results")
LUNG_VOLUME_ML = (1500.0, 10000.0)

# ------------------------------------------------------------------------------------------------------ schema
_AE_TITLE = {
    "type": "string", "minLength": 1, "maxLength": 16, "pattern": r"^(?! *$)[^\\\x00-\x1f\x7f]+$",
    "description": "an AE title (1-16 characters, no backslash or control characters, not only spaces)",
}  # fmt: skip
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_TEXT = {"type": "string", "minLength": 1}
_UID = {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)*$", "maxLength": 64, "description": "a DICOM UID"}
_CODE = {"type": "string", "maxLength": 16}  # a DICOM CS value (Modality, BodyPartExamined); "" = absent
_URL = {"type": "string", "pattern": r"^https?://[^/\s]+(/\S*)?$", "description": "an http:// or https:// URL"}
_ENV_NAME = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$", "description": "an environment variable name"}
_PEER_KEYS = ("ae_title", "host", "port")  # a DICOM peer (C-STORE) …
_WEB_KEYS = ("dicomweb", "auth")  # … or a DICOMweb service (STOW-RS): a destination is one of the two


def _one_or_many(item: dict[str, Any], what: str) -> dict[str, Any]:
    """One value or a non-empty list of them (a lone string is one value, never a list of its characters)."""
    return {
        "anyOf": [item, {"type": "array", "items": item, "minItems": 1}],
        "description": f"{what} or a non-empty list of them",
    }


SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "node": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ae_title": _AE_TITLE,
                "port": _PORT,
                "host": _TEXT,
                "work_dir": _TEXT,
                "allowed_calling_aes": _one_or_many(_AE_TITLE, "an AE title"),
                "quiet_seconds": {"type": "number", "exclusiveMinimum": 0},
                "max_attempts": {"type": "integer", "minimum": 1},
                "backoff_s": {"type": "number", "exclusiveMinimum": 0},
                "backoff_max_s": {"type": "number", "exclusiveMinimum": 0},
            },
        },
        "destination": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "ae_title": _AE_TITLE,
                "host": _TEXT,
                "port": _PORT,
                "dicomweb": _URL,  # the service's root, e.g. http://127.0.0.1:8042/dicom-web
                "auth": {  # HTTP basic (username + password or password_env) or a bearer token (token_env)
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "username": _TEXT,
                        "password": {"type": "string"},
                        "password_env": _ENV_NAME,
                        "token_env": _ENV_NAME,
                    },
                },
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},  # one association / HTTP request
            },
            "if": {"required": ["dicomweb"]},
            "then": {
                "not": {"anyOf": [{"required": [key]} for key in _PEER_KEYS]},
                "description": "a dicomweb destination takes no ae_title, host or port (give one kind, not both)",
            },
            "else": {
                "required": list(_PEER_KEYS),
                "not": {"required": ["auth"]},
                "description": "auth belongs to a dicomweb destination",
            },
        },
        "routes": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "task", "bundle", "checkpoints", "modality"],
                "properties": {
                    "name": _TEXT,
                    "task": {"enum": list(TASKS)},
                    "bundle": _TEXT,
                    "checkpoints": _one_or_many(_TEXT, "a checkpoint path"),
                    "modality": _one_or_many({**_CODE, "minLength": 1}, "a modality"),
                    "body_part": _one_or_many(_CODE, "a body part"),
                    "sop_class": _one_or_many(_UID, "a SOP class UID"),
                    "network": _TEXT,
                    "options": {"type": "object"},
                    "gradcam": {"type": "boolean"},
                    "on_wrong_input": {"enum": list(ACTIONS)},
                    "on_implausible": {"enum": list(ACTIONS)},
                    "lung_volume_ml": {
                        "type": ["array", "null"],
                        "items": {"type": "number", "minimum": 0},
                        "minItems": 2,
                        "maxItems": 2,
                    },
                },
            },
        },
    },
}


def _where(path: Any) -> str:
    """('routes', 1, 'port') -> 'routes[1].port'."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "the file"


def _error_lines(error: Any) -> list[str]:
    """One line per schema error; an anyOf error is explained by the branch that fitted the value's type."""
    where = _where(error.absolute_path)
    if error.validator == "anyOf":
        inner = [e for e in error.context if e.relative_path]  # errors inside the list branch: its type fitted
        if inner:
            return [line for e in inner for line in _error_lines(e)]
        if not (isinstance(error.instance, str) and error.instance):  # a string failing the one-value branch
            return [f"{where} must be {error.schema['description']}, got {error.instance!r}"]
        return [line for e in error.context for line in _error_lines(e)]
    if error.validator == "required" and where == "destination":
        missing = [key for key in _PEER_KEYS if key not in error.instance]
        return [f"{where} needs ae_title, host and port (a DICOM peer; missing {missing}) or dicomweb (a DICOMweb URL)"]
    if error.validator == "not" and "description" in error.schema:
        return [f"{where}: {error.schema['description']}"]
    if error.validator == "pattern" and "description" in error.schema:
        return [f"{where} must be {error.schema['description']}, got {error.instance!r}"]
    if error.validator == "enum":
        return [f"{where} must be one of {error.validator_value}, got {error.instance!r}"]
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        section = {"node": "node", "destination": "destination", "destination.auth": "auth"}.get(where, "top-level")
        section = "route" if where.startswith("routes[") else section
        return [f"{where}: unknown {section} setting(s) {extra}"]
    return [f"{where}: {error.message}"]


def schema_errors(raw: Any) -> list[str]:
    """Every way `raw` (the parsed file) breaks SCHEMA, one line each, in file order."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(SCHEMA)
    errors = sorted(validator.iter_errors(raw), key=lambda e: [str(p) for p in e.absolute_path])
    return list(dict.fromkeys(line for error in errors for line in _error_lines(error)))  # each line once


# ----------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Peer:
    """A remote application entity (the PACS that receives the results by C-STORE, or a C-GET source)."""

    ae_title: str
    host: str
    port: int
    timeout_s: float = 30.0

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class WebAuth:
    """HTTP credentials for a DICOMweb service, resolved when the settings load (never shown: repr hides them)."""

    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DicomWebService:
    """A DICOMweb service (PS3.18): results go by STOW-RS, a pull lists by QIDO-RS and fetches by WADO-RS."""

    url: str  # the service root, without a trailing slash: {url}/studies …
    auth: WebAuth | None = None
    timeout_s: float = 30.0

    def __str__(self) -> str:
        return self.url


Destination = Peer | DicomWebService


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
    # the input guard says the image is not the bundle's kind: refuse (job failed) or send with the warning
    on_wrong_input: str = "refuse"
    # ct_segmentation: a total lung volume outside this range (None: no check) is implausible …
    lung_volume_ml: tuple[float, float] | None = LUNG_VOLUME_ML
    on_implausible: str = "send"  # … and is refused, or sent with the warning

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
    destination: Destination | None
    routes: tuple[Route, ...]
    max_attempts: int = 2
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0

    def __post_init__(self) -> None:
        # models and results are keyed by route name: two routes with one name would share one model
        names = [route.name for route in self.routes]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise MedpipeError(f"routing: route names must be unique; used more than once: {twice}")

    def route_for(self, modality: str | None, body_part: str | None, sop_class: str | None) -> tuple[Route | None, str]:
        """The first matching route, or None and every route's reason for not matching."""
        reasons = []
        for route in self.routes:
            why = route.why_not(modality, body_part, sop_class)
            if why is None:
                return route, ""
            reasons.append(f"{route.name}: {why}")
        return None, "no route matches (" + "; ".join(reasons or ["no routes configured"]) + ")"


def _listed(value: Any) -> list[Any]:
    """A schema-checked one-or-many value as a list."""
    return [] if value is None else [value] if not isinstance(value, list) else list(value)


def _route_problems(raw: dict[str, Any], base: Path, index: int) -> list[str]:
    """What the schema cannot check: the bundle and checkpoints exist, keys that fit only one task."""
    from medpipe.bundle.config import find_bundle

    where, problems = f"routes[{index}] ('{raw['name']}')", []
    bundle_ref = str(raw["bundle"])
    if not (base / bundle_ref / "configs").is_dir():
        try:
            find_bundle(bundle_ref)
        except MedpipeError as exc:
            problems.append(f"{where}.bundle: {exc}")
    for ckpt in _listed(raw["checkpoints"]):
        if not (base / str(ckpt)).is_file():
            problems.append(f"{where}: checkpoint '{(base / str(ckpt)).resolve()}' not found")
    if raw.get("gradcam") and raw["task"] != "classification":
        problems.append(f"{where} sets gradcam, which only classification routes have")
    for key in ("lung_volume_ml", "on_implausible"):
        if key in raw and raw["task"] != "ct_segmentation":
            problems.append(f"{where} sets {key}, which only ct_segmentation routes have")
    bounds = raw.get("lung_volume_ml")
    if bounds is not None and bounds[0] >= bounds[1]:
        problems.append(f"{where}.lung_volume_ml: [lowest, highest] must rise, got {bounds}")
    return problems


def _route(raw: dict[str, Any], base: Path) -> Route:
    """A checked route entry (schema and _route_problems passed) as a Route."""
    from medpipe.bundle.config import find_bundle

    bundle_ref = str(raw["bundle"])
    bundle = base / bundle_ref if (base / bundle_ref / "configs").is_dir() else find_bundle(bundle_ref)
    bounds = raw.get("lung_volume_ml", LUNG_VOLUME_ML)
    return Route(
        name=raw["name"], bundle=bundle.resolve(), task=raw["task"],
        checkpoints=tuple((base / str(c)).resolve() for c in _listed(raw["checkpoints"])),
        modality=tuple(m.strip().upper() for m in _listed(raw["modality"])),
        body_part=tuple(b.strip().upper() for b in _listed(raw.get("body_part"))),
        sop_class=tuple(_listed(raw.get("sop_class"))), network=raw.get("network"), options=raw.get("options") or {},
        gradcam=bool(raw.get("gradcam", False)), on_wrong_input=raw.get("on_wrong_input", "refuse"),
        lung_volume_ml=None if bounds is None else (float(bounds[0]), float(bounds[1])),
        on_implausible=raw.get("on_implausible", "send"),
    )  # fmt: skip


def _auth_problems(auth: dict[str, Any]) -> list[str]:
    """destination.auth: one complete kind of credentials, and the environment variables it names are set."""
    problems = []
    if "token_env" in auth:
        if set(auth) != {"token_env"}:
            problems.append("destination.auth: token_env (a bearer token) goes alone, without username or password")
    elif "username" not in auth or ("password" in auth) == ("password_env" in auth):
        problems.append("destination.auth needs username and one of password / password_env, or token_env alone")
    for key in ("password_env", "token_env"):
        if key in auth and not os.environ.get(auth[key]):
            problems.append(f"destination.auth.{key}: environment variable {auth[key]} is not set")
    return problems


def _destination(raw: dict[str, Any] | None) -> Destination | None:
    """A checked destination entry (schema and _auth_problems passed) as a Peer or a DicomWebService."""
    if raw is None:
        return None
    timeout = float(raw.get("timeout_s", 30.0))
    if "dicomweb" not in raw:
        return Peer(raw["ae_title"], raw["host"], raw["port"], timeout)
    auth = raw.get("auth")
    if auth is not None:
        auth = WebAuth(
            username=auth.get("username"), password=os.environ[auth["password_env"]] if "password_env" in auth else
            auth.get("password"), token=os.environ[auth["token_env"]] if "token_env" in auth else None,
        )  # fmt: skip
    return DicomWebService(str(raw["dicomweb"]).rstrip("/"), auth, timeout)


def load_settings(path: str | Path, **overrides: Any) -> Settings:
    """Read and check the settings file; `overrides` (ae_title, port, work_dir, quiet_seconds …) win over it.

    Every problem (schema, duplicate route names, missing bundles or checkpoints) is reported at once, one line each.
    """
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
    node = raw.get("node") if isinstance(raw.get("node"), dict) else {}
    raw = {**raw, "node": {**node, **{k: v for k, v in overrides.items() if v is not None}}}
    problems = schema_errors(raw)
    routes = raw.get("routes") or []
    if not problems:  # the schema passed: the rules it cannot say
        names = [r["name"] for r in routes]
        for name in sorted({n for n in names if names.count(n) > 1}):
            at = [i for i, n in enumerate(names) if n == name]
            problems.append(f"route name '{name}' is used by routes {at}: names must be unique")
        for i, r in enumerate(routes):
            problems.extend(_route_problems(r, base, i))
        if isinstance(raw.get("destination"), dict) and "auth" in raw["destination"]:
            problems.extend(_auth_problems(raw["destination"]["auth"]))
        node = raw["node"]
        if node.get("backoff_s", 5.0) > node.get("backoff_max_s", 300.0):
            problems.append(f"node.backoff_s ({node.get('backoff_s', 5.0)}) is above node.backoff_max_s "
                            f"({node.get('backoff_max_s', 300.0)})")  # fmt: skip
    if len(problems) == 1:
        raise MedpipeError(f"routing file '{path}': {problems[0]}")
    if problems:
        raise MedpipeError(f"routing file '{path}' has {len(problems)} problems:\n  " + "\n  ".join(problems))
    node, destination = raw["node"], raw.get("destination")
    return Settings(
        ae_title=node.get("ae_title", "MEDPIPE"),
        port=node.get("port", 11112),
        host=node.get("host", "127.0.0.1"),
        work_dir=(base / node.get("work_dir", "medpipe_node")).resolve(),
        allowed_calling_aes=tuple(a.strip() for a in _listed(node.get("allowed_calling_aes"))),
        quiet_seconds=float(node.get("quiet_seconds", 5.0)),
        destination=_destination(destination),
        routes=tuple(_route(r, base) for r in routes),
        max_attempts=node.get("max_attempts", 2),
        backoff_s=float(node.get("backoff_s", 5.0)),
        backoff_max_s=float(node.get("backoff_max_s", 300.0)),
    )
