"""Values as users type them: python-fire hands `--resume false` over as the string 'false' and `--folds 3` may
arrive as '3'. One reading of each, with a one-line error, for every command and config that takes them."""

from __future__ import annotations

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
