"""`medpipe export`: a bundle's trained network to ONNX (fp32 or int8) or TorchScript beside its checkpoint.

The network is the bundle's own `network_def` (train.json + the network overlay + overrides), loaded strictly with
`weights_only=True`; MONAI's `convert_to_onnx` / `convert_to_torchscript` export it and verify it against eager
PyTorch on an example batch; we check once more at another batch size (and, for segmentation, another image size) so
the dynamic axes are proven, then write the file atomically with its sidecar (medpipe.export.sidecar)."""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpipe.errors import MedpipeError, first_line
from medpipe.export.sidecar import export_path, write_sidecar
from medpipe.files import atomic_write

logger = logging.getLogger(__name__)

INPUT, OUTPUT = "image", "pred"
RTOL, ATOL = 1e-4, 1e-4  # fp32 parity asked of every export (the 1e-4)


@dataclass
class BundleNetwork:
    """A bundle's bare network with what exporting it needs to know."""

    net: torch.nn.Module
    example: torch.Tensor  # (2, C, H, W) random input of the trained size
    segmentation: bool  # outputs are images: spatial axes are dynamic too
    parser: Any  # the bundle's parsed config (datalists, preprocessing for int8 calibration)
    bundle_dir: Path
    network: str | None
    overrides: dict[str, Any] = field(default_factory=dict)


def bundle_network(
    bundle_dir: Path, network: str | None = None, overrides: dict[str, Any] | None = None
) -> BundleNetwork:
    """The bundle's `network_def` (untrained) and an example input with the channels and size it was trained with."""
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import check_override_keys, config_files

    overrides = dict(overrides or {})
    files = config_files(bundle_dir, "train", network)
    check_override_keys(files, list(overrides))
    parser = ConfigParser(ConfigParser.load_config_files(files))
    parser.update({"bundle_root": str(Path(bundle_dir).resolve()), **overrides})
    net = parser.get_parsed_content("network_def")
    data_format = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text())["network_data_format"]
    image = data_format["inputs"]["image"]
    shape = [int(s) for s in image["spatial_shape"]]
    if "image_size" in parser:
        shape = [int(parser.get_parsed_content("image_size"))] * len(shape)
    # a 2.5-D network reads `context_slices` channels whatever the metadata's default network does
    channels = int(parser.get_parsed_content("context_slices")) if "context_slices" in parser else image["num_channels"]
    example = torch.rand(2, int(channels), *shape, generator=torch.Generator().manual_seed(0))
    segmentation = data_format["outputs"]["pred"]["type"] == "image"
    return BundleNetwork(net.cpu().eval(), example, segmentation, parser, Path(bundle_dir), network, overrides)


def load_weights(net: torch.nn.Module, ckpt: Path) -> None:
    """Load a plain state dict (weights_only) strictly; a mismatch is one line naming the likely cause."""
    if not ckpt.is_file():
        raise MedpipeError(f"no checkpoint '{ckpt}': train the bundle first or pass --ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = first_line(exc)
        raise MedpipeError(
            f"'{ckpt}' does not fit the network (pass the --network and overrides it was trained with): {first}"
        ) from None


def _other_shape(example: torch.Tensor, segmentation: bool) -> torch.Tensor:
    """An input of another batch size (and image size for segmentation): proves the dynamic axes."""
    size = list(example.shape[2:])
    if segmentation:
        size = [s + 32 for s in size]  # stays a multiple of the UNet's total stride
    return torch.rand(example.shape[0] + 1, example.shape[1], *size, generator=torch.Generator().manual_seed(1))


def _max_diff(got: Any, expected: torch.Tensor) -> float:
    return float((torch.as_tensor(np.asarray(got)).float() - expected.float()).abs().max())


def _check(diff: float, what: str) -> None:
    if not diff <= ATOL + RTOL:  # also refuses NaN
        raise MedpipeError(f"the {what} export differs from eager PyTorch by {diff:.2e} (> {ATOL + RTOL:g}); not saved")


def to_torchscript(net: torch.nn.Module, example: torch.Tensor, path: str | Path, segmentation: bool = False) -> dict:
    """Script the network (trace it where scripting fails), verify it, save it atomically; return what was checked."""
    from monai.networks.utils import convert_to_torchscript

    net = copy.deepcopy(net).cpu().eval()
    method = "script"
    try:
        module = convert_to_torchscript(net, verify=True, inputs=[example], device=torch.device("cpu"), rtol=RTOL,
                                        atol=ATOL)  # fmt: skip
    except AssertionError as exc:
        first = first_line(exc)
        raise MedpipeError(f"the TorchScript export does not reproduce the network: {first}") from None
    except Exception as exc:  # TorchScript cannot compile this Python: tracing records this input's path
        logger.info(f"torch.jit.script failed ({type(exc).__name__}); tracing instead")
        method = "trace"
        with warnings.catch_warnings():  # input-size checks become constants: right for the trained size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            module = convert_to_torchscript(net, verify=True, inputs=[example], device=torch.device("cpu"),
                                            rtol=RTOL, atol=ATOL, use_trace=True)  # fmt: skip
    other = _other_shape(example, segmentation)
    with torch.no_grad():
        diff = _max_diff(module(other), net(other))
    _check(diff, "TorchScript")
    atomic_write(path, lambda tmp: torch.jit.save(module, str(tmp)))
    return {"method": method, "checked_shapes": [list(example.shape), list(other.shape)], "max_abs_diff": diff}


def export_torchscript(network: torch.nn.Module, example: torch.Tensor, path: str | Path) -> Path:
    """`to_torchscript` for a classifier-shaped example that may be a MONAI MetaTensor; return the file."""
    example = example.as_tensor() if hasattr(example, "as_tensor") else example
    to_torchscript(network, example.detach().cpu().float(), path)
    return Path(path)


def to_onnx(net: torch.nn.Module, example: torch.Tensor, path: str | Path, segmentation: bool = False) -> dict:
    """Export to ONNX with a dynamic batch axis (and spatial axes for segmentation), verify it in ONNX Runtime at
    two shapes, save it atomically; return what was checked."""
    import onnx
    import onnxruntime
    from monai.networks.utils import convert_to_onnx

    net = copy.deepcopy(net).cpu().eval()
    axes = {0: "batch", 2: "height", 3: "width"} if segmentation else {0: "batch"}
    with warnings.catch_warnings():  # the TorchScript-based exporter: 10x faster than dynamo here, same graph
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, torch.jit.TracerWarning))
        try:
            model = convert_to_onnx(
                net, [example], input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: axes, OUTPUT: axes if segmentation else {0: "batch"}}, verify=True, use_ort=True,
                device=torch.device("cpu"), rtol=RTOL, atol=ATOL, dynamo=False,
            )  # fmt: skip
        except AssertionError as exc:
            raise MedpipeError(f"the ONNX export does not reproduce the network: {first_line(exc)}") from None
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    other = _other_shape(example, segmentation)
    with torch.no_grad():
        diff = _max_diff(session.run(None, {INPUT: other.numpy()})[0], net(other))
    _check(diff, "ONNX")
    atomic_write(path, lambda tmp: onnx.save(model, str(tmp)))
    opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": opset, "dynamic_axes": {INPUT: axes}, "checked_shapes": [list(example.shape), list(other.shape)],
            "max_abs_diff": diff}  # fmt: skip


def export_network(bundle: BundleNetwork, ckpt: Path, fmt: str, quantize: str | None = None,
                   calibration_images: int = 32) -> Path:  # fmt: skip
    """Export `bundle.net` holding checkpoint `ckpt` to `fmt` beside it, with its sidecar; return the file."""
    out = export_path(ckpt, fmt, quantize)
    load_weights(bundle.net, ckpt)
    info: dict[str, Any] = {
        "format": fmt, "quantize": quantize, "bundle": bundle.bundle_dir.resolve().name, "network": bundle.network,
        "overrides": bundle.overrides, "input": INPUT, "output": OUTPUT, "segmentation": bundle.segmentation,
    }  # fmt: skip
    if fmt == "torchscript":
        info["verified"] = to_torchscript(bundle.net, bundle.example, out, bundle.segmentation)
    elif quantize is None:
        info["verified"] = to_onnx(bundle.net, bundle.example, out, bundle.segmentation)
    else:
        from medpipe.export.int8 import calibration_batches, quantize_int8

        with tempfile.TemporaryDirectory(prefix="medpipe-export-") as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            info["verified_fp32"] = to_onnx(bundle.net, bundle.example, fp32, bundle.segmentation)
            batches = calibration_batches(bundle, calibration_images)
            info["int8"] = quantize_int8(fp32, out, batches, bundle.segmentation)
    write_sidecar(out, ckpt, info)
    return out


def export_bundle(
    bundle: str, fmt: str = "onnx", quantize: str | None = None, ckpt: str | None = None, network: str | None = None,
    calibration_images: int = 32, **overrides: Any,
) -> Path:  # fmt: skip
    """Export a bundle's trained network (see `medpipe export --help`); print and return the file written."""
    from medpipe.bundle.config import find_bundle

    export_path("model.pt", fmt, quantize)  # refuse a bad format before building anything
    bundle_net = bundle_network(find_bundle(bundle), network, overrides)
    ckpt_path = Path(ckpt) if ckpt else Path(bundle_net.parser.get_parsed_content("ckpt_path"))
    out = export_network(bundle_net, ckpt_path, fmt, quantize, calibration_images)
    print(f"exported {out} (sidecar {out.name}.json)")
    return out
