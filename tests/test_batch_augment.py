"""BatchAugment: per-image random flip / affine / gamma on a whole batch, as the brain bundle's prepare_batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medpipe.transforms.batch_augment import BatchAugment

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


def _seg_batch(n: int = 4, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.zeros(n, 1, size, size, dtype=torch.long)
    labels[:, :, 8:24, 6:14] = 1
    labels[:, :, 12:20, 16:28] = 2
    return labels.float() / 2, labels  # the image is the label map itself, so the two must stay aligned


def test_segmentation_labels_follow_the_image_exactly() -> None:
    images, labels = _seg_batch()
    aug = BatchAugment(flip_prob=0.5, affine_prob=1.0, gamma_prob=0.0, spatial_label=True)
    torch.manual_seed(0)
    out_images, out_labels = aug({"image": images, "label": labels})
    assert out_labels.dtype == labels.dtype and set(out_labels.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(out_labels, labels)  # warped
    # nearest-sampled labels agree with the bilinear image wherever the image is not on a blurred edge
    crisp = (out_images * 2 - out_images.mul(2).round()).abs() < 1e-3
    assert crisp.float().mean() > 0.8
    assert torch.equal(out_images.mul(2).round()[crisp].long(), out_labels[crisp])


def test_labels_untouched_for_classification_and_shapes_checked() -> None:
    images, labels = _seg_batch()
    _, same = BatchAugment(affine_prob=1.0)({"image": images, "label": labels})
    assert torch.equal(same, labels)  # spatial_label=False: labels are class labels, never warped
    with pytest.raises(ValueError, match="do not match"):
        BatchAugment(spatial_label=True).augment(images, labels[:, :, :16])


@pytest.mark.parametrize("bundle", ["covid_ct_seg", "covid_cxr_cls"])
def test_augment_on_batch_switches_the_trainer_and_the_loader(bundle: str) -> None:
    from monai.bundle import ConfigParser
    from monai.engines import default_prepare_batch

    from medpipe.bundle.config import find_bundle

    def parsed(on: bool) -> tuple[object, list[str]]:
        parser = ConfigParser()
        parser.read_config(str(find_bundle(bundle) / "configs" / "train.json"))
        parser["augment_on_batch"] = on
        names = [type(t).__name__ for t in parser.get_parsed_content("train#preprocessing").transforms]
        return parser.get_parsed_content("train#trainer#prepare_batch"), names

    config = ConfigParser()
    config.read_config(str(find_bundle(bundle) / "configs" / "train.json"))
    augmentations = {type(t).__name__ for t in config.get_parsed_content("train#random_transforms")}
    prepare, names = parsed(False)  # the default: MONAI's per-image random transforms in the loader
    assert prepare is default_prepare_batch and augmentations <= set(names)
    prepare, names = parsed(True)  # patch sampling stays per image; the augmentations move to the batch
    assert isinstance(prepare, BatchAugment) and not augmentations & set(names)
    assert prepare.spatial_label == (bundle == "covid_ct_seg")
    parser = ConfigParser()
    parser.read_config(str(find_bundle(bundle) / "configs" / "train.json"))
    per_image = {k: parser.get_parsed_content(f"train#random_transforms#0#{k}") for k in ("prob", "rotate_range")}
    assert (prepare.affine_prob, prepare.rotate_range) == (per_image["prob"], per_image["rotate_range"])  # one source


def test_ct_training_runs_with_batch_augmentation(tmp_path: Path) -> None:
    from conftest import real_dataset
    from medpipe.bundle.config import find_bundle, run_bundle

    data = real_dataset("covid_ct_seg")
    run_bundle(find_bundle("covid_ct_seg"), "train", dataset_dir=str(data), ckpt_dir=str(tmp_path), epochs=1,
               max_cases=16, image_size=64, augment_on_batch=True, output_dir=str(tmp_path))  # fmt: skip
    assert (tmp_path / "model.pt").stat().st_size > 0
