"""Declared, typed bundle parameters: what a user may set with `--key value`, checked and coerced before use.

Every bundle's public parameters are declared once: the ones all bundles share in
`medpipe/bundle/configs/parameters.json`, a bundle's own in `bundles/<name>/configs/parameters.json` (a declaration
there overrides the shared one). A declaration holds the type, the allowed values or range and a one-line help;
the default is the value in the bundle's configs (they stay the source of truth).

Both entry points use this: `medpipe run` coerces overrides before the config is parsed, and the configs' first
`initialize` step (`medpipe.bundle.config.check_overrides`) coerces the running config of `python -m monai.bundle run`,
where python-fire has already turned `--channels_last false` into the string 'false'. Configs then use typed values
directly (`"_disabled_": "$not @resume"`).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError
from medpipe.values import flag

SHARED_FILE = Path(__file__).with_name("configs") / "parameters.json"
TYPES = ("bool", "int", "float", "str", "path", "dir", "file", "files", "paths", "json")
_NULL = ("none", "null", "")


@dataclass(frozen=True)
class Parameter:
    """One declared parameter: `type` is one of TYPES; `dir`/`file`/`files`/`paths` (files or folders) must exist
    when given; `json` is a JSON object or list (python-fire hands one over parsed, `medpipe run` as text)."""

    name: str
    type: str
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    nullable: bool = False

    def coerce(self, value: Any) -> Any:
        """The value as this parameter's type, or a MedpipeError saying what was expected."""
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL and self.type != "str"):
            if self.nullable or self.type in ("files", "paths"):
                return [] if self.type in ("files", "paths") else None
            raise self._error(value, "a value (this parameter cannot be empty)")
        typed = _COERCE[self.type](self, value)
        if self.choices is not None and typed not in self.choices:
            raise self._error(value, "one of " + ", ".join(str(c) for c in self.choices))
        if self.min is not None and typed < self.min:
            raise self._error(value, f"a value >= {self.min:g}")
        if self.max is not None and typed > self.max:
            raise self._error(value, f"a value <= {self.max:g}")
        return typed

    def _error(self, value: Any, expected: str) -> MedpipeError:
        return MedpipeError(f"--{self.name} {value!r}: expected {expected} ({self.help})")

    def describe(self) -> str:
        """`int >= 1`, `str: fp32|bf16`, `file or null` …: the allowed values in a few characters."""
        text = self.type
        if self.choices is not None:
            text += ": " + "|".join(str(c) for c in self.choices)
        if self.min is not None:
            text += f" >= {self.min:g}"
        if self.max is not None:
            text += f" <= {self.max:g}"
        return text + (" or null" if self.nullable else "")


def _as_bool(p: Parameter, value: Any) -> bool:
    if isinstance(value, int) and not isinstance(value, bool) and value not in (0, 1):
        raise p._error(value, "true or false")
    try:
        return flag(value)
    except MedpipeError:
        raise p._error(value, "true or false") from None


def _as_int(p: Parameter, value: Any) -> int:
    if isinstance(value, bool):
        raise p._error(value, "a whole number")
    if isinstance(value, int):
        return value
    try:
        number = float(str(value).strip())
    except ValueError:
        raise p._error(value, "a whole number") from None
    if not number.is_integer():
        raise p._error(value, "a whole number")
    return int(number)


def _as_float(p: Parameter, value: Any) -> float:
    if isinstance(value, bool):
        raise p._error(value, "a number")
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise p._error(value, "a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise p._error(value, "a finite number")
    return number


def _as_str(p: Parameter, value: Any) -> str:
    if isinstance(value, (list, dict, tuple)):
        raise p._error(value, "a single value")
    return str(value)


def _as_json(p: Parameter, value: Any) -> dict | list:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError:
            raise p._error(value, "a JSON object or list") from None
    if not isinstance(value, (dict, list)):
        raise p._error(value, "a JSON object or list")
    return value


def _as_existing(kind: str):  # noqa: ANN202 - returns one of the coercers above
    def check(p: Parameter, value: Any) -> str:
        path = Path(_as_str(p, value)).expanduser()
        if not (path.is_dir() if kind == "dir" else path.is_file()):
            raise p._error(value, f"an existing {'folder' if kind == 'dir' else 'file'}")
        return str(path)

    return check


def _as_existing_list(kind: str):  # noqa: ANN202 - returns one of the coercers above
    what = "files" if kind == "files" else "files or folders"

    def check(p: Parameter, value: Any) -> list[str]:
        listed = isinstance(value, (list, tuple))
        items = value.split(",") if isinstance(value, str) else list(value) if listed else None
        if items is None:
            raise p._error(value, f"a list of {what} (or a comma-separated string)")
        names = [str(v).strip() for v in items if str(v).strip() and str(v).strip().lower() not in _NULL]
        for name in names:
            if not (Path(name).is_file() or (kind == "paths" and Path(name).is_dir())):
                raise p._error(value, f"existing {what}; '{name}' is not one")
        return names

    return check


_COERCE = {
    "bool": _as_bool,
    "int": _as_int,
    "float": _as_float,
    "str": _as_str,
    "path": _as_str,
    "dir": _as_existing("dir"),
    "file": _as_existing("file"),
    "files": _as_existing_list("files"),
    "paths": _as_existing_list("paths"),
    "json": _as_json,
}


def _read(path: Path) -> dict[str, Parameter]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedpipeError(f"{path}: cannot read the parameter declarations ({exc})") from None
    declared = {}
    for name, spec in raw.items():
        if not isinstance(spec, Mapping) or spec.get("type") not in TYPES or not spec.get("help"):
            raise MedpipeError(f"{path}: '{name}' needs a 'type' (one of {', '.join(TYPES)}) and a 'help'")
        choices = spec.get("choices")
        declared[name] = Parameter(
            name=name,
            type=spec["type"],
            help=spec["help"],
            choices=tuple(choices) if choices is not None else None,
            min=spec.get("min"),
            max=spec.get("max"),
            nullable=bool(spec.get("nullable", False)),
        )
    return declared


def shared_parameters() -> dict[str, Parameter]:
    """The parameters every bundle must define (a test holds each bundle to it)."""
    return _read(SHARED_FILE)


def declared_parameters(bundle_dir: str | Path) -> dict[str, Parameter]:
    """A bundle's public parameters: the shared declarations, then its own `configs/parameters.json`."""
    declared = shared_parameters()
    own = Path(bundle_dir) / "configs" / "parameters.json"
    if own.is_file():
        declared.update(_read(own))
    return declared


def _is_expression(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(("$", "@", "%"))


def coerce_values(declared: Mapping[str, Parameter], values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed copies of the declared keys among `values` (expressions are left to the config); one line if wrong."""
    typed = {k: declared[k].coerce(v) for k, v in values.items() if k in declared and not _is_expression(v)}
    fold, folds = typed.get("fold", values.get("fold")), typed.get("num_folds", values.get("num_folds"))
    if isinstance(fold, int) and isinstance(folds, int) and fold >= folds:
        raise MedpipeError(f"--fold {fold}: expected -1 (train on everything) or 0..{folds - 1} for {folds} folds")
    return typed


def _running_config() -> tuple[Any, Any, Any]:
    """The ConfigWorkflow, ConfigParser and ReferenceResolver whose `initialize` expression is being evaluated."""
    from monai.bundle import ConfigWorkflow
    from monai.bundle.config_parser import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    found: dict[type, Any] = {ConfigWorkflow: None, ConfigParser: None, ReferenceResolver: None}
    frame = inspect.currentframe()
    while frame is not None and None in found.values():
        owner = frame.f_locals.get("self")
        for kind in found:
            if found[kind] is None and isinstance(owner, kind):
                found[kind] = owner
        frame = frame.f_back
    return found[ConfigWorkflow], found[ConfigParser], found[ReferenceResolver]


def apply_to_running_config() -> dict[str, Any]:
    """Coerce the declared parameters of the config being run, in place, before anything reads them.

    Called from the configs' first `initialize` expression. MONAI gives an expression no handle on its workflow, so
    the workflow, its parser and resolver are found on the call stack; outside a running workflow this does nothing.
    The bundle is the folder above the first config file's `configs/` (where its parameters.json lies).
    """
    workflow, parser, resolver = _running_config()
    if workflow is None or parser is None or resolver is None:
        return {}
    declared = declared_parameters(Path(workflow.config_root_path).parent)
    raw = {k: parser.config[k] for k in declared if k in parser.config}
    typed = coerce_values(declared, raw)
    for key, value in typed.items():
        parser.config[key] = value  # item assignment on the parser would reset the resolver mid-resolution
        if key in resolver.items:
            resolver.items[key].update_config(value)
        resolver.resolved_content.pop(key, None)
    return typed


def describe_parameters(bundle_dir: str | Path, files: list[str]) -> str:
    """The table `medpipe run BUNDLE JOB --help` prints: name, type and allowed values, default, help."""
    from monai.bundle import ConfigParser

    config = ConfigParser.load_config_files(files)
    rows = [("parameter", "type", "default", "help")]
    for name, p in sorted(declared_parameters(bundle_dir).items()):
        if name in config:
            default = config[name]
            shown = json.dumps(default) if not _is_expression(default) else "(computed)"
            rows.append((f"--{name}", p.describe(), shown, p.help))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows)
