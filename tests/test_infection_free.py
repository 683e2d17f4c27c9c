"""Infection-free training slices (issue #21 item 4): real DICOM series and the label-negative slices of a
slice-labelled series become training items with the partial label "no infection", in the intensities and 2.5-D
stacking volumetric inference uses; the loss learns "not infection" from them and leaves labelled slices' loss
unchanged; they train through the bundle without entering the fold partition."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.bundle.parameters import declared_parameters
from medpipe.errors import MedpipeError
from medpipe.io import ct
from medpipe.training.partial_label_loss import NoInfectionLoss
from medpipe.transforms.ct_intensity import ct_to_model_slices
from medpipe.transforms.infection_free import NO_INFECTION, PIXELS_KEY, ResolveNoInfectiond, infection_free_items
from medpipe.transforms.seg import LoadSegSliced, patch_sampling
from medpipe.transforms.slice_context import stack_context

BUNDLE = REPO / "bundles" / "covid_ct_seg"


def _rider() -> Path:
    series = real_dataset("dicom") / "rider_pilot_chest_ct_0117"
    if not series.is_dir():
        pytest.skip(f"{series} not found")
    return series


def test_series_slices_are_what_volumetric_inference_feeds() -> None:
    series = _rider()
    items = infection_free_items([series], context_slices=3)
    volume = ct.load_volume(series)
    assert len(items) == volume.array.shape[2] == 95
    # the exact arrays predict_slices stacks from the volume (same window, CLAHE, 256², neighbours)
    expected = stack_context(ct_to_model_slices(volume, "minmax_slice", 256), 3)
    np.testing.assert_array_equal(np.stack([it[PIXELS_KEY] for it in items]), expected)
    files = {str(f) for f in volume.source_files}
    assert {it["image"] for it in items} == files  # each item names its DICOM file (the trained_on record)
    assert all((it["label"] == NO_INFECTION).all() and it["label"].shape == (1, 256, 256) for it in items)
    # items run inferior → superior as display slices do, each naming the file of its own slice
    import pydicom

    z = [float(pydicom.dcmread(it["image"], stop_before_pixels=True).ImagePositionPatient[2]) for it in items]
    assert z == sorted(z) and len(set(z)) == 95 and len({it["group"] for it in items}) == 1


def test_slice_label_csv_gives_exactly_its_negative_slices() -> None:
    labels_csv = real_dataset("covid_ct_md") / "slice_labels.csv"
    with labels_csv.open(newline="") as fh:
        negatives = {Path(r["file"]).name for r in csv.DictReader(fh) if r["infection"] == "0"}
    items = infection_free_items([labels_csv], context_slices=1)
    assert {Path(it["image"]).name for it in items} == negatives and len(negatives) == 65
    assert all(it[PIXELS_KEY].shape == (1, 256, 256) for it in items)


def test_bad_sources_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="not a DICOM series folder or a slice-label .csv"):
        infection_free_items([tmp_path / "missing"])
    bad = tmp_path / "labels.csv"
    bad.write_text("file,infected\nIM1.dcm,0\n")
    with pytest.raises(MedpipeError, match="`file` and `infection`"):
        infection_free_items([bad])
    bad.write_text("file,infection\nIM1.dcm,yes\n")
    with pytest.raises(MedpipeError, match="0 or 1"):
        infection_free_items([bad])
    positives = tmp_path / "positives.csv"  # every slice labelled infected: nothing to learn absence from
    positives.write_text("file,infection\n" + "".join(f"{f},1\n" for f in _rider().glob("*.dcm")))
    with pytest.raises(MedpipeError, match="no slice is labelled infection 0"):
        infection_free_items([positives])
    parameter = declared_parameters(BUNDLE)["infection_free"]
    assert parameter.coerce(f"{tmp_path},{bad}") == [str(tmp_path), str(bad)]  # folders and CSVs, comma-separated
    assert parameter.coerce("none") == []
    with pytest.raises(MedpipeError, match="existing files or folders"):
        parameter.coerce(str(tmp_path / "nope"))


def test_loss_is_the_base_loss_on_labelled_slices_and_not_infection_on_the_others() -> None:
    torch.manual_seed(0)
    base = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = NoInfectionLoss(base, not_infection_label=NO_INFECTION, infection=2)
    pred = torch.randn(4, 3, 8, 8)
    label = torch.randint(0, 3, (4, 1, 8, 8))
    torch.testing.assert_close(loss(pred, label), base(pred, label))  # unchanged without partial labels
    partial = label.clone()
    partial[1:3] = NO_INFECTION
    partial[1, :, :2] = 0  # augmentation's background padding on an infection-free slice
    marginal = -torch.log(1 - torch.softmax(pred[1:3], 1)[:, 2]).mean()
    full = base(pred[[0, 3]], label[[0, 3]])
    torch.testing.assert_close(loss(pred, partial), (2 * full + 2 * marginal) / 4)
    torch.testing.assert_close(loss(pred[1:3], partial[1:3]), marginal)
    # a gradient step on an infection-free slice lowers its infection probability everywhere
    logits = pred[1:2].clone().requires_grad_(True)
    loss(logits, partial[1:2]).backward()
    with torch.no_grad():
        before = torch.softmax(logits, 1)[:, 2]
        after = torch.softmax(logits - 1.0 * logits.grad / logits.grad.abs().max(), 1)[:, 2]
    assert bool((after < before).all())


def test_training_dice_counts_invented_infection_only() -> None:
    pred = torch.zeros(3, 2, 2)
    pred[0, 0, 0], pred[1, 0, 1], pred[2, 1, 0], pred[1, 1, 1] = 5, 5, 5, 5  # argmax: [[0, 1], [2, 1]]
    label = torch.tensor([[[NO_INFECTION, NO_INFECTION], [NO_INFECTION, 2]]])
    out = ResolveNoInfectiond(infection=2)({"pred": pred, "label": label})["label"]
    assert out.tolist() == [[[0, 1], [0, 2]]]  # unknown follows a lung/background guess; invented infection → 0


def test_infection_free_slices_load_and_get_uniform_patches() -> None:
    pixels = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    item = {"image": "/x/IM1.dcm", PIXELS_KEY: pixels, "label": np.full((1, 64, 64), NO_INFECTION, np.uint8)}
    loaded = LoadSegSliced(num_classes=3)(item)
    assert PIXELS_KEY not in loaded and torch.equal(loaded["image"], torch.from_numpy(pixels))
    crop = patch_sampling(16, [1, 1, 1], num_classes=3)[0]
    crop.set_random_state(0)
    corners = set()
    for _ in range(50):
        patch = crop(dict(loaded))[0]
        assert tuple(patch["image"].shape) == (3, 16, 16) and bool((patch["label"] == NO_INFECTION).all())
        corners.add(tuple(np.argwhere(np.isin(pixels[0], patch["image"][0].numpy()))[0]))
    assert len(corners) > 10  # placed anywhere, not on a class centre (there is none)


def test_bundle_trains_with_infection_free_slices_outside_the_partition(tmp_path: Path) -> None:
    data, series = real_dataset("covid_ct_seg"), _rider()
    common = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "m"), "max_cases": 24, "num_folds": 2,
              "fold": 0, "epochs": 1, "val_interval": 1, "image_size": 128}  # fmt: skip
    run_bundle(BUNDLE, "train", "unet5_25d", output_dir=str(tmp_path / "t"), infection_free=str(series), **common)
    trained = json.loads((tmp_path / "m" / "model.trained_on.json").read_text())
    rider = [p for p in trained if Path(p).parent == series.resolve()]
    assert len(rider) == 95 and len(trained) > 95
    run_bundle(BUNDLE, "evaluate", "unet5_25d", output_dir=str(tmp_path / "e"), **common)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert 0 < metrics["n"] <= 24  # validation scores labelled slices only, never the infection-free ones
