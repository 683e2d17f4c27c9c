"""Bundle models as the node runs them: built from the bundle's own configs (network, preprocessing, inferer,
post-processing), loaded once per route and reused for every series it receives.

CT series go through `covid_ct_seg`'s `infer#segmenter` (medpipe.inference.ct_volume.VolumeSegmenter): masks, the
DICOM-SEG and report.json. 2-D images (CR/DX chest, MR brain slices) go through the bundle's `validate#preprocessing`
(LoadGrey2Dd reads DICOM: VOI LUT / window, MONOCHROME1 inverted), its validation inferer and activation."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medpipe.errors import MedpipeError
from medpipe.export.runtime import runtime_network
from medpipe.serve.routing import Route

# a series spanning less than this head to foot may cut the lungs: only the upper lung-volume bound applies to it
# (adult lungs are about 25 cm high at full inspiration)
LUNG_COVERAGE_MM = 200.0

# each lung holds 40-60 % of an adult's lung volume (the right slightly more): a side under 15 % of the total means a
# lung is missing from the mask (or from the patient); below 100 mL of lung in all the check says nothing
ONE_SIDE_FRACTION = 0.15
MIN_LUNG_FOR_SIDES_ML = 100.0

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the SR says about the model that made a result."""

    name: str
    version: str
    network: str


def _parser(route: Route, config: str) -> Any:
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import config_files

    files = config_files(route.bundle, config, route.network)
    parser = ConfigParser()
    parser.read_config(files)
    parser["bundle_root"] = str(route.bundle)
    parser["ckpt_path"] = str(route.checkpoints[0])
    for key, value in route.options.items():
        if key.split("#", 1)[0] not in parser.config:
            raise MedpipeError(f"routing: route '{route.name}' option '{key}' is not a key of {files}")
        parser[key] = value
    return parser


def _model_info(route: Route, parser: Any) -> ModelInfo:
    meta_path = route.bundle / "configs" / "metadata.json"
    version = json.loads(meta_path.read_text()).get("version", "0") if meta_path.is_file() else "0"
    network = str(parser.get_parsed_content("network_name")) if "network_name" in parser.config else "network"
    return ModelInfo(name=route.bundle.name, version=str(version), network=network)


def _load_weights(network: torch.nn.Module, path: Path) -> None:
    """Load a state dict saved from this network (wrapper prefixes such as "module." tolerated); every key must fit."""
    from medpipe.nets.pretrained import fitting_state_dict

    hint = "set the route's checkpoints to a model.pt trained with the route's network"
    network.load_state_dict(fitting_state_dict(network, path, "checkpoint", hint), strict=True)


class CTSegmentationModel:
    """covid_ct_seg's volumetric inference on one received CT series folder."""

    def __init__(self, route: Route) -> None:
        parser = _parser(route, "inference")
        if len(route.checkpoints) > 1:  # e.g. the five CV fold models: their probabilities are averaged
            if "ensemble_ckpts" not in parser.config:
                raise MedpipeError(f"routing: bundle {route.bundle.name} has no ensemble_ckpts: give one checkpoint")
            parser["ensemble_ckpts"] = [str(p) for p in route.checkpoints[1:]]
        self.route = route  # the route this model was built for: a model is never used for another
        network = parser.get_parsed_content("network")  # the eager network, which the segmenter (or its runtime) runs
        _load_weights(network, route.checkpoints[0])
        network.eval()
        # built after the weights are in: with a route option `runtime: onnxruntime` the export is checked against them
        self.segmenter = parser.get_parsed_content("infer#segmenter")
        self.info = _model_info(route, parser)

    def run(self, series_dir: Path, out_dir: Path) -> dict[str, Any]:
        """Segment the series; returns the VolumeSegmenter report (also written as out_dir/report.json)."""
        return self.segmenter(series_dir, out_dir)

    def implausible(self, entry: dict[str, Any]) -> list[str]:
        """Why the lung volume of one report entry is one no adult chest has (route.lung_volume_ml), if it is."""
        if self.route.lung_volume_ml is None:
            return []
        low, high = self.route.lung_volume_ml
        lung = float(entry["lung_volume_ml"])
        extent = float(entry["shape"][2]) * float(entry["spacing_mm"][2])  # head to foot: axial, voxel axis 2
        if lung > high:
            return [f"lung volume {lung:g} mL is above {high:g} mL, more than an adult chest holds: check the result"]
        right, left = entry.get("lung_right_ml"), entry.get("lung_left_ml")
        if right is not None and left is not None and lung >= MIN_LUNG_FOR_SIDES_ML and (
            min(right, left) < ONE_SIDE_FRACTION * lung
        ):
            return [
                f"lung found on one side only (right {right:g} mL, left {left:g} mL): part of the lung may be missing "
                "from the segmentation (or the patient has one lung): check the result"
            ]
        if lung < low and extent >= LUNG_COVERAGE_MM:
            return [
                f"lung volume {lung:g} mL is below {low:g} mL, less than an adult chest CT covering the lungs holds "
                f"(this series spans {extent:.0f} mm): part of the lung may be missing from the segmentation"
            ]
        return []


class ImageClassificationModel:
    """A 2-D classification bundle (covid_cxr_cls, brain_tumor_cls) on single DICOM images."""

    def __init__(self, route: Route) -> None:
        from medpipe.values import flag

        self.route = route  # the route this model was built for: a model is never used for another
        parser = _parser(route, "train")
        if len(route.checkpoints) > 1:
            if "ensemble_ckpts" not in parser.config:
                raise MedpipeError(f"routing: bundle {route.bundle.name} has no ensemble_ckpts: give one checkpoint")
            parser["ensemble_ckpts"] = [str(p) for p in route.checkpoints[1:]]
        self.torch_network = parser.get_parsed_content("network")
        _load_weights(self.torch_network, route.checkpoints[0])
        self.torch_network.eval()
        self.device = next(self.torch_network.parameters()).device
        # the `runtime` key (torch, onnxruntime, …; a route option) picks what runs the network; Grad-CAM needs torch
        runtime = parser.get_parsed_content("runtime") if "runtime" in parser.config else "torch"
        self.network = runtime_network(self.torch_network, runtime, str(route.checkpoints[0]))
        self.preprocessing = parser.get_parsed_content("validate#preprocessing")
        inferer_id = "validate#inferer" if "inferer" in parser.config.get("validate", {}) else "inferer"
        self.inferer = parser.get_parsed_content(inferer_id)
        self.postprocessing = parser.get_parsed_content("validate#postprocessing")
        self.class_names = [str(c) for c in parser.get_parsed_content("class_names")]
        self.info = _model_info(route, parser)
        # the wrong-input guard the bundle's own inference runs (keys input_guard, expected_modality)
        self.expected_modality: str | None = None
        self.guard: Any = None
        if "input_guard" in parser.config and flag(parser.get_parsed_content("input_guard")):
            from medpipe.inference.input_guard import ModalityModel

            self.expected_modality = str(parser.get_parsed_content("expected_modality"))
            self.guard = ModalityModel.load()
        self.gradcam_layer: str | None = None
        if route.gradcam:
            if "gradcam_layer" not in parser.config:
                raise MedpipeError(
                    f"routing: route '{route.name}' sets gradcam but {route.bundle.name} has no gradcam_layer"
                )
            self.gradcam_layer = str(parser.get_parsed_content("gradcam_layer"))

    @torch.no_grad()
    def run(self, image_path: Path) -> dict[str, float]:
        """Class probabilities for one image file, keyed by class name."""
        item = self.preprocessing({"image": str(image_path)})
        batch = item["image"][None].to(self.device)
        logits = self.inferer(batch, self.network) if self.inferer is not None else self.network(batch)
        pred = self.postprocessing({"pred": logits[0]})["pred"]
        probs = np.asarray(pred.detach().cpu().float().numpy(), dtype=np.float64).reshape(-1)
        if probs.size == 1 and len(self.class_names) == 2:  # one sigmoid output: P(positive class)
            probs = np.array([1.0 - probs[0], probs[0]])
        if probs.size != len(self.class_names):
            raise MedpipeError(f"{self.info.name}: {probs.size} outputs for {len(self.class_names)} class names")
        return {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}

    def wrong_input(self, image_path: Path) -> list[str]:
        """The input guard's warning when the image does not look like the bundle's kind of image, else []."""
        if self.expected_modality is None:
            return []
        from medpipe.inference.input_guard import OK, file_features, verdict

        probs = self.guard.probabilities(file_features(image_path))[0]
        said = verdict(dict(zip(self.guard.classes, probs, strict=True)), self.expected_modality)
        return [] if said == OK else [f"{image_path.name}: {said}"]

    def gradcam_overlay(self, image_path: Path) -> np.ndarray:
        """(rows, cols, 3) uint8: the image as the model reads it (grey, [0, 1]) at its own size, with the Grad-CAM
        map of the predicted class resized to it and blended on top (medpipe.inference.gradcam, 'jet')."""
        import torch.nn.functional as F  # noqa: N812
        from PIL import Image

        from medpipe.inference.gradcam import grad_cam, overlay_png
        from medpipe.io.images import load_grey_2d

        assert self.gradcam_layer is not None
        batch = self.preprocessing({"image": str(image_path)})["image"][None].to(self.device)
        maps, _ = grad_cam(self.torch_network, batch, self.gradcam_layer)
        grey = load_grey_2d(image_path)
        heat = F.interpolate(torch.from_numpy(maps[:1, None]), size=grey.shape, mode="bilinear", align_corners=False)
        with tempfile.TemporaryDirectory(prefix="medpipe-gradcam-") as tmp:
            png = overlay_png(grey, heat[0, 0].numpy(), Path(tmp) / "overlay.png")
            return np.asarray(Image.open(png).convert("RGB"))


def load_model(route: Route) -> CTSegmentationModel | ImageClassificationModel:
    logger.info(f"loading route {route.name}: {route.bundle.name} from {route.checkpoints[0]}")
    return CTSegmentationModel(route) if route.task == "ct_segmentation" else ImageClassificationModel(route)


def judge(route: Route, wrong_input: list[str], implausible: list[str]) -> list[str]:
    """What the route does with doubtful results: raises MedpipeError (the job fails with the reason, nothing is
    sent) where it refuses them, else returns the warnings to send with the results (in the SR and in status)."""
    refused = (wrong_input if route.on_wrong_input == "refuse" else []) + (
        implausible if route.on_implausible == "refuse" else []
    )
    if refused:
        raise MedpipeError(f"refused by route '{route.name}': {'; '.join(refused)}; no result sent")
    return [*wrong_input, *implausible]
