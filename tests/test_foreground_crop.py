"""Cropping a slice to its head before the resize (`crop_foreground` in brain_tumor_cls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpipe.transforms.foreground_crop import CropForegroundSquared, largest_region_box


def _slice_with_head(rows: int = 200, cols: int = 300) -> torch.Tensor:
    """A dark picture with a bright ellipse (the head) off centre and a small bright label in a corner."""
    yy, xx = np.mgrid[:rows, :cols]
    image = (((yy - 110) / 60.0) ** 2 + ((xx - 180) / 40.0) ** 2 <= 1).astype(np.float32) * 0.8
    image[5:12, 5:30] = 1.0  # burnt-in text: smaller than the head, must not enlarge the box
    return torch.from_numpy(image)[None]


def test_box_is_the_largest_region() -> None:
    top, bottom, left, right = largest_region_box(_slice_with_head()[0].numpy())
    assert abs(top - 50) <= 3 and abs(bottom - 171) <= 3
    assert abs(left - 140) <= 3 and abs(right - 221) <= 3


def test_crop_is_square_centred_and_keeps_the_head() -> None:
    image = _slice_with_head()
    out = CropForegroundSquared("image", margin=0.0)({"image": image})["image"]
    assert out.shape[0] == 1 and out.shape[1] == out.shape[2]
    assert abs(out.shape[1] - 121) <= 4  # the head's long side
    assert out.sum().item() == pytest.approx(image[:, 20:, 60:].sum().item(), rel=0.02)  # the whole head, no text


def test_box_past_the_border_is_zero_padded() -> None:
    image = torch.zeros(1, 60, 200)
    image[:, :, 50:150] = 1.0  # a 60 x 100 region: its square box (100 x 100) leaves the picture above and below
    out = CropForegroundSquared("image", margin=0.0)({"image": image})["image"]
    assert out.shape[1] == out.shape[2] and abs(out.shape[1] - 100) <= 3  # smoothing may widen the box a pixel
    assert out[:, :15].sum() == 0 and out[:, -15:].sum() == 0  # padding, not picture
    assert out[:, 30:70, 3:-3].min() == 1.0


def test_blank_image_passes_unchanged_and_bad_settings_fail() -> None:
    blank = torch.zeros(1, 64, 80)
    assert CropForegroundSquared("image")({"image": blank})["image"].shape == (1, 64, 80)
    with pytest.raises(ValueError, match="threshold"):
        CropForegroundSquared("image", threshold=1.5)
    with pytest.raises(ValueError, match="margin"):
        CropForegroundSquared("image", margin=-0.1)


@pytest.mark.parametrize("config", ["evaluate.json", "inference.json"])
def test_crop_foreground_key_switches_every_job(config: str) -> None:
    """brain_tumor_cls: `crop_foreground` adds the crop after loading, in training and in the job that scores."""
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import find_bundle

    configs = find_bundle("brain_tumor_cls") / "configs"

    def names(on: object, key: str) -> list[str]:
        parser = ConfigParser()
        parser.read_config([str(configs / "train.json"), str(configs / config)])
        parser["crop_foreground"] = on
        return [type(t).__name__ for t in parser.get_parsed_content(key).transforms]

    assert "CropForegroundSquared" not in names(False, "train#preprocessing")  # the default
    for key in ("train#preprocessing", "validate#preprocessing"):
        got = names("true", key)  # as fire passes it from the command line
        assert got.index("CropForegroundSquared") == got.index("LoadGrey2Dd") + 1
