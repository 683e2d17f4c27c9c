"""Inferers: bf16/channels_last autocast, mirroring test-time augmentation, checkpoint ensembles."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
