"""Exported networks give eager PyTorch's answers: for every bundle, a seeded random network saved as a checkpoint is
exported to ONNX and TorchScript and run through `medpipe.export.runtime` on real images prepared by the bundle's
own preprocessing; outputs agree within 1e-4 and predicted labels/masks are identical. Tampered, stale and missing
exports are refused in one line; MONAI's `ckpt_export` works on every bundle as a zoo user would call it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLES, real_dataset
from medpipe.cli import main
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.export.exporters import bundle_network, export_network
from medpipe.export.int8 import calibration_batches
from medpipe.export.runtime import runtime_network, torch_fallback
from medpipe.inferers.autocast import AutocastInferer

TOL = 1e-4


def _dataset(bundle: Path) -> Path:
    return real_dataset(json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]["dataset"])


def _labels(outputs: torch.Tensor) -> torch.Tensor:
    return (outputs[:, 0] > 0).long() if outputs.shape[1] == 1 else outputs.argmax(1)


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda b: b.name)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A bundle's network with seeded random weights, its checkpoint, ONNX and TorchScript exports, and 4 real images
    through the bundle's evaluation preprocessing."""
    bundle = request.param
    overrides = {"dataset_dir": str(_dataset(bundle))}
    torch.manual_seed(0)
    bundle_net = bundle_network(bundle, None, overrides)
    ckpt = tmp_path_factory.mktemp(bundle.name) / "model.pt"
    torch.save(bundle_net.net.state_dict(), ckpt)
    for fmt in ("onnx", "torchscript"):
        export_network(bundle_net, ckpt, fmt)
    images = torch.from_numpy(np.concatenate(calibration_batches(bundle_net, 4)))
    return {"bundle": bundle, "net": bundle_net.net.eval(), "ckpt": ckpt, "images": images, "overrides": overrides}


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript"])
def test_runtime_matches_eager_torch_on_real_images(exported: dict, runtime: str) -> None:
    from monai.data import MetaTensor

    net, images = exported["net"], MetaTensor(exported["images"])  # evaluators hand the network MetaTensors
    inferer = AutocastInferer(channels_last=True)  # the bundles' inferer: channels_last input
    with torch.no_grad():
        expected = inferer(images, net)
        got = inferer(images, runtime_network(net, runtime, exported["ckpt"]))
    assert type(got) in (torch.Tensor, MetaTensor) and got.shape == expected.shape
    assert float((got - expected).abs().max()) <= TOL
    assert torch.equal(_labels(got), _labels(expected))


def test_torch_runtime_is_the_network_itself(exported: dict) -> None:
    assert runtime_network(exported["net"], "torch", exported["ckpt"]) is exported["net"]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_tampered_stale_and_missing_exports_are_refused(exported: dict, tmp_path: Path) -> None:
    net, ckpt = exported["net"], exported["ckpt"]
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("model.pt", "model.onnx", "model.onnx.json", "model.ts", "model.ts.json"):
        (folder / name).write_bytes((ckpt.parent / name).read_bytes())
    with pytest.raises(MedpipeError) as missing:
        runtime_network(net, "onnxruntime_int8", folder / "model.pt")
    assert "no export" in _one_line(missing) and "medpipe export" in str(missing.value) and "--quantize int8" in str(
        missing.value
    )
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(MedpipeError) as tampered:
        runtime_network(net, "onnxruntime", folder / "model.pt")
    assert "does not match the sha256" in _one_line(tampered)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}, folder / "model.pt")
    with pytest.raises(MedpipeError) as stale:
        runtime_network(net, "torchscript", folder / "model.pt")
    assert "stale" in _one_line(stale)
    with pytest.raises(MedpipeError) as unknown:
        runtime_network(net, "tensorrt", folder / "model.pt")
    assert "runtime must be one of" in _one_line(unknown)


def test_gradcam_falls_back_to_torch_once(exported: dict, caplog: pytest.LogCaptureFixture) -> None:
    net = exported["net"]
    with caplog.at_level(logging.WARNING, logger="medpipe.export.runtime"):
        assert torch_fallback(net, "torch", "Grad-CAM test") is net
        assert torch_fallback(net, "onnxruntime", f"Grad-CAM {exported['bundle'].name}") is net
        assert torch_fallback(net, "onnxruntime", f"Grad-CAM {exported['bundle'].name}") is net
    warnings = [r.message for r in caplog.records if "needs gradients" in r.message]
    assert len(warnings) == 1 and "eager PyTorch" in warnings[0]


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_monai_ckpt_export_scripts_every_bundle(bundle: Path, tmp_path: Path) -> None:
    """MONAI's `ckpt_export network_def --filepath … --ckpt_file … --config_file <bundle>/configs/train.json` with its
    default (torch.jit.script), no trace options: the function `python -m monai.bundle ckpt_export` calls, in-process
    (a subprocess per bundle costs ~15 s of imports on this CPU)."""
    from monai.bundle import ckpt_export

    torch.manual_seed(0)
    bundle_net = bundle_network(bundle)
    torch.save(bundle_net.net.state_dict(), tmp_path / "model.pt")
    ckpt_export(net_id="network_def", filepath=str(tmp_path / "m.ts"), ckpt_file=str(tmp_path / "model.pt"),
                config_file=str(bundle / "configs" / "train.json"))  # fmt: skip
    scripted = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        assert torch.allclose(scripted(bundle_net.example), bundle_net.net(bundle_net.example), atol=TOL)


def test_paper_cnn_scripts_and_still_checks_its_input_size() -> None:
    from medpipe.nets.paper_cnn import PaperCNN

    scripted = torch.jit.script(PaperCNN(image_size=64).eval())
    assert scripted(torch.rand(3, 1, 64, 64)).shape == (3, 1)
    with pytest.raises(Exception, match="expects 64x64 input, got 32x32"):
        scripted(torch.rand(1, 1, 32, 32))


def test_export_verb_writes_file_and_sidecar_int8_included(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle = next(b for b in BUNDLES if b.name == "brain_tumor_cls")
    dataset = _dataset(bundle)
    torch.manual_seed(0)
    net = bundle_network(bundle).net
    torch.save(net.state_dict(), tmp_path / "model.pt")
    common = ["--ckpt", str(tmp_path / "model.pt"), "--dataset_dir", str(dataset)]
    int8 = ["--format", "onnx", "--quantize", "int8", "--calibration_images", "8"]
    assert main(["export", str(bundle), *int8, *common]) == 0
    record = json.loads((tmp_path / "model.int8.onnx.json").read_text())
    assert record["quantize"] == "int8" and record["int8"]["calibration_images"] == 8
    assert len(record["sha256"]) == 64 and record["versions"]["onnxruntime"]
    images = torch.rand(5, 1, 128, 128)
    with torch.no_grad():
        diff = (runtime_network(net, "onnxruntime_int8", tmp_path / "model.pt")(images) - net.eval()(images)).abs()
    assert float(diff.max()) < 0.1  # int8 is close, not equal: its accuracy is measured, not assumed
    capsys.readouterr()
    assert main(["export", str(bundle), "--format", "tflite", *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medpipe error: export format must be one of") and "\n" not in err
    assert main(["export", str(bundle), "--format", "torchscript", "--quantize", "int8", *common]) == 2
    assert "needs --format onnx" in capsys.readouterr().err


def test_volume_segmenter_honours_runtime(tmp_path: Path) -> None:
    """Volumetric CT inference gives the same mask with the ONNX Runtime network as with eager PyTorch."""
    from medpipe.inference.ct_volume import VolumeSegmenter
    from medpipe.io.dicom import Volume

    bundle = next(b for b in BUNDLES if b.name == "covid_ct_seg")
    torch.manual_seed(0)
    bundle_net = bundle_network(bundle, None, {"image_size": 64})
    torch.save(bundle_net.net.state_dict(), tmp_path / "model.pt")
    export_network(bundle_net, tmp_path / "model.pt", "onnx")
    rng = np.random.default_rng(0)
    hu = np.full((96, 96, 6), -1000.0, dtype=np.float32)
    hu[20:76, 20:76] = rng.normal(-700, 150, size=(56, 56, 6))  # a chest-like blob of lung density in air
    volume = Volume(hu, np.diag([0.8, 0.8, 2.5, 1.0]))
    onnx_net = runtime_network(bundle_net.net, "onnxruntime", tmp_path / "model.pt")
    context = int(bundle_net.example.shape[1])  # the default network reads 3 neighbouring slices
    masks = [VolumeSegmenter(net, 64, keep_components=0, context_slices=context).segment(volume)
             for net in (bundle_net.net, onnx_net)]  # fmt: skip
    assert masks[0].shape == hu.shape and np.array_equal(masks[0], masks[1])


def test_evaluate_with_runtime_wiring_gives_the_same_predictions(tmp_path: Path) -> None:
    """The config line the bundles wire (`validate#evaluator#network`) runs the export and changes nothing else."""
    from medpipe.bundle.config import run_bundle

    bundle = next(b for b in BUNDLES if b.name == "brain_tumor_cls")
    torch.manual_seed(0)
    bundle_net = bundle_network(bundle)
    torch.save(bundle_net.net.state_dict(), tmp_path / "model.pt")
    export_network(bundle_net, tmp_path / "model.pt", "onnx")
    smoke = json.loads((bundle / "configs" / "metadata.json").read_text())["medpipe"]["smoke_overrides"]
    common = {"dataset_dir": str(_dataset(bundle)), "ckpt_dir": str(tmp_path), **smoke}
    wiring = {"validate#evaluator#network": "$medpipe.export.runtime.runtime_network(@network, 'onnxruntime', "
                                            "@ckpt_path)"}  # fmt: skip
    run_bundle(bundle, "evaluate", output_dir=str(tmp_path / "torch"), **common)
    run_bundle(bundle, "evaluate", output_dir=str(tmp_path / "onnx"), **wiring, **common)
    torch_csv = (tmp_path / "torch" / "predictions.csv").read_text()
    assert torch_csv.count("\n") > 2 and torch_csv == (tmp_path / "onnx" / "predictions.csv").read_text()
    (tmp_path / "model.onnx").write_bytes((tmp_path / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(Exception) as tampered:  # the evaluator really runs the export: a tampered one stops it
        run_bundle(bundle, "evaluate", output_dir=str(tmp_path / "bad"), **wiring, **common)
    assert "does not match the sha256" in str(find_medpipe_error(tampered.value))


class _Noisy(torch.nn.Module):
    """A network no export can reproduce: it adds fresh noise on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + torch.rand_like(self.conv(x))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_export_that_differs_from_eager_is_not_saved(fmt: str, tmp_path: Path) -> None:
    from medpipe.export.exporters import to_onnx, to_torchscript

    export = to_onnx if fmt == "onnx" else to_torchscript
    with pytest.raises(MedpipeError) as refused:
        export(_Noisy().eval(), torch.rand(2, 1, 16, 16), tmp_path / "model.out", segmentation=True)
    assert "differs from eager PyTorch" in _one_line(refused) or "does not reproduce" in str(refused.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
