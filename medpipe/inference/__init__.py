"""Inference on new cases beyond a bundle's evaluator: volumetric CT segmentation, Grad-CAM overlays."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
