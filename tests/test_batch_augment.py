"""BatchAugment: per-image random flip / affine / gamma on a whole batch, as the brain bundle's prepare_batch."""

from __future__ import annotations

import pytest
import torch

from medpipe.batch_augment import BatchAugment

OFF = {"flip_prob": 0.0, "affine_prob": 0.0, "gamma_prob": 0.0}


def _batch(n: int = 6, size: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"image": torch.rand(n, 1, size, size), "label": torch.arange(n, dtype=torch.float32)[:, None]}


def test_everything_off_is_the_identity_and_labels_pass_through() -> None:
    batch = _batch()
    images, labels = BatchAugment(**OFF)(batch, torch.device("cpu"))
    assert torch.equal(images, batch["image"]) and torch.equal(labels, batch["label"])


def test_flip_with_probability_one_mirrors_the_last_axis() -> None:
    batch = _batch()
    images, _ = BatchAugment(**{**OFF, "flip_prob": 1.0})(batch)
    assert torch.equal(images, batch["image"].flip(-1))


def test_affine_with_zero_ranges_keeps_the_image() -> None:
    batch = _batch()
    aug = BatchAugment(**{**OFF, "affine_prob": 1.0}, rotate_range=0.0, scale_range=0.0, translate_range=0.0)
    assert torch.allclose(aug(batch)[0], batch["image"], atol=1e-5)


def test_shift_moves_content_and_pads_with_zeros() -> None:
    image = torch.zeros(1, 1, 16, 16)
    image[..., 8, 8] = 1.0
    aug = BatchAugment(**{**OFF, "affine_prob": 1.0}, rotate_range=0.0, scale_range=0.0, translate_range=4.0)
    torch.manual_seed(3)
    out = aug.augment(image)
    assert out.shape == image.shape and out.sum() == pytest.approx(1.0, abs=1e-4)  # mass kept, only moved
    assert not torch.allclose(out, image)


def test_rotation_changes_images_differently_per_image() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[..., 4:28, 14:18] = 1.0  # a vertical bar
    images = image.repeat(4, 1, 1, 1)
    out = BatchAugment(**{**OFF, "affine_prob": 1.0}, rotate_range=0.5, scale_range=0.0, translate_range=0.0)(
        {"image": images, "label": torch.zeros(4, 1)}
    )[0]
    assert not torch.allclose(out[0], out[1])  # each image draws its own angle


def test_gamma_keeps_the_range_and_bends_the_middle() -> None:
    image = torch.linspace(0, 1, 16 * 16).reshape(1, 1, 16, 16)
    out = BatchAugment(**{**OFF, "gamma_prob": 1.0, "gamma": (2.0, 2.0)}).augment(image)
    assert out.min() == pytest.approx(0.0) and out.max() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(out, image**2, atol=1e-5)


def test_the_same_seed_gives_the_same_batch() -> None:
    batch, aug = _batch(), BatchAugment()
    torch.manual_seed(7)
    first = aug(batch)[0]
    torch.manual_seed(7)
    assert torch.equal(first, aug(batch)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"flip_prob": 1.5}, "flip_prob"), ({"gamma": (0.0, 1.0)}, "gamma"), ({"gamma": (2.0, 1.0)}, "gamma")],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchAugment(**kwargs)


def test_non_batch_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        BatchAugment().augment(torch.zeros(1, 16, 16))


def test_the_callers_batch_is_not_modified() -> None:
    batch = _batch()
    before = batch["image"].clone()
    BatchAugment(flip_prob=1.0, affine_prob=1.0, gamma_prob=1.0)(batch)
    assert torch.equal(batch["image"], before)
