"""covid_ct_seg v2 pieces: 2.5-D slice context (datalists, loader, volumetric inference), patch sampling with
foreground oversampling, the segmentation ensemble, pixel-level calibration in metrics.json, the slice-label scores
on real DICOM, and the v2 overlay running train → evaluate → inference on real slices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.errors import MedpipeError
from medpipe.evaluation.real_dicom import read_slice_labels, slice_label_figures
from medpipe.inference.ct_volume import predict_slices
from medpipe.inferers.ensemble import ModelEnsembleInferer
from medpipe.transforms.seg import LoadSegSliced, RandReverseContextd, patch_sampling
from medpipe.transforms.slice_context import add_slice_context, stack_context, with_slice_context

BUNDLE = REPO / "bundles" / "covid_ct_seg"


def _items(groups: dict[str, int], shuffle: bool = True) -> list[dict]:
    items = [
        {"image": f"{g}_{i}.png", "group": g, "source_index": 100 * n + i}
        for n, (g, count) in enumerate(groups.items())
        for i in range(count)
    ]
    if shuffle:  # datalists need not be in slice order
        items = [items[i] for i in np.random.default_rng(0).permutation(len(items))]
    return items


def test_context_stays_inside_its_volume_and_repeats_the_ends() -> None:
    items = add_slice_context(_items({"a": 4, "b": 3}), 3)
    by_image = {it["image"]: it["context"] for it in items}
    assert by_image["a_0.png"] == ["a_0.png", "a_0.png", "a_1.png"]
    assert by_image["a_2.png"] == ["a_1.png", "a_2.png", "a_3.png"]
    assert by_image["a_3.png"] == ["a_2.png", "a_3.png", "a_3.png"]
    assert by_image["b_0.png"] == ["b_0.png", "b_0.png", "b_1.png"]  # not a_3: another volume
    for it in items:
        assert all(Path(p).name.split("_")[0] == it["group"] for p in it["context"])
    five = {it["image"]: it["context"] for it in add_slice_context(_items({"a": 4}), 5)}
    assert five["a_1.png"] == ["a_0.png", "a_0.png", "a_1.png", "a_2.png", "a_3.png"]


def test_context_k1_changes_nothing_and_even_k_is_refused() -> None:
    items = _items({"a": 3})
    assert add_slice_context(items, 1) == items
    assert with_slice_context({"train": items, "val": []}, 1)["train"] == items
    with pytest.raises(MedpipeError, match="odd"):
        add_slice_context(items, 2)


def test_training_channels_match_volumetric_stacking(tmp_path: Path) -> None:
    """The loader's 2.5-D input of each training slice equals what volumetric inference stacks from the volume."""
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, size=(5, 16, 16), dtype=np.uint8)
    items = []
    for i, plane in enumerate(volume):
        Image.fromarray(plane).save(tmp_path / f"v_{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / f"l_{i}.png")
        items.append({"image": str(tmp_path / f"v_{i}.png"), "label": str(tmp_path / f"l_{i}.png"), "group": "v",
                      "source_index": i})  # fmt: skip
    loader = LoadSegSliced(num_classes=3)
    loaded = [loader(it)["image"].numpy() for it in add_slice_context(items[::-1], 3)][::-1]
    slices = np.stack([loader(it)["image"].numpy()[0] for it in items])  # plain 2-D: one channel
    expected = stack_context(slices, 3)
    assert expected.shape == (5, 3, 16, 16)
    np.testing.assert_array_equal(np.stack(loaded), expected)


def test_context_slice_of_another_size_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "b.png")
    item = {"image": str(tmp_path / "a.png"), "context": [str(tmp_path / "b.png"), str(tmp_path / "a.png")] * 1}
    with pytest.raises(MedpipeError, match="b.png"):
        LoadSegSliced(num_classes=3)(item)


class _Recorder(torch.nn.Module):
    """Returns 3 'class' channels; records every input batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return torch.cat([x.mean(1, keepdim=True)] * 3, dim=1) + self.w


def test_volumetric_inference_stacks_neighbours_across_batches() -> None:
    slices = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((5, 4, 4), np.float32)
    net = _Recorder()
    predict_slices(slices, net, None, image_size=4, batch_size=2, context_slices=3)
    fed = torch.cat(net.seen).numpy()[:, :, 0, 0]
    np.testing.assert_array_equal(fed, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 4]])


def test_patch_sampling_keeps_the_foreground_rate() -> None:
    label = torch.zeros(1, 64, 64, dtype=torch.uint8)
    label[0, 20:30, 40:50] = 2  # a small lesion: 100 of 4096 pixels
    label[0, 10:60, 5:60] = torch.where(label[0, 10:60, 5:60] == 2, 2, 1)
    data = {"image": torch.rand(1, 64, 64), "label": label}
    crop = patch_sampling(16, [1, 1, 1], num_classes=3)[0]
    crop.set_random_state(0)
    centres = []
    for _ in range(600):
        patch = crop(dict(data))[0]
        assert tuple(patch["image"].shape) == (1, 16, 16)
        centres.append(int(patch["label"][0, 8, 8]))
    share = np.bincount(centres, minlength=3) / len(centres)
    # a third of the patches are centred on the lesion (background centres near the edge are pulled inwards, so
    # only the foreground share is exact)
    assert abs(share[2] - 1 / 3) < 0.06, share
    only_lesion = patch_sampling(16, [0, 0, 1], num_classes=3)[0]
    only_lesion.set_random_state(1)
    assert all(int(only_lesion(dict(data))[0]["label"][0, 8, 8]) == 2 for _ in range(50))
    assert patch_sampling(0, [1, 1, 1], 3) == []
    with pytest.raises(MedpipeError, match="3 non-negative"):
        patch_sampling(16, [1, 1], 3)


def test_context_order_is_reversed_at_the_set_rate() -> None:
    image = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 2, 2)
    flip = RandReverseContextd("image", prob=0.5)
    flip.set_random_state(0)
    firsts = [int(flip({"image": image})["image"][0, 0, 0]) for _ in range(400)]
    assert set(firsts) == {0, 2} and 0.4 < firsts.count(2) / 400 < 0.6


def test_segmentation_ensemble_averages_probabilities() -> None:
    a, b = torch.nn.Conv2d(3, 3, 1), torch.nn.Conv2d(3, 3, 1)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = ModelEnsembleInferer(lambda inp, net: net(inp), [b], activation="softmax")(x, a)
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
    torch.testing.assert_close(torch.softmax(out, 1), expected, atol=1e-6, rtol=1e-5)


def _fake_series(n: int = 6) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    mask = np.zeros((8, 8, n), np.uint8)
    affine = np.diag([2.0, 2.0, 5.0, 1.0])  # 20 mm³ = 0.02 mL per voxel
    return mask, affine, [Path(f"/x/IM{k}.dcm") for k in range(n)]


def test_slice_label_figures() -> None:
    mask, affine, files = _fake_series()
    labels = {f"IM{k}.dcm": int(k >= 3) for k in range(6)}
    mask[:2, :2, 3:] = 2  # infection on every positive slice, 4 voxels each
    mask[0, 0, 1] = 2  # one voxel on a negative slice
    fig = slice_label_figures(mask, affine, files, labels)
    assert fig["slice_auc"] == 1.0 and fig["positive_slices"] == 3
    assert fig["infection_ml_label_negative"] == pytest.approx(0.02)
    assert fig["infection_ml_label_positive"] == pytest.approx(0.24)
    assert fig["specificity_no_infection"] == pytest.approx(2 / 3, abs=1e-3) and fig["sensitivity_any_infection"] == 1.0
    mask[:] = 0
    mask[:4, :4, :3] = 2  # infection only where the labels say none: ranks backwards
    assert slice_label_figures(mask, affine, files, labels)["slice_auc"] == 0.0
    with pytest.raises(MedpipeError, match="differ"):
        slice_label_figures(mask, affine, files[:-1] + [Path("/x/other.dcm")], labels)


def test_slice_labels_file_is_checked(tmp_path: Path) -> None:
    bad = tmp_path / "labels.csv"
    bad.write_text("file,infected\nIM1.dcm,1\n")
    with pytest.raises(MedpipeError, match="infection"):
        read_slice_labels(bad)
    bad.write_text("file,infection\nIM1.dcm,2\n")
    with pytest.raises(MedpipeError, match="0 or 1"):
        read_slice_labels(bad)


@pytest.mark.parametrize("network,context", [("unet5_25d", 3), ("unet5_25d_da", 3), ("unet", 1)])
def test_recipe_overlays_train_evaluate_and_infer_with_calibration(tmp_path: Path, network: str, context: int) -> None:
    """The v2 (2.5-D, patches) and v1 (`unet`) recipes through the bundle on real slices; metrics.json carries
    pixel calibration."""
    data = real_dataset("covid_ct_seg")
    common = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "m"), "max_cases": 24, "num_folds": 2,
              "fold": 0, "epochs": 1, "val_interval": 1, "image_size": 128}  # fmt: skip
    run_bundle(BUNDLE, "train", network, output_dir=str(tmp_path / "t"), **common)
    run_bundle(BUNDLE, "evaluate", network, output_dir=str(tmp_path / "e"), **common)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["context_slices"] == context and metrics["network"] == network and metrics["n"] > 0
    calibration = metrics["calibration"]
    assert calibration["pixels"] == 2048 * metrics["n"]
    for part in ("all_classes", "lung", "infection"):
        assert 0.0 <= calibration[part]["ece"] <= 1.0 and 0.0 <= calibration[part]["brier"] <= 2.0
        assert sum(calibration[part]["reliability"]["counts"]) == calibration["pixels"]
    run_bundle(BUNDLE, "inference", network, output_dir=str(tmp_path / "i"), **common)
    report = json.loads((tmp_path / "i" / "report.json").read_text())
    assert ("3 neighbouring slices" in report["preprocessing"]) == (context == 3)
    assert report["volumes"][0]["lung_volume_ml"] >= 0 and report["volumes"][0]["files"]["seg"]
