"""Values as users type them: python-fire hands `--resume false` over as the string 'false' and `--folds 3` may
arrive as '3'. One reading of each, with a one-line error, for every command and config that takes them."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

TRUE = ("true", "yes", "1", "on")
FALSE = ("false", "no", "0", "off", "", "none")


def flag(value: Any) -> bool:
    """A boolean as given on the command line or in a config; never test such a value's truth raw."""
    if isinstance(value, (bool, int, np.integer)):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise MedpipeError(f"expected true or false, got '{value}'")


def whole_number(name: str, value: Any) -> int:
    """An integer setting ('3' from fire is fine); one line naming the setting otherwise."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise MedpipeError(f"{name} must be an integer, got {value!r}")


def path_list(value: Any, name: str = "--input") -> list[str]:
    """Paths as users give them: one path, a comma-separated string of them (when no such path exists), or a list.

    python-fire turns `--input 123` (a folder named 123) into the number 123 and `--input 12,13` into a tuple of
    numbers: here they are the names they were typed as."""
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        items = text.split(",") if "," in text and not os.path.exists(text) else [text]
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        items = [str(value)]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(v, (str, os.PathLike, int, float, np.integer)) and not isinstance(v, bool) for v in value
    ):
        items = [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in value]
    else:
        raise MedpipeError(f"{name} must be a path or a list of paths, got {value!r}")
    return [item.strip() for item in items if item.strip()]
