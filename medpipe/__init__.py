"""medpipe: what medpipe's MONAI bundles share. See docs/architecture.md for the parts and what flows between them."""

from medpipe._lazy import lazy_submodules

__version__ = "0.1.0"

__getattr__ = lazy_submodules(__name__)
