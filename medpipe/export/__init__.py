"""Exported networks for fast CPU inference: ONNX (fp32, int8) and TorchScript files beside a checkpoint, each with a
sidecar `<file>.json` (sha256, source checkpoint, exporting versions) that runtimes and the zoo verify."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
