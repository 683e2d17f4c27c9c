"""CT volumes to the model's input slices: the checks a volume must pass (axial, in HU) and the intensity pipeline
the COVID CT training slices went through (HU min-max per slice, or an HU window → [0, 1] → 256² → 8-bit → CLAHE →
min-max). Volumetric inference (medpipe.inference.ct_volume) and infection-free training slices
(medpipe.transforms.infection_free) both use it, so training and inference see the same intensities. A model trained
on HU volumes (medpipe.transforms.volume_slices) reads nnU-Net's CT normalisation instead (`hu_model_slices`), with
figures fitted on its training data and stored beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.io import ct
from medpipe.io.dicom import Volume
from medpipe.transforms.seg import clahe

# the slice axis may lean this far from the patient's head-foot axis (gantry tilt) and still count as axial
MAX_AXIAL_TILT_DEG = 30.0
# the lowest HU of a chest CT is air (about -1000); a volume whose minimum is above this is not in HU
MAX_MIN_HU = -500.0
# a chest CT holds a body: soft tissue and bone (above MAX_MIN_HU) fill a third or more of its voxels; a volume with
# less than this fraction (a blank, all-air scan) has nothing a model can read, and any lung found in it is invented
MIN_BODY_FRACTION = 0.01


def check_axial_ct(volume: Volume, name: str, hounsfield: bool = True) -> None:
    """Refuse volumes a model trained on axial HU slices cannot read: non-axial stacks, non-HU intensities, no body
    (`hounsfield` False: a model trained on another channel, medpipe.transforms.volume_slices; only the geometry)."""
    directions = np.asarray(volume.affine)[:3, :3] / np.linalg.norm(np.asarray(volume.affine)[:3, :3], axis=0)
    closest = int(np.argmax(np.abs(directions[2])))  # which voxel axis runs closest to superior
    # the planes count, not only the stacking axis: a gantry tilt stacks tilted planes straight head-foot (a
    # sheared affine); the header's GantryDetectorTilt (in the DICOM meta / ingest sidecar) counts too
    tilt = max(ct.slice_tilt_deg(volume.affine), abs(float(volume.meta.get("gantry_detector_tilt_deg") or 0.0)))
    if closest != 2 or tilt > MAX_AXIAL_TILT_DEG:
        raise MedpipeError(
            f"{name}: not an axial volume (its slices lean {tilt:.0f}° from axial, limit {MAX_AXIAL_TILT_DEG:g}° "
            f"of gantry tilt; voxel axis {closest} runs closest to head-foot, axial needs axis 2); "
            "this model segments axial CT slices: reformat the series to axial first"
        )
    if volume.array.ndim != 3 or min(volume.array.shape) < 1:
        raise MedpipeError(f"{name}: expected a 3-D volume, got shape {volume.array.shape}")
    if not hounsfield:
        return
    low = float(np.min(volume.array))
    if low > MAX_MIN_HU:
        raise MedpipeError(f"{name}: lowest value {low:g} > {MAX_MIN_HU:g}; not CT in Hounsfield units (air ≈ -1000)")
    body = float(np.count_nonzero(volume.array > MAX_MIN_HU)) / volume.array.size
    if body < MIN_BODY_FRACTION:
        raise MedpipeError(
            f"{name}: no body in the volume ({100 * body:.2f}% of voxels above {MAX_MIN_HU:g} HU, fewer than "
            f"{100 * MIN_BODY_FRACTION:g}%): nothing the model can read, so no measurements"
        )


# HU -> [0, 1] without a window: min-max over each slice or over the volume, as the development PNGs were made
# (covid_ct_seg README: "min-max normalised and CLAHE-enhanced"); values below air (the -2048 / -3024 padding
# outside the field of view) count as air, so padding does not set the minimum
MINMAX_MODES = ("minmax_slice", "minmax_volume")
AIR_HU = -1024.0


def hu_to_unit_slices(volume: Volume, window: str | tuple[float, float], slice_size: int) -> np.ndarray:
    """(N, slice_size, slice_size) axial display slices in [0, 1]: an HU window, or a min-max mode."""
    if not (isinstance(window, str) and window in MINMAX_MODES):
        return ct.display_slices(ct.window(volume.array, window), volume.affine, size=slice_size)
    hu = np.maximum(np.asarray(volume.array, dtype=np.float32), np.float32(AIR_HU))
    if window == "minmax_volume":
        low, high = float(hu.min()), float(hu.max())
        return ct.display_slices((hu - low) / max(high - low, 1e-6), volume.affine, size=slice_size)
    planes = ct.display_slices(hu, volume.affine, size=slice_size)
    low, high = planes.min(axis=(1, 2), keepdims=True), planes.max(axis=(1, 2), keepdims=True)
    return ((planes - low) / np.maximum(high - low, 1e-6)).astype(np.float32)


def ct_to_model_slices(
    volume: Volume, window: str | tuple[float, float] = "lung", slice_size: int = 256, clip_limit: float = 7.0
) -> np.ndarray:
    """(N, slice_size, slice_size) float32 slices in [0, 1], intensity-matched to the CLAHE PNG training slices."""
    planes = hu_to_unit_slices(volume, window, slice_size)
    enhanced = clahe(np.clip(np.rint(planes * 255.0), 0, 255).astype(np.uint8), clip_limit=clip_limit)
    out = enhanced.astype(np.float32)
    # the training loader min-max scales each PNG (medpipe.imageio); do the same so 0/255 map identically
    low, high = out.min(axis=(1, 2), keepdims=True), out.max(axis=(1, 2), keepdims=True)
    return np.where(high > low, (out - low) / np.maximum(high - low, 1e-6), 0.0).astype(np.float32)


# ------------------------------------------------------------------------------------------ HU volumes, nnU-Net's CT
# A model trained on HU volumes (medpipe.data.layouts) sees nnU-Net's CT normalisation (CTNormalization): HU clipped
# to the 0.5 / 99.5 percentiles of the training cases' foreground voxels, then z-scored with their mean and standard
# deviation. The figures are fitted once on the training data and stored beside the model, so evaluation and
# volumetric inference apply exactly the same numbers.

HU_CT = "hu_ct"  # the `window` of a model trained on HU volumes: the stored figures, no CLAHE
NORMALISATION_SCHEME = "nnunet_ct"
FOREGROUND_SAMPLES = 10000  # nnU-Net samples this many foreground voxels per case, with replacement, seed 1234
FOREGROUND_SEED = 1234
PERCENTILES = (0.5, 99.5)
# nnU-Net picks the normalisation by the dataset's channel name (casefolded): "CT" the one above, "noNorm" none,
# "rescale_to_0_1" min-max per volume, any other name a z-score per volume (its ZScoreNormalization, no mask). The
# per-volume schemes store no figures, only their name; a model trained so reads no HU, so it is not run on clinical
# series (medpipe.inference.ct_volume refuses), only evaluated on volumes of its own channel.
PER_VOLUME_SCHEMES = {"nonorm": "nnunet_nonorm", "rescale_to_0_1": "nnunet_rescale_to_0_1"}
ZSCORE_SCHEME = "nnunet_zscore"
SCHEMES = (NORMALISATION_SCHEME, ZSCORE_SCHEME, *PER_VOLUME_SCHEMES.values())


def channel_scheme(channel_name: str) -> str:
    """The normalisation nnU-Net gives a channel of this name (`CT`: HU)."""
    key = str(channel_name).casefold()
    if key == "ct":
        return NORMALISATION_SCHEME
    return PER_VOLUME_SCHEMES.get(key, ZSCORE_SCHEME)


def is_hounsfield(figures: Any) -> bool:
    """Whether stored figures (None: a model trained on the PNG slices, which maps HU itself) read HU volumes."""
    return figures is None or figures.get("scheme") == NORMALISATION_SCHEME


def per_volume_figures(scheme: str, channel_name: str, cases: int) -> dict[str, Any]:
    """What is stored for a per-volume scheme: its name, the channel it was chosen for, how many training cases."""
    return {"scheme": scheme, "channel": str(channel_name), "cases": int(cases),
            "fitted_on": "nothing: each volume is normalised with its own figures (nnU-Net's scheme for this channel)"}


def foreground_samples(hu: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """nnU-Net's sample of one case's foreground intensities (10,000 drawn with replacement, RandomState(1234))."""
    values = np.asarray(hu)[np.asarray(foreground, dtype=bool)]
    if not len(values):
        return np.zeros(0, dtype=np.float64)
    return np.random.RandomState(FOREGROUND_SEED).choice(values, FOREGROUND_SAMPLES, replace=True).astype(np.float64)


def fit_ct_normalisation(samples: list[np.ndarray], cases: int) -> dict[str, Any]:
    """The figures of nnU-Net's CT normalisation from the training cases' foreground samples; one line when the
    training cases hold no foreground (nothing to fit them on)."""
    values = np.concatenate(samples) if samples else np.zeros(0)
    if not len(values):
        raise MedpipeError("HU normalisation: the training cases hold no labelled (foreground) voxel to fit it on")
    low, high = (float(v) for v in np.percentile(values, PERCENTILES))
    return {
        "scheme": NORMALISATION_SCHEME, "clip_low": low, "clip_high": high, "mean": float(values.mean()),
        "std": float(values.std()), "percentiles": list(PERCENTILES), "cases": int(cases),
        "samples_per_case": FOREGROUND_SAMPLES, "seed": FOREGROUND_SEED,
        "fitted_on": "foreground (labelled) voxels of the training cases, in HU",
    }  # fmt: skip


def check_normalisation(figures: Any, where: str) -> dict[str, Any]:
    """The stored figures, or one line saying what is wrong with them (`where` names the file)."""
    if not isinstance(figures, dict) or figures.get("scheme") not in SCHEMES:
        raise MedpipeError(f"{where}: not volume normalisation figures (scheme one of {', '.join(SCHEMES)} expected)")
    if figures["scheme"] != NORMALISATION_SCHEME:
        return dict(figures)
    try:
        low, high, mean, std = (float(figures[k]) for k in ("clip_low", "clip_high", "mean", "std"))
    except (KeyError, TypeError, ValueError) as exc:
        raise MedpipeError(f"{where}: clip_low, clip_high, mean and std must be numbers ({exc})") from None
    if not all(np.isfinite([low, high, mean, std])) or low > high or std < 0:
        raise MedpipeError(f"{where}: clip [{low:g}, {high:g}], std {std:g}: not usable figures")
    return dict(figures)


def read_normalisation(path: str | Path) -> dict[str, Any] | None:
    """The figures stored beside a model (`model.normalisation.json`), checked; None when there is no such file (a
    model trained on the PNG slices)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MedpipeError(f"{path}: unreadable HU normalisation figures ({exc})") from None
    return check_normalisation(figures, str(path))


def normalise_hu(hu: np.ndarray, figures: dict[str, Any]) -> np.ndarray:
    """HU clipped to [clip_low, clip_high], then (x - mean) / std, in float32 (nnU-Net's CTNormalization)."""
    out = np.clip(np.asarray(hu, dtype=np.float32), np.float32(figures["clip_low"]), np.float32(figures["clip_high"]))
    out -= np.float32(figures["mean"])
    out /= np.float32(max(float(figures["std"]), 1e-8))
    return out


def normalise_volume(array: np.ndarray, figures: dict[str, Any]) -> np.ndarray:
    """A volume normalised by its stored scheme: HU with the fitted figures, or a per-volume scheme (float32)."""
    scheme = figures["scheme"]
    if scheme == NORMALISATION_SCHEME:
        return normalise_hu(array, figures)
    out = np.asarray(array, dtype=np.float32).copy()
    if scheme == ZSCORE_SCHEME:
        out -= out.mean()
        out /= max(float(out.std()), 1e-8)
    elif scheme == PER_VOLUME_SCHEMES["rescale_to_0_1"]:
        low, high = float(out.min()), float(out.max())
        out = (out - low) / max(high - low, 1e-8)
    return out


def hu_model_slices(volume: Volume, figures: dict[str, Any], size: int) -> np.ndarray:
    """(N, size, size) float32 axial display slices of a volume, normalised with `figures` (HU: nnU-Net's CT scheme),
    resized in-plane (bilinear, antialiased when shrinking): what a model trained on volumes reads, at training and
    inference."""
    return ct.display_slices(normalise_volume(volume.array, figures), volume.affine, size=size)
