"""Per-case uncertainty: how sure the model is about one case, and a flag that sends unsure cases to a reader.

`uncertainty` is the predictive entropy of the (calibrated) class probabilities divided by log C, so 0 means all
mass on one class and 1 means uniform, whatever the number of classes. When several members scored a case (fold
ensemble, mirroring TTA) `member_spread` is how far apart they were on the chosen class. A case is flagged
"uncertain — review" when its uncertainty exceeds a threshold: by default the (1 - FLAG_FRACTION) quantile of the
out-of-fold uncertainties, fitted by `medpipe calibrate` and stored in calibration.json; without a calibration
file DEFAULT_THRESHOLD applies (binary: a top probability under about 0.89)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medpipe.evaluation.metrics import class_probabilities

FLAG_TEXT = "uncertain — review"
FLAG_FRACTION = 0.10  # share of out-of-fold cases the fitted threshold flags
DEFAULT_THRESHOLD = 0.5  # normalised entropy; used when no calibration file gives a fitted one
_EPS = 1e-12


def normalised_entropy(probs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """(N,) predictive entropy / log C, in [0, 1]; rows are renormalised so rounding in a CSV cannot push it out."""
    p = np.clip(class_probabilities(probs), 0.0, 1.0)
    p = p / np.maximum(p.sum(axis=1, keepdims=True), _EPS)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.maximum(p, _EPS)), 0.0), axis=1)
    return np.clip(entropy / np.log(p.shape[1]), 0.0, 1.0)


def member_spread(member_probs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N,) range (max - min) over members of the probability of the class their mean chooses, in [0, 1].

    member_probs: (M, N, C) probabilities of M members (fold models, mirror images) for the same N cases."""
    members = np.stack([class_probabilities(m) for m in member_probs])
    chosen = members.mean(axis=0).argmax(axis=1)
    on_chosen = np.take_along_axis(members, chosen[None, :, None], axis=2)[..., 0]
    return np.clip(on_chosen.max(axis=0) - on_chosen.min(axis=0), 0.0, 1.0)


def fit_threshold(uncertainties: Sequence[float] | np.ndarray, fraction: float = FLAG_FRACTION) -> float:
    """The uncertainty above which `fraction` of these (out-of-fold) cases lie."""
    values = np.asarray(uncertainties, dtype=float)
    if not 0 < fraction < 1 or len(values) == 0:
        raise ValueError(f"need cases and 0 < fraction < 1, got {len(values)} cases and fraction {fraction}")
    return float(np.quantile(values, 1 - fraction))


def flag_accuracy(
    labels: Sequence[int] | np.ndarray, probs: Sequence[Sequence[float]] | np.ndarray, threshold: float
) -> dict[str, Any]:
    """Accuracy of flagged (uncertainty > threshold) vs unflagged cases: the flag is informative when they differ."""
    p = class_probabilities(probs)
    correct = p.argmax(axis=1) == np.asarray(labels, dtype=int)
    flagged = normalised_entropy(p) > threshold

    def acc(mask: np.ndarray) -> float | None:
        return round(float(correct[mask].mean()), 4) if mask.any() else None

    return {
        "threshold": round(float(threshold), 6),
        "n": len(correct),
        "n_flagged": int(flagged.sum()),
        "accuracy_flagged": acc(flagged),
        "accuracy_unflagged": acc(~flagged),
        "accuracy_all": acc(np.ones_like(flagged)),
    }


class UncertaintyColumns:
    """predictions.csv columns `uncertainty` (normalised entropy, 4 decimals) and `flag` (FLAG_TEXT or empty).

    A report calls `cells(path, probabilities)` once per case; the probabilities are those the bundle wrote
    (calibrated when the bundle's inferer applies a temperature)."""

    header = ["uncertainty", "flag"]

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)

    def cells(self, path: str, probs: Sequence[float] | np.ndarray) -> list[str]:
        value = float(normalised_entropy(np.asarray(probs, dtype=float)[None, :])[0])
        return [f"{value:.4f}", FLAG_TEXT if value > self.threshold else ""]


class MemberSpreadColumn:
    """predictions.csv column `member_spread`: for each case, the range over the members (fold models, mirror
    images) of the probability of the class their mean chooses.

    `source` is the scoring inferer (ensemble / mirror, possibly temperature-scaled); after each batch the report
    calls `batch_scored(n)` and the column reads the batch's member logits (M, n, C) from it."""

    header = ["member_spread"]

    def __init__(self, source: Any) -> None:
        self.source = source
        self.spreads: list[float | None] = []
        self._next = 0

    def reset(self) -> None:
        """A new epoch: forget the cases collected so far."""
        self.spreads, self._next = [], 0

    def batch_scored(self, n: int) -> None:
        logits = getattr(self.source, "last_member_logits", None)
        if logits is None or len(logits) < 2 or logits.shape[1] != n:
            self.spreads += [None] * n
            return
        import torch  # here, not at import: the CSV-only callers of this module need no torch

        z = logits.detach().double().cpu()
        if z.shape[2] == 1:  # one sigmoid output per case: P(class 1)
            members = torch.sigmoid(z[:, :, 0]).numpy()
        elif getattr(self.source, "activation", "softmax") == "sigmoid":
            members = torch.sigmoid(z).numpy()
        else:
            members = torch.softmax(z, dim=2).numpy()
        self.spreads += [float(v) for v in member_spread(list(members))]

    def cells(self, path: str, probs: Sequence[float] | np.ndarray) -> list[str]:
        index, self._next = self._next, self._next + 1  # cells come in the order the cases were scored
        value = self.spreads[index] if index < len(self.spreads) else None
        return ["" if value is None else f"{value:.4f}"]


def member_columns(
    member_probs: Sequence[np.ndarray] | np.ndarray, threshold: float | None = None
) -> tuple[list[str], list[list[str]]]:
    """(header, cells per case) for predictions.csv of an ensemble whose members' probabilities are known
    (e.g. cv_ensemble): `uncertainty` of the mean probability, `member_spread`, and `flag` (on uncertainty)."""
    members = np.stack([class_probabilities(m) for m in member_probs])
    uncertainty, spread = normalised_entropy(members.mean(axis=0)), member_spread(members)
    limit = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    cells = [[f"{u:.4f}", f"{s:.4f}", FLAG_TEXT if u > limit else ""] for u, s in zip(uncertainty, spread, strict=True)]
    return ["uncertainty", "member_spread", "flag"], cells
