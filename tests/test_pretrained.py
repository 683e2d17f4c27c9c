"""medpipe.pretrained: the `pretrained_ckpt` route: backbone loading by name and by order, prefix stripping, RGB->grey
first conv, the new head kept, and one-line MedpipeErrors for checkpoints that are not (fitting) state dicts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ResNet

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle, run_config_files
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.nets.efficientnet_lite0 import EfficientNetLite0, lite0_imagenet_path
from medpipe.nets.paper_cnn import PaperCNN
from medpipe.nets.pretrained import LoadPretrained, load_pretrained, read_state_dict, strip_prefixes

BUNDLE = REPO / "bundles" / "brain_tumor_cls"


def _resnet18(in_channels: int, classes: int) -> ResNet:
    return ResNet("basic", [2, 2, 2, 2], [64, 128, 256, 512], spatial_dims=2, n_input_channels=in_channels,
                  num_classes=classes)  # fmt: skip


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


class NotATensor:
    """Any pickled object: weights_only=True must refuse it rather than run its reduce hook."""


def test_strip_prefixes() -> None:
    assert strip_prefixes("module.model.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert strip_prefixes("_orig_mod.fc.bias") == "fc.bias"


def test_torchvision_style_imagenet_resnet_into_grey_bundle_net(tmp_path: Path) -> None:
    """A torchvision-named ImageNet ResNet18 (3 channels, 1000 classes, DDP prefix) -> the bundle's 1-channel net."""
    imagenet = _resnet18(3, 1000)
    path = _save({"state_dict": {f"module.{k}": v for k, v in imagenet.state_dict().items()}}, tmp_path / "r18.pth")
    net = _resnet18(1, 1)
    head_before = net.fc.weight.clone()
    report = load_pretrained(net, path)
    assert report["mode"] == "by name" and report["adapted_rgb_to_grey"] == ["conv1.weight"]
    assert report["kept_new_head"] == ["fc.weight", "fc.bias"] and report["unused"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(net.conv1.weight, imagenet.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(net.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert torch.equal(net.fc.weight, head_before)
    grey = torch.rand(1, 1, 64, 64)  # a grey image through the summed conv == the same image as RGB through ImageNet's
    torch.testing.assert_close(net.conv1(grey), imagenet.conv1(grey.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-5)


def test_other_implementation_matches_by_order_and_shape() -> None:
    """efficientnet_pytorch key names (the wheel's ImageNet file) load into medpipe's Lite0 through the generic path."""
    generic = EfficientNetLite0()
    report = load_pretrained(generic, lite0_imagenet_path())
    assert report["mode"] == "by order and shape"
    reference = EfficientNetLite0(pretrained=True)
    for key, value in reference.state_dict().items():
        if key.startswith("features."):
            assert torch.equal(generic.state_dict()[key], value), key


def test_bundle_checkpoint_backbone_with_new_head(tmp_path: Path) -> None:
    four_class = EfficientNetLite0(out_channels=4)
    path = _save(four_class.state_dict(), tmp_path / "model.pt")
    net = EfficientNetLite0(out_channels=1)
    report = load_pretrained(net, path)
    assert report["mode"] == "by name" and report["loaded"] == len([k for k in net.state_dict() if "features." in k])
    assert torch.equal(net.features.top.conv.weight, four_class.features.top.conv.weight)
    assert net(torch.rand(1, 1, 64, 64)).shape == (1, 1)


def test_none_path_does_nothing() -> None:
    assert load_pretrained(PaperCNN(), None) is None
    LoadPretrained(PaperCNN(), None)  # the train.json default: no file needed


def test_shapes_that_do_not_fit(tmp_path: Path) -> None:
    path = _save(_resnet18(1, 1).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(MedpipeError, match="does not fit PaperCNN: .* backbone tensors unmatched") as err:
        load_pretrained(PaperCNN(), path)
    assert "\n" not in str(err.value)


def test_same_names_wrong_widths(tmp_path: Path) -> None:
    narrow = {k: v[..., :1] if v.ndim == 4 else v for k, v in PaperCNN().state_dict().items()}
    expected = r"'features.0.weight' needs \(32, 1, 4, 4\), checkpoint has \(32, 1, 4, 1\)"
    with pytest.raises(MedpipeError, match=expected):
        load_pretrained(PaperCNN(), _save(narrow, tmp_path / "narrow.pt"))


@pytest.mark.parametrize(
    "obj,message",
    [
        (torch.zeros(3), "is not a state dict \\(got Tensor\\)"),
        ([torch.zeros(3)], "is not a state dict \\(got list\\)"),
        ({"epoch": 3, "lr": 0.1}, "is not a state dict: \\['epoch', 'lr'\\] are not tensors"),
        ({}, "is not a state dict"),
        ({"model": NotATensor()}, "holds objects other than tensors \\(refused: weights_only=True\\)"),
        (torch.nn.Linear(2, 1), "holds objects other than tensors"),  # torch.save(model) instead of its state dict
    ],
    ids=["tensor", "list", "scalars", "empty", "pickled-object", "whole-module"],
)
def test_not_a_state_dict(tmp_path: Path, obj: object, message: str) -> None:
    path = _save(obj, tmp_path / "bad.pt")
    with pytest.raises(MedpipeError, match=message) as err:
        read_state_dict(path)
    assert "\n" not in str(err.value)


def test_not_a_torch_file_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(MedpipeError, match="cannot read pretrained checkpoint"):
        read_state_dict(junk)
    with pytest.raises(MedpipeError, match="not found; set --pretrained_ckpt"):
        LoadPretrained(PaperCNN(), tmp_path / "absent.pt")


def test_bundle_train_with_pretrained_ckpt(tmp_path: Path) -> None:
    """train.json's `pretrained_ckpt` key: a fitting checkpoint loads before epoch 1; a misfit ends in one line."""
    data = real_dataset("brain_mri_yes_no")
    donor = PaperCNN()
    common = {"dataset_dir": str(data), "max_cases": 8, "num_folds": 2, "fold": 0, "epochs": 1, "seed": 0,
              "output_dir": str(tmp_path / "out"), "ckpt_dir": str(tmp_path / "models")}  # fmt: skip
    run_bundle(BUNDLE, "train", pretrained_ckpt=str(_save(donor.state_dict(), tmp_path / "donor.pt")), **common)
    assert (tmp_path / "models" / "model.pt").is_file()

    misfit = _save(_resnet18(1, 1).state_dict(), tmp_path / "resnet.pt")
    with pytest.raises(Exception) as err:
        run_bundle(BUNDLE, "train", pretrained_ckpt=str(misfit), **common)
    assert "does not fit PaperCNN" in str(find_medpipe_error(err.value))


def test_official_split_drops_test_copies_of_training_images(tmp_path: Path) -> None:
    """The 4-class pretraining's test split: exact and near (resized + re-encoded) copies of Training files go."""
    import numpy as np
    from PIL import Image

    from medpipe.data.datalists import official_split_datalists

    rng = np.random.default_rng(0)
    blobs = [Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)) for _ in range(4)]
    pictures = [np.asarray(b.resize((96, 96), Image.Resampling.BICUBIC)) for b in blobs]  # smooth, distinct images
    for split in ("Training", "Testing"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
    for i, pic in enumerate(pictures):
        Image.fromarray(pic).save(tmp_path / "Training" / "ab"[i % 2] / f"tr{i}.png")
    (tmp_path / "Testing" / "a" / "exact.png").write_bytes((tmp_path / "Training" / "a" / "tr0.png").read_bytes())
    Image.fromarray(pictures[1]).resize((80, 80)).save(tmp_path / "Testing" / "b" / "near.jpg", quality=85)
    Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8)).save(tmp_path / "Testing" / "a" / "new.png")
    lists = official_split_datalists(tmp_path, ["a", "b"])
    assert [it["path"] for it in lists["val"]] == ["Testing/a/new.png"]
    kinds = {r["path"]: (r["kind"], r["copy_of"]) for r in lists["removed"]}
    assert kinds == {"Testing/a/exact.png": ("exact", "Training/a/tr0.png"),
                     "Testing/b/near.jpg": ("near", "Training/b/tr1.png")}  # fmt: skip
    assert len(lists["train"]) == 4


def test_image_hashes_are_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4-class de-duplication's hashes are computed once per file content, and a bad cache never breaks it."""
    import numpy as np
    from PIL import Image

    from medpipe.data import duplicates as data

    rng = np.random.default_rng(1)
    items = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        items.append({"image": str(tmp_path / f"img{i}.png"), "path": f"img{i}.png"})
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path / "cache"))
    first = data.find_copies(items[:1], items[1:])
    assert json.loads(data.hash_cache_file().read_text())["version"] == data.HASH_CACHE_VERSION

    def must_not_run(path: object) -> None:
        raise AssertionError("hashed again although cached")

    with monkeypatch.context() as m:
        m.setattr(data, "image_hashes", must_not_run)
        assert data.find_copies(items[:1], items[1:]) == first  # all three hashes came from the cache
    for corrupt in ("{not json", "[1, 2]", '{"version": 1, "hashes": [1, 2]}', '{"version": 1, "hashes": {"x": 3}}'):
        data.hash_cache_file().write_text(corrupt)
        assert data.find_copies(items[:1], items[1:]) == first  # a corrupt cache is recomputed and rewritten
    assert len(json.loads(data.hash_cache_file().read_text())["hashes"]) == 3
    (tmp_path / "blocked").write_text("a file where the cache folder should be")
    monkeypatch.setenv("MEDPIPE_CACHE_DIR", str(tmp_path / "blocked"))
    assert data.find_copies(items[:1], items[1:]) == first  # an unwritable cache only costs time


def test_pretrain_4class_paper_cnn_backbone_feeds_the_yes_no_fine_tuning(tmp_path: Path) -> None:
    """pretrain_4class.json + pretrain_4class_paper_cnn.json publish a 4-output PaperCNN; the `paper_cnn_4class`
    network then starts from its features with a new 1-output head (lr 0, so the loaded weights stay exact)."""
    import numpy as np
    from PIL import Image

    from medpipe.data.synthetic import make_synthetic_set

    rng = np.random.default_rng(0)
    four = tmp_path / "four"
    for split, n in (("Training", 3), ("Testing", 1)):
        for cls in ("glioma", "meningioma", "notumor", "pituitary"):
            (four / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(four / split / cls / f"{i}.png")
    names = ("train", "pretrain_4class", "pretrain_4class_paper_cnn")
    configs = [str(BUNDLE / "configs" / f"{name}.json") for name in names]
    pre_dir = tmp_path / "pretrain"
    run_config_files(configs, dataset_dir=str(four), ckpt_dir=str(pre_dir), output_dir=str(pre_dir), epochs=1, seed=0)
    published = torch.load(pre_dir / "model.pt", weights_only=True)
    assert published["classifier.weight"].shape == (4, 16 * 28 * 28)

    yes_no = make_synthetic_set(tmp_path / "yes_no", per_class=4, size=64)
    out = tmp_path / "fine"
    run_bundle(BUNDLE, "train", network="paper_cnn_4class", dataset_dir=str(yes_no), num_folds=2, fold=0, epochs=1,
               learning_rate=0.0, seed=0, ckpt_dir=str(out), output_dir=str(out),
               pretrained_ckpt=str(pre_dir / "model.pt"))  # fmt: skip
    tuned = torch.load(out / "model.pt", weights_only=True)
    assert tuned["classifier.weight"].shape == (1, 16 * 28 * 28)
    for key, value in published.items():
        if key.startswith("features."):
            assert torch.equal(tuned[key], value), key
