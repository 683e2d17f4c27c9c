"""A segmentation loss that also learns from slices known only to hold no infection (partial labels).

Slices from infection-free scans have no lung or background voxel labels; their label map is `not_infection_label`
(NO_INFECTION of medpipe.transforms.infection_free, wired by the bundle config) everywhere but where augmentation
padded it with background. For them the loss is the marginal cross-entropy of "not infection": -log(1 - p_infection)
= -log(sum of the other classes' probabilities) per pixel (the marginal loss of partially-labelled segmentation,
Shi et al., MedIA 2021), so the model is pushed to put no infection there without being told where the lung is.
Fully labelled slices keep the base loss (DiceCE), unchanged; a batch's loss is the two averaged by slice counts.
"""

from __future__ import annotations

import torch


class NoInfectionLoss(torch.nn.Module):
    """`base(pred, label)` on fully labelled slices; mean -log(1 - p_infection) on infection-free ones."""

    def __init__(self, base: torch.nn.Module, not_infection_label: int, infection: int = 2) -> None:
        super().__init__()
        self.base, self.not_infection_label, self.infection = base, int(not_infection_label), int(infection)

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        partial = (label == self.not_infection_label).flatten(1).any(dim=1)
        if not bool(partial.any()):
            return self.base(pred, label)
        log_probs = torch.log_softmax(pred.float(), dim=1)[partial]
        others = [c for c in range(pred.shape[1]) if c != self.infection]
        not_infection = -torch.logsumexp(log_probs[:, others], dim=1).mean()
        n_partial, n = int(partial.sum()), len(partial)
        if n_partial == n:
            return not_infection
        full = ~partial
        return (self.base(pred[full], label[full]) * (n - n_partial) + not_infection * n_partial) / n
