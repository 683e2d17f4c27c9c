"""Training-side pieces: checkpoints and resume, DDP helpers."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
