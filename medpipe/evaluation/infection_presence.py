"""Is there infection on this slice, in this scan? The slice gate's threshold and a calibrated per-slice probability,
both from one unitless figure per axial slice: f = predicted infection pixels / predicted lung pixels
(medpipe.transforms.seg_postprocessing.slice_infection_fractions).

- `choose_gate`: the smallest threshold that leaves infection on at most `max_kept` (5 %) of the slices of
  infection-free scans, the rule of the results log §10. Used leave-one-source-out: the threshold a source is scored
  with never saw that source.
- `fit_presence` / `slice_probabilities`: logistic regression of the slice label on log10(f + 1e-4) (Platt scaling on
  one feature; sklearn does the fit), stored as [intercept, slope] in the bundle's `infection_probability`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

EPS = 1e-4  # f = 0 (no infection on the slice) maps to log10(1e-4) = -4, below any slice with a pixel of infection
MAX_KEPT = 0.05  # at most this share of infection-free slices may keep infection (the goal allows 10 %)


def presence_feature(fractions: Sequence[float] | np.ndarray) -> np.ndarray:
    return np.log10(np.asarray(fractions, dtype=np.float64) + EPS)


def check_coefficients(value: Any) -> tuple[float, float] | None:
    """`infection_probability` from a config or the command line: [intercept, slope], or None / "" / "none" (off)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError as exc:
            raise MedpipeError(f"infection_probability {value!r}: give [intercept, slope], e.g. [2.1, 1.3]") from exc
    try:
        intercept, slope = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise MedpipeError(f"infection_probability {value!r}: give two numbers [intercept, slope]") from exc
    if not (np.isfinite(intercept) and np.isfinite(slope)) or slope <= 0:
        raise MedpipeError(f"infection_probability {value!r}: finite numbers with a positive slope (more infection "
                           "on a slice must mean a higher probability)")  # fmt: skip
    return intercept, slope


def slice_probabilities(fractions: Sequence[float] | np.ndarray, coefficients: tuple[float, float]) -> np.ndarray:
    """Calibrated probability that each slice holds infection, from its infection / lung fraction."""
    intercept, slope = coefficients
    return 1.0 / (1.0 + np.exp(-(intercept + slope * presence_feature(fractions))))


def fit_presence(fractions: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> tuple[float, float]:
    """[intercept, slope] of the logistic regression of `labels` (0/1 per slice) on log10(f + 1e-4); unregularised
    (a large C), as Platt scaling is."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=int)
    if set(np.unique(y)) != {0, 1}:
        raise MedpipeError("fit_presence needs slices of both kinds (with and without infection)")
    model = LogisticRegression(C=1e6, max_iter=1000).fit(presence_feature(fractions)[:, None], y)
    return float(model.intercept_[0]), float(model.coef_[0, 0])


def choose_gate(fractions: Sequence[float] | np.ndarray, max_kept: float = MAX_KEPT) -> float:
    """The smallest threshold t (0 or one of the slices' own values) such that at most `max_kept` of these
    infection-free slices keep infection under the gate (f >= t and f > 0)."""
    f = np.asarray(fractions, dtype=np.float64)
    if f.size == 0:
        raise MedpipeError("choose_gate needs the slices of at least one infection-free scan")
    allowed = int(np.floor(max_kept * f.size))
    for t in np.unique(np.concatenate([[0.0], f])):  # ascending: the first that holds is the smallest
        if int(((f >= t) & (f > 0)).sum()) <= allowed:
            return float(t)
    return float(np.nextafter(f.max(), np.inf))  # ties at the top exceed the allowance: just above them


def presence_reliability(probabilities: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray,
                         n_bins: int = 10) -> dict[str, list]:  # fmt: skip
    """Reliability bins of a binary probability: per bin of p, the slices, their mean p and the observed share of
    slices with infection (null where empty)."""
    p, y = np.asarray(probabilities, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    mean_p = np.bincount(idx, weights=p, minlength=n_bins)
    observed = np.bincount(idx, weights=y, minlength=n_bins)
    return {
        "bin_edges": [round(i / n_bins, 3) for i in range(n_bins + 1)],
        "counts": counts.tolist(),
        "mean_probability": [round(float(s / c), 4) if c else None for s, c in zip(mean_p, counts, strict=True)],
        "observed": [round(float(s / c), 4) if c else None for s, c in zip(observed, counts, strict=True)],
    }
