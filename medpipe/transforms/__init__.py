"""Transforms MONAI lacks: batch augmentation, foreground cropping, segmentation slice loading."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
