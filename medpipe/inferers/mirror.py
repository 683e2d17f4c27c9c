"""Test-time mirroring: score an image and its mirror images, average the class probabilities.

nnU-Net's default at inference, for networks trained with the same flips as augmentation. The average is taken
over probabilities (not logits) and handed back as logits of that average, so a bundle's postprocessing
(sigmoid or softmax) and its metrics run unchanged on top."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

ACTIVATIONS = ("sigmoid", "softmax")




def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got '{activation}'")


def mean_probability_logits(logits: Sequence[torch.Tensor], activation: str) -> torch.Tensor:
    """Logits whose sigmoid/softmax is the mean of the given logits' probabilities (computed in log space).

    sigmoid: logit(mean_i p_i) = logsumexp_i log p_i - logsumexp_i log(1 - p_i), exact for any logit size.
    softmax: log(mean_i softmax_i) (channel dim 1); softmax of that is the mean again because it sums to 1.
    """
    check_activation(activation)
    stacked = torch.stack([z.float() for z in logits])
    if activation == "sigmoid":
        log_p = torch.nn.functional.logsigmoid(stacked)
        log_not_p = torch.nn.functional.logsigmoid(-stacked)
        return torch.logsumexp(log_p, 0) - torch.logsumexp(log_not_p, 0)
    return torch.logsumexp(torch.log_softmax(stacked, dim=2), 0) - math.log(len(logits))


class MirrorAveragingInferer(Inferer):
    """Run `inferer` on the batch and on its mirror along each of `flip_dims`; average the probabilities.

    flip_dims: spatial axes counted from the end (-1 = left-right, the flip BatchAugment trains with).
    spatial_output: True for segmentation (outputs are images: mirrored back before averaging); False for
        classification (one score per image).
    """

    def __init__(
        self,
        inferer: Inferer | Callable[..., torch.Tensor],
        flip_dims: Sequence[int] = (-1,),
        activation: str = "sigmoid",
        spatial_output: bool = False,
    ) -> None:
        super().__init__()
        check_activation(activation)  # at config time, not at the first batch
        if not flip_dims or any(d >= 0 for d in flip_dims):
            raise ValueError(f"flip_dims must be negative spatial axes such as [-1], got {list(flip_dims)}")
        self.inferer = inferer
        self.flip_dims = [int(d) for d in flip_dims]
        self.activation = activation
        self.spatial_output = spatial_output
        self.last_member_logits: torch.Tensor | None = None  # the last batch's members, read by report columns

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if any(inputs.ndim + d < 2 for d in self.flip_dims):
            raise ValueError(f"flip_dims {self.flip_dims} reach past the spatial axes of an input of shape "
                             f"{tuple(inputs.shape)}")  # fmt: skip
        outputs = [self.inferer(inputs, network, *args, **kwargs)]
        for dim in self.flip_dims:
            mirrored = self.inferer(torch.flip(inputs, [dim]), network, *args, **kwargs)
            outputs.append(torch.flip(mirrored, [dim]) if self.spatial_output else mirrored)
        # per-case member logits (M, B, C) for the member_spread column; images' maps would cost too much memory
        self.last_member_logits = None if self.spatial_output else torch.stack([o.detach().float() for o in outputs])
        return mean_probability_logits(outputs, self.activation)
