"""Model ensembles at scoring time: the `ensemble_ckpts` config key.

Several checkpoints of the same network (nnU-Net ensembles its five fold models; here also models trained with other
seeds) each score the batch and their class probabilities are averaged, handed back as logits of that average
(`mean_probability_logits`) so a bundle's postprocessing and metrics run unchanged. The bundle's own
checkpoint (`ckpt_path`, loaded into `network` by its CheckpointLoader) is always the first member."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.inferers import Inferer
from torch import nn

from medpipe.errors import MedpipeError
from medpipe.inferers.mirror import check_activation, mean_probability_logits
from medpipe.nets.pretrained import fitting_state_dict

HINT = "set --ensemble_ckpts to model.pt files trained with this network"




def checkpoint_list(value: str | Sequence[str] | None) -> list[str]:
    """`ensemble_ckpts` as given: a list, a comma-separated string (fire's `--ensemble_ckpts a.pt,b.pt`), or empty."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return [p.strip() for p in items if p.strip() and p.strip().lower() not in ("none", "null")]


def load_member(network: nn.Module, path: str | Path) -> nn.Module:
    """A copy of `network` holding checkpoint `path`'s weights, in eval mode; every tensor must fit."""
    module = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    member = copy.deepcopy(module)
    hint = f"{HINT}; every member must be trained with the same --network"
    member.load_state_dict(fitting_state_dict(member, path, "ensemble checkpoint", hint), strict=True)
    return member.eval()


class ModelEnsembleInferer(Inferer):
    """Run `inferer` with the evaluator's network and with every member; average the class probabilities."""

    def __init__(
        self, inferer: Inferer | Callable[..., torch.Tensor], members: Sequence[nn.Module], activation: str = "sigmoid"
    ) -> None:
        super().__init__()
        check_activation(activation)
        self.inferer, self.members, self.activation = inferer, list(members), activation
        self.last_member_logits: torch.Tensor | None = None  # the last batch's members, read by report columns

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        outputs = [self.inferer(inputs, network, *args, **kwargs)]
        for member in self.members:
            member.to(inputs.device).eval()  # the evaluator moves and switches only its own network
            outputs.append(self.inferer(inputs, member, *args, **kwargs))
        # per-case member logits (M, B, C) for the member_spread column; segmentation maps are not kept
        self.last_member_logits = torch.stack([o.detach().float() for o in outputs]) if outputs[0].ndim == 2 else None
        return mean_probability_logits(outputs, self.activation)


def ensemble_inferer(
    inferer: Inferer | Callable[..., torch.Tensor],
    network: nn.Module,
    ckpts: str | Sequence[str] | None,
    activation: str = "sigmoid",
    own_ckpt: str | Path | None = None,
) -> Inferer | Callable[..., torch.Tensor]:
    """`inferer` itself when `ckpts` is empty, else a ModelEnsembleInferer over copies of `network` loaded from them.

    own_ckpt: the checkpoint `network` itself is loaded from; listing it (or any file twice) would weight it double.
    """
    paths = checkpoint_list(ckpts)
    if not paths:
        return inferer
    seen = [Path(p).resolve() for p in ([own_ckpt] if own_ckpt else []) + paths]
    twice = sorted({str(p) for p in seen if seen.count(p) > 1})
    if twice:
        raise MedpipeError(
            f"ensemble_ckpts names {twice[0]} twice (or it is ckpt_path, already a member): each model counts once"
        )
    return ModelEnsembleInferer(inferer, [load_member(network, p) for p in paths], activation)
