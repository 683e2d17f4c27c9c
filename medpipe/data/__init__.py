"""Data sets as datalists: discovery, leakage-safe splits, duplicate detection, the synthetic demo set."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
