"""Networks MONAI lacks and pretrained-weight loading."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
