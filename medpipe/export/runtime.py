"""The `runtime` config key: run the network as eager PyTorch (default), an ONNX Runtime session (fp32 or int8) or a
loaded TorchScript module, on the same tensors. Pre- and post-processing, inferers (autocast, mirroring) and reports
stay as they are; only the network call changes.

The exported file sits beside the checkpoint (`medpipe export`); it is used only if it matches the sha256 in its
sidecar and was made from that checkpoint. Tools that need gradients (Grad-CAM) keep the eager network."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.export.sidecar import export_path, verify_export

logger = logging.getLogger(__name__)

# runtime -> (export format, quantization); "torch" runs the network itself
RUNTIMES: dict[str, tuple[str, str | None] | None] = {
    "torch": None,
    "onnxruntime": ("onnx", None),
    "onnxruntime_int8": ("onnx", "int8"),
    "torchscript": ("torchscript", None),
}
_warned: set[tuple[str, str]] = set()


def _plain(x: torch.Tensor) -> torch.Tensor:
    return x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> torch.Tensor


def _check_shape(path: Path, expected: Sequence[int | None] | None, x: torch.Tensor) -> None:
    """One line when `x` (N, C, H, W …) has another channel count or image size than the export was made for: a
    classifier exported at 64 px has a fixed input size (only segmentation exports take any size)."""
    got = list(x.shape[1:])
    if expected is None or len(expected) != len(got):
        return
    if all(e is None or e == g for e, g in zip(expected, got, strict=True)):
        return

    def size(dims: Sequence[int | None]) -> str:
        return "x".join("any" if d is None else str(d) for d in dims)

    raise MedpipeError(
        f"export '{path}' takes {expected[0]}-channel {size(expected[1:])} inputs, this run gives {got[0]}-channel "
        f"{size(got[1:])} ones: run with the --image_size (and channels) it was exported with, or export again "
        f"with this run's settings (medpipe export … --image_size {got[-1]})"
    )


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX Runtime CPU session that takes and returns torch tensors like the network it was exported from."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())  # as many threads as torch uses
        self.path, self.threads = Path(path), options.intra_op_num_threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        # fixed (int) and dynamic (named) axes after the batch axis, as the graph declares them
        self.expected = [d if isinstance(d, int) else None for d in self.session.get_inputs()[0].shape[1:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(self.path, self.expected, x)
        array = _plain(x).detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(x.device)

    def extra_repr(self) -> str:
        return f"path={self.path.name}, threads={self.threads}"


class TorchScriptNetwork(nn.Module):
    """A loaded TorchScript module that accepts MONAI MetaTensors (scripted code takes plain tensors only)."""

    def __init__(self, path: str | Path, expected: Sequence[int | None] | None = None) -> None:
        super().__init__()
        self.path, self.expected = Path(path), list(expected) if expected is not None else None
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_shape(self.path, self.expected, x)
        return self.module(_plain(x))


def _exported_input(record: dict[str, Any]) -> list[int | None] | None:
    """(C, H, W …) a TorchScript export takes, from its sidecar: the channels it was verified with; the image size
    too when it was traced for a classifier (tracing bakes the verified size in; a scripted module takes any)."""
    verified = record.get("verified") or {}
    shapes = verified.get("checked_shapes")
    if not shapes:
        return None
    channels, spatial = int(shapes[0][1]), [int(s) for s in shapes[0][2:]]
    fixed = verified.get("method") == "trace" and not record.get("segmentation")
    return [channels, *(spatial if fixed else [None] * len(spatial))]


def _bundle_hint(ckpt: Path) -> str:
    """The bundle folder a checkpoint at `<bundle>/models/model.pt` belongs to, else a placeholder."""
    bundle = ckpt.resolve().parent.parent
    return str(bundle) if (bundle / "configs" / "train.json").is_file() else "BUNDLE"


def export_command(runtime: str, ckpt_path: str | Path) -> str:
    """The `medpipe export` command line that makes the file `runtime` needs for `ckpt_path`."""
    fmt, quantize = RUNTIMES[runtime] or ("onnx", None)
    extra = " --quantize int8" if quantize else ""
    return f"medpipe export {_bundle_hint(Path(ckpt_path))} --format {fmt}{extra} --ckpt {ckpt_path} [--network NAME]"


def check_runtime(runtime: str) -> str:
    runtime = str(runtime).strip().lower()
    if runtime not in RUNTIMES:
        raise MedpipeError(f"runtime must be one of {list(RUNTIMES)}, got '{runtime}'")
    return runtime


def runtime_network(network: nn.Module, runtime: str = "torch", ckpt_path: str | Path | None = None) -> nn.Module:
    """`network` itself for runtime "torch"; otherwise the verified export of `ckpt_path` run by `runtime`."""
    runtime = check_runtime(runtime)
    spec = RUNTIMES[runtime]
    if spec is None:
        return network
    if ckpt_path is None:
        raise MedpipeError(f"runtime '{runtime}' needs the checkpoint path whose export it runs (ckpt_path)")
    path = export_path(ckpt_path, *spec)
    record = verify_export(path, ckpt_path, export_command(runtime, ckpt_path))
    if spec[0] == "onnx":
        exported: nn.Module = OnnxRuntimeNetwork(path)
    else:
        exported = TorchScriptNetwork(path, _exported_input(record))
    device = next(iter(network.parameters()), torch.empty(0)).device
    logger.info(f"runtime {runtime}: {path} (sha256 verified; exported with torch {record['versions'].get('torch')})")
    return exported.to(device) if spec[0] == "torchscript" else exported


def torch_fallback(
    network: nn.Module, runtime: str = "torch", what: str = "Grad-CAM", enabled: Any = True
) -> nn.Module:
    """The eager network for a tool that needs gradients, saying once that it does not use `runtime`."""
    from medpipe.values import flag

    runtime = check_runtime(runtime)
    if runtime != "torch" and flag(enabled) and (what, runtime) not in _warned:
        _warned.add((what, runtime))
        logger.warning(f"{what} needs gradients, which runtime '{runtime}' does not give: {what} runs on the eager "
                       "PyTorch network with the same checkpoint")  # fmt: skip
    return network
