"""Lazy submodule access, so bundle configs can write `$medpipe.io.images.…` after a bare `$import medpipe`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module `__getattr__` that imports `package.name` on first use and reports a missing one normally."""

    def __getattr__(name: str) -> ModuleType:
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module '{package}' has no attribute '{name}'") from None

    return __getattr__
