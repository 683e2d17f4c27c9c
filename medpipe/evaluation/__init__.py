"""Evaluation: metrics with confidence intervals, reports (predictions.csv, metrics.json), cross-validation."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
