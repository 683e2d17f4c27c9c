"""Grad-CAM overlays: where in the image the network looked for the class it predicted (monai.visualize.GradCAM).

A reviewer's first check on a chest X-ray classifier: a heat map on text labels, corners or the image border
instead of the lungs is a sign that the model learned the source, not the disease."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.utils import ensure_tuple
from torch import nn

from medpipe.files import atomic_write, distinct_names
from medpipe.io.images import image_suffix

logger = logging.getLogger(__name__)


def overlay_png(image: np.ndarray, heat: np.ndarray, path: str | Path, alpha: float = 0.4) -> Path:
    """Write grey `image` (H, W in [0, 1]) with `heat` (H, W in [0, 1]) blended on top in the 'jet' colour map."""
    from matplotlib import colormaps
    from PIL import Image

    grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3]
    rgb = ((1 - alpha) * grey + alpha * colour) * 255
    picture = Image.fromarray(rgb.round().astype(np.uint8))
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


def _grad_cam_of(network: nn.Module, target_layer: str) -> Any:
    """The network's GradCAM for `target_layer`, made once and kept on the network. monai's GradCAM registers forward
    and backward hooks on the layer and keeps no handle to remove them: one made per batch would leave its hooks, and
    the activations they hold, on the network batch after batch (a long inference run, a node's worker)."""
    from monai.visualize import GradCAM

    cams: dict[str, Any] = network.__dict__.setdefault("_medpipe_grad_cams", {})
    if target_layer not in cams:
        cams[target_layer] = GradCAM(nn_module=network, target_layers=target_layer)
    return cams[target_layer]


def grad_cam(network: nn.Module, images: torch.Tensor, target_layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) Grad-CAM maps in [0, 1] for each image's predicted class, and (B,) predicted class indices."""
    cam = _grad_cam_of(network, target_layer)
    with torch.enable_grad():  # engines run under no_grad; Grad-CAM needs the backward pass
        maps = cam(images.float())
        predicted = cam.nn_module.class_idx
    return maps[:, 0].detach().cpu().numpy(), torch.as_tensor(predicted).reshape(-1).cpu().numpy()


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(image_suffix(path.name))]


class GradCamWriter:
    """Ignite handler: after each iteration write `<output_dir>/<image stem>_gradcam_<predicted class>.png`.

    Images of the same name in different folders (`a/x.jpg`, `b/x.jpg`) get their folders in the name (`a_x_…`,
    `b_x_…`, medpipe.files.distinct_names), planned over the whole data set at the start of the run."""

    def __init__(
        self, output_dir: str, network: nn.Module, target_layer: str, class_names: Sequence[str],
        image_key: str = "image", path_key: str = "path", enabled: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.network, self.target_layer = network, target_layer
        self.class_names = list(class_names)
        self.image_key, self.path_key, self.enabled = image_key, path_key, enabled
        self._names: dict[str, str] = {}  # image path -> the stem of its overlays

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self._plan_names)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._write)

    def _plan_names(self, engine: Engine) -> None:
        """Name every image of the run's data set (a MONAI Dataset's `data`) before the first overlay is written."""
        items = getattr(getattr(engine.state.dataloader, "dataset", None), "data", None)
        paths = [str(it[self.path_key]) for it in items or [] if isinstance(it, dict) and self.path_key in it]
        self._names = dict(zip(paths, distinct_names(paths, _stem), strict=True))

    def _name(self, path: str) -> str:
        """The planned stem; an image the plan did not list is told apart from every name given so far."""
        if path not in self._names:
            known = list(self._names)
            self._names[path] = distinct_names([*known, path], _stem)[-1]
            taken = set(list(self._names.values())[:-1])
            while self._names[path] in taken:
                self._names[path] += "_"
        return self._names[path]

    def _write(self, engine: Engine) -> None:
        items: list[dict[str, Any]] = list(ensure_tuple(engine.state.batch))
        device = next(self.network.parameters()).device
        images = torch.stack([torch.as_tensor(it[self.image_key]) for it in items]).to(device)
        maps, predicted = grad_cam(self.network, images, self.target_layer)
        for item, image, heat, cls in zip(items, images, maps, predicted, strict=True):
            stem = self._name(str(item[self.path_key]))
            path = self.output_dir / f"{stem}_gradcam_{self.class_names[int(cls)]}.png"  # predicted class in the name
            overlay_png(image[0].float().cpu().numpy(), heat, path)
        logger.info(f"wrote {len(items)} Grad-CAM overlays to {self.output_dir}")
