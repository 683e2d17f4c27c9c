"""Does 0.8 mean 80 %? Calibration figures, and temperature scaling fitted on a CV run's out-of-fold predictions.

The figures (ECE, Brier score, reliability bins) live in medpipe.evaluation.metrics, beside the other metrics.json
figures; this module fits and applies the temperature.

Temperature scaling divides a network's logits by one T > 0 before its sigmoid/softmax. From the probabilities in
predictions.csv the logits are log p (softmax is shift-invariant; for two classes softmax(log p / T) is exactly
sigmoid(logit(p1) / T), so a sigmoid bundle and a two-logit softmax bundle are the same case). T is fitted by
minimising the negative log-likelihood of the out-of-fold labels. Argmax is unchanged by any T > 0, so accuracy,
sensitivity and the confusion matrix stay as they were; AUC too, for two classes. At inference the bundle wraps its
inferer in TemperatureScaledInferer (`calibrated_inferer(inferer, calibration_file)`); TTA and ensemble inferers
hand back logits of the averaged probability, so T applies on top of them exactly as it was fitted.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.evaluation.metrics import (
    brier_score,
    class_probabilities,
    expected_calibration_error,
    reliability_bins,
)
from medpipe.evaluation.uncertainty import FLAG_FRACTION, fit_threshold, flag_accuracy, normalised_entropy

T_BOUNDS = (0.05, 20.0)  # a fitted T outside this means the predictions carry no usable confidence
_EPS = 1e-7


def log_probabilities(probs: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Logits recovered from probabilities: log p, rows renormalised and clipped so 0 and CSV rounding stay finite."""
    p = np.clip(class_probabilities(probs), _EPS, 1.0)
    return np.log(p / p.sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def apply_temperature(probs: Sequence[Sequence[float]] | np.ndarray, temperature: float) -> np.ndarray:
    """(N, C) probabilities a network would give with its logits divided by `temperature`."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(log_probabilities(probs) / temperature)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature)."""
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """The T in T_BOUNDS minimising NLL (bounded 1-D search over log T; NLL is smooth and unimodal in it)."""
    from scipy.optimize import minimize_scalar

    labels_arr = np.asarray(labels, dtype=int)
    logits = np.asarray(logits, dtype=float)
    if len(labels_arr) == 0 or logits.shape != (len(labels_arr), logits.shape[1]):
        raise ValueError(f"logits shape {logits.shape} does not match {len(labels_arr)} labels")
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    result = minimize_scalar(lambda log_t: nll(logits, labels_arr, float(np.exp(log_t))), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-5})  # fmt: skip
    return float(np.exp(result.x))


# ---- out-of-fold predictions of a CV run -> calibration.json -------------------------------------------------------

def read_out_of_fold(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray, list[str], list[Path], np.ndarray]:
    """(labels, probabilities, class names, files, index of each case's file) from a CV run's
    `fold*/predictions.csv` (each case scored once, by the model that did not train on it)."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("fold*/predictions.csv"))
    if not files:
        raise MedpipeError(f"'{run_dir}' holds no fold*/predictions.csv: give the folder `medpipe cv --out` wrote")
    rows: list[dict[str, str]] = []
    file_of: list[int] = []
    for k, path in enumerate(files):
        with path.open(newline="", encoding="utf-8") as fh:
            rows += list(csv.DictReader(fh))
        file_of += [k] * (len(rows) - len(file_of))
    if not rows or "label" not in rows[0]:
        raise MedpipeError(f"'{files[0]}' has no rows or no label column: calibration needs labelled predictions")
    class_names = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]
    try:
        labels = np.array([class_names.index(r["label"]) for r in rows])
        probs = np.array([[float(r[f"prob_{c}"]) for c in class_names] for r in rows])
    except (ValueError, KeyError) as exc:
        raise MedpipeError(f"predictions under '{run_dir}' disagree on classes or hold a bad number: {exc}") from exc
    return labels, probs, class_names, files, np.array(file_of)


def cross_fitted(labels: np.ndarray, probs: np.ndarray, fold_of: np.ndarray) -> np.ndarray:
    """Probabilities of each fold calibrated with T fitted on the other folds only: an honest 'after' figure,
    since a T fitted on all cases has seen the cases it is judged on. Unchanged with a single fold."""
    out = probs.copy()
    for fold in np.unique(fold_of):
        rest = fold_of != fold
        if rest.any():
            out[~rest] = apply_temperature(probs[~rest], fit_temperature(log_probabilities(probs[rest]), labels[rest]))
    return out


def _file_record(path: Path) -> dict[str, str]:
    from medpipe.files import sha256_file

    return {"path": str(path.resolve()), "sha256": sha256_file(path)}


RUN_INFO_KEYS = ("bundle", "network", "task", "image_size", "tta", "ensemble_ckpts", "split_mode", "num_folds")


def _run_info(files: list[Path]) -> dict[str, Any]:
    """How the run scored (network, TTA, ensemble…) from its first fold's metrics.json: T holds for that setting."""
    metrics_file = files[0].parent / "metrics.json"
    try:
        info = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return {k: info[k] for k in RUN_INFO_KEYS if k in info}


def calibrate_run(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Any]:
    """Fit T on the run's out-of-fold predictions; write calibration.json (default `<run_dir>/calibration.json`).

    Also fits the uncertainty threshold (the calibrated out-of-fold quantile that flags FLAG_FRACTION of cases)
    and records accuracy of flagged vs unflagged cases, so one file holds what the bundle applies at inference."""
    from medpipe.files import atomic_write_text

    run_dir = Path(run_dir)
    labels, probs, class_names, files, fold_of = read_out_of_fold(run_dir)
    temperature = fit_temperature(log_probabilities(probs), labels)
    calibrated = apply_temperature(probs, temperature)
    held_out = cross_fitted(labels, probs, fold_of)
    threshold = fit_threshold(normalised_entropy(calibrated), FLAG_FRACTION)
    splits = run_dir / "splits.json"
    result = {
        "temperature": round(temperature, 6),
        "activation": "sigmoid" if len(class_names) == 2 else "softmax",
        "logits": "divide the network's logits by temperature before the activation (two classes: the same for "
                  "one sigmoid logit and two softmax logits)",
        "class_names": class_names,
        "n": len(labels),
        "ece_before": round(expected_calibration_error(labels, probs), 6),
        "ece_after": round(expected_calibration_error(labels, calibrated), 6),
        "ece_after_cross_fitted": round(expected_calibration_error(labels, held_out), 6),
        "brier_before": round(brier_score(labels, probs), 6),
        "brier_after": round(brier_score(labels, calibrated), 6),
        "brier_after_cross_fitted": round(brier_score(labels, held_out), 6),
        "nll_before": round(nll(log_probabilities(probs), labels, 1.0), 6),
        "nll_after": round(nll(log_probabilities(probs), labels, temperature), 6),
        "reliability_before": reliability_bins(labels, probs),
        "reliability_after": reliability_bins(labels, calibrated),
        "uncertainty_threshold": round(threshold, 6),
        "uncertainty_flagging": {"fraction_target": FLAG_FRACTION, **flag_accuracy(labels, calibrated, threshold)},
        "fitted_on": {
            "run_dir": str(run_dir.resolve()),
            "scored_with": _run_info(files),
            "splits": _file_record(splits) if splits.is_file() else None,
            "predictions": [_file_record(f) for f in files],
        },
    }
    out_path = Path(out) if out else run_dir / "calibration.json"
    atomic_write_text(out_path, json.dumps(result, indent=2))
    result["written_to"] = str(out_path)
    return result


def format_calibration(result: dict[str, Any]) -> str:
    """Before/after lines for the terminal."""
    flags = result["uncertainty_flagging"]
    return "\n".join([
        f"temperature {result['temperature']:.4f} fitted on {result['n']} out-of-fold cases "
        f"({result['fitted_on']['run_dir']})",
        f"ECE   {result['ece_before']:.4f} -> {result['ece_after']:.4f} "
        f"(T fitted on the other folds: {result['ece_after_cross_fitted']:.4f})",
        f"Brier {result['brier_before']:.4f} -> {result['brier_after']:.4f} "
        f"(T fitted on the other folds: {result['brier_after_cross_fitted']:.4f})",
        f"NLL   {result['nll_before']:.4f} -> {result['nll_after']:.4f}",
        f"uncertainty > {flags['threshold']:.4f} flags {flags['n_flagged']} of {flags['n']} cases: accuracy "
        f"flagged {flags['accuracy_flagged']}, unflagged {flags['accuracy_unflagged']}",
        f"wrote {result['written_to']}",
    ])


# ---- at inference ---------------------------------------------------------------------------------------------------

def load_calibration(path: str | Path | None) -> dict[str, Any] | None:
    """calibration.json as a dict; None when no file is configured (null, '', 'none')."""
    if path is None or str(path).strip().lower() in ("", "none", "null"):
        return None
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        temperature = float(data["temperature"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise MedpipeError(f"cannot read a temperature from calibration file '{path}' ({exc}): run "
                           "`medpipe calibrate RUN_DIR` or set --calibration_file null") from exc  # fmt: skip
    if not T_BOUNDS[0] <= temperature <= T_BOUNDS[1]:
        raise MedpipeError(f"calibration file '{path}' holds temperature {temperature}, outside {T_BOUNDS}")
    return data


def load_temperature(path: str | Path | None) -> float:
    """The temperature of a calibration file; 1.0 (no scaling) when none is configured."""
    data = load_calibration(path)
    return 1.0 if data is None else float(data["temperature"])


class TemperatureScaledInferer:
    """Run `inferer`, divide its logits by `temperature`; the bundle's sigmoid/softmax postprocessing then gives
    calibrated probabilities (the predicted class never changes)."""

    def __init__(self, inferer: Callable[..., Any], temperature: float) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.inferer, self.temperature = inferer, float(temperature)

    def __call__(self, inputs: Any, network: Any, *args: Any, **kwargs: Any) -> Any:
        return self.inferer(inputs, network, *args, **kwargs) / self.temperature

    @property
    def activation(self) -> str | None:
        return getattr(self.inferer, "activation", None)

    @property
    def last_member_logits(self) -> Any:
        """The wrapped ensemble's / mirror's member logits, scaled like the output (so spreads are calibrated)."""
        members = getattr(self.inferer, "last_member_logits", None)
        return None if members is None else members / self.temperature


def calibrated_inferer(
    inferer: Callable[..., Any], calibration_file: str | Path | None, scoring: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """`inferer` itself without a calibration file (or with T = 1), else a TemperatureScaledInferer around it.

    scoring: how this job scores (e.g. {'network': ..., 'tta': ...}); a value that differs from the one the
    temperature was fitted with is logged as a warning, since T holds for the setting it was fitted on."""
    data = load_calibration(calibration_file)
    if data is None or float(data["temperature"]) == 1.0:
        return inferer
    fitted = (data.get("fitted_on") or {}).get("scored_with") or {}
    for key, value in (scoring or {}).items():
        if key in fitted and fitted[key] != value:
            logging.getLogger(__name__).warning(
                f"calibration file '{calibration_file}' was fitted with {key}={fitted[key]!r}, this job scores with "
                f"{key}={value!r}: its probabilities may be miscalibrated; fit one on a matching CV run"
            )
    return TemperatureScaledInferer(inferer, float(data["temperature"]))


def _averages_members(inferer: Any) -> bool:
    """Whether this scoring inferer averages members (an ensemble or mirror keeps `last_member_logits`)."""
    if isinstance(inferer, TemperatureScaledInferer):
        return _averages_members(inferer.inferer)
    return "last_member_logits" in getattr(inferer, "__dict__", {})


def report_columns(
    calibration_file: str | Path | None = None, input_guard: Any = None, inferer: Any = None
) -> list[Any]:
    """The per-case predictions.csv columns a ClassificationReport adds: uncertainty (threshold from the
    calibration file when it has one), `member_spread` when `inferer` averages members (fold ensemble, mirroring
    TTA), and, when given, the wrong-input guard's verdict."""
    from medpipe.evaluation.uncertainty import MemberSpreadColumn, UncertaintyColumns

    data = load_calibration(calibration_file)
    columns: list[Any] = [UncertaintyColumns(data.get("uncertainty_threshold") if data else None)]
    if inferer is not None and _averages_members(inferer):
        columns.append(MemberSpreadColumn(inferer))
    return columns + ([input_guard] if input_guard is not None else [])
