"""EfficientNet-Lite0: architecture, the ImageNet key mapping (checked against an independent functional forward and
against a real photograph), frozen vs fine-tune modes, and loud failure on weights that do not fit; and the paper
CNN's frozen mode."""

from __future__ import annotations

import os

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medpipe.errors import MedpipeError
from medpipe.nets.efficientnet_lite0 import EfficientNetLite0, lite0_imagenet_path, lite0_key, load_lite0_imagenet
from medpipe.nets.paper_cnn import PaperCNN

STRIDE2_BLOCKS = {1, 3, 5, 11}  # first block of the stages that halve the resolution (B0 layout)
MILITARY_UNIFORM = 652  # ImageNet-1k class index; the classic label of matplotlib's grace_hopper.jpg


@pytest.fixture(scope="module")
def imagenet_state() -> dict[str, torch.Tensor]:
    return torch.load(lite0_imagenet_path(), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def imagenet_net() -> EfficientNetLite0:
    return EfficientNetLite0(in_channels=3, out_channels=1000, head_hidden=(), pretrained=True).eval()


def _tf_same_conv(x: torch.Tensor, w: torch.Tensor, stride: int = 1, groups: int = 1) -> torch.Tensor:
    """TensorFlow 'SAME' convolution written out: pad total = max((ceil(n/s)-1)*s + k - n, 0), extra at the end."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((int(np.ceil(n / stride)) - 1) * stride + w.shape[-1] - n, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)


def _reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Lite0 straight from the efficientnet_pytorch-style state dict, with no medpipe module involved."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                            training=False, eps=1e-3)  # fmt: skip

    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    t = F.relu6(bn(_tf_same_conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
    for i in range(16):
        p, h = f"_blocks.{i}", t
        if f"{p}._expand_conv.weight" in sd:
            h = F.relu6(bn(_tf_same_conv(h, sd[f"{p}._expand_conv.weight"]), f"{p}._bn0"))
        dw = sd[f"{p}._depthwise_conv.weight"]
        stride = 2 if i in STRIDE2_BLOCKS else 1
        h = F.relu6(bn(_tf_same_conv(h, dw, stride, groups=dw.shape[0]), f"{p}._bn1"))
        h = bn(_tf_same_conv(h, sd[f"{p}._project_conv.weight"]), f"{p}._bn2")
        t = h + t if stride == 1 and h.shape == t.shape else h
    t = F.relu6(bn(_tf_same_conv(t, sd["_conv_head.weight"]), "_bn1"))
    return F.linear(t.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_every_imagenet_key_maps_onto_the_backbone(imagenet_state: dict) -> None:
    net = EfficientNetLite0()
    mapped = {lite0_key(k) for k in imagenet_state}
    assert None not in mapped
    backbone = {k for k in net.state_dict() if k.startswith("features.")}
    assert mapped - {"imagenet_fc.weight", "imagenet_fc.bias"} == backbone
    assert len(imagenet_state) == 296


def test_matches_independent_reference_forward(imagenet_state: dict, imagenet_net: EfficientNetLite0) -> None:
    x = torch.rand(2, 3, 97, 74, generator=torch.Generator().manual_seed(0))  # odd and even sizes: both paddings
    with torch.no_grad():
        ours, ref = imagenet_net(x), _reference_forward(imagenet_state, x)
    assert ours.shape == (2, 1000)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_pretrained_recognises_a_photograph(imagenet_net: EfficientNetLite0) -> None:
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    with Image.open(path) as img:
        w, h = img.size
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)
        rgb = np.asarray(img.convert("RGB").crop(box).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float32)
    with torch.no_grad():
        probs = imagenet_net(torch.from_numpy(rgb / 255).permute(2, 0, 1)[None]).softmax(1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.3


def test_bn_statistics_are_loaded(imagenet_net: EfficientNetLite0) -> None:
    bns = [m for m in imagenet_net.features.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 1 + 16 * 3 - 1 + 1  # stem, 3 per block (block 0 has no expand), head conv
    for bn in bns:
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))


@pytest.mark.parametrize("in_channels,out_channels", [(1, 1), (3, 4)])
def test_output_shapes(in_channels: int, out_channels: int) -> None:
    net = EfficientNetLite0(in_channels=in_channels, out_channels=out_channels).eval()
    assert net(torch.rand(2, in_channels, 128, 128)).shape == (2, out_channels)
    assert net.embed(torch.rand(1, in_channels, 96, 96)).shape == (1, 1280)
    with pytest.raises(ValueError, match="input channel"):
        net(torch.rand(1, 2, 64, 64))


def test_paper_head_shape() -> None:
    linears = [m for m in EfficientNetLite0().classifier if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1280, 256), (256, 128), (128, 1)]


def test_frozen_mode_trains_only_the_head() -> None:
    net = EfficientNetLite0(pretrained=True, freeze_backbone=True).train()
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    assert not net.features.training and net.classifier.training  # backbone BN keeps ImageNet statistics
    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("features.")}
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    loss = net(torch.rand(4, 1, 64, 64)).sum()
    loss.backward()
    optimiser.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items() if k in before)


def test_finetune_mode_trains_everything() -> None:
    net = EfficientNetLite0(pretrained=True).train()
    assert all(p.requires_grad for p in net.parameters())
    assert net.features.training


def test_paper_cnn_frozen_features_train_only_the_dense_layer() -> None:
    """PaperCNN(freeze_features=True), for the 4-class-pretrained paper CNN: an Adam step over all parameters (as
    train.json builds it) moves the Dense layer only."""
    net = PaperCNN(freeze_features=True)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == ["classifier.weight", "classifier.bias"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    net(torch.rand(4, 1, 128, 128)).sum().backward()
    optimiser.step()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("features."))
    assert not torch.equal(before["classifier.weight"], after["classifier.weight"])
    assert all(p.requires_grad for p in PaperCNN().parameters())


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_unexpected_key_fails_naming_it(imagenet_state: dict, tmp_path) -> None:
    path = _save({**imagenet_state, "_blocks.16._depthwise_conv.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(MedpipeError, match=r"unexpected keys \['_blocks.16._depthwise_conv.weight'\]"):
        load_lite0_imagenet(EfficientNetLite0(), path)


def test_missing_key_fails_naming_it(imagenet_state: dict, tmp_path) -> None:
    state = {k: v for k, v in imagenet_state.items() if k != "_blocks.7._bn1.running_var"}
    with pytest.raises(MedpipeError, match=r"missing keys \['features.blocks.7.depthwise.bn.running_var'\]"):
        load_lite0_imagenet(EfficientNetLite0(), _save(state, tmp_path / "missing.pth"))


def test_wrong_shape_fails(imagenet_state: dict, tmp_path) -> None:
    state = {**imagenet_state, "_conv_head.weight": torch.zeros(1280, 320, 3, 3)}
    with pytest.raises(MedpipeError, match=r"features.top.conv.weight \(1280, 320, 3, 3\)"):
        load_lite0_imagenet(EfficientNetLite0(), _save(state, tmp_path / "shape.pth"))
