"""medpipe: shared code for medpipe's MONAI bundles (data, networks, metrics, DICOM, tracking, zoo)."""

import importlib
from types import ModuleType

__version__ = "0.1.0"


def __getattr__(name: str) -> ModuleType:
    """Import submodules on first use, so bundle configs can write `$medpipe.data.…` after `$import medpipe`."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'medpipe' has no attribute '{name}'") from None
