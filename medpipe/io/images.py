"""Read any 2-D medical image (JPEG/PNG/BMP/TIFF, 2-D DICOM, 2-D NIfTI) as one grey float image in [0, 1].

Every bundle loads pictures through here, so training, evaluation and inference see identical intensities:
colour and alpha are dropped, 16-bit PNG and DICOM are windowed (DICOM: modality LUT / rescale, then the VOI LUT
when present) and then min-max scaled, which is also what 8-bit images get. Pictures are shown as a viewer shows
them: turned by their EXIF Orientation; DICOM palette colour through its palette; MONOCHROME1 and Presentation LUT
Shape INVERSE inverted.

Degenerate inputs: an image under 2 pixels along a side, or a DICOM RescaleSlope of 0 (every pixel would map to one
value), is refused — no value computed from it would mean anything; a constant image (blank, e.g. an empty export)
is loaded as zeros with a warning naming the file. Images over PIL's decompression-bomb limit are refused."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.transforms import MapTransform

from medpipe.errors import MedpipeError

PICTURE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
NIFTI_SUFFIXES = {".nii", ".nii.gz"}
IMAGE_SUFFIXES = PICTURE_SUFFIXES | DICOM_SUFFIXES | NIFTI_SUFFIXES
MIN_SIDE = 2  # pixels; a 1-pixel-wide "image" holds no picture

log = logging.getLogger(__name__)


def image_suffix(path: str | Path) -> str:
    """Lower-case suffix, treating '.nii.gz' as one suffix."""
    name = str(path).lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def is_image_file(path: str | Path) -> bool:
    return image_suffix(path) in IMAGE_SUFFIXES


def _min_max(array: np.ndarray, path: str | Path) -> np.ndarray:
    array = array.astype(np.float32)
    if min(array.shape) < MIN_SIDE:
        size = "x".join(str(n) for n in array.shape)
        raise MedpipeError(f"image '{path}' is {size} pixels: too small to be a picture; remove it from the data")
    if not np.isfinite(array).all():
        raise MedpipeError(f"image '{path}' holds NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if high <= low:  # a blank image carries no information but is not an error
        log.warning("image %s is constant (every pixel %g): it carries no information and scores as blank", path, low)
        return np.zeros_like(array)
    return (array - low) / (high - low)


def _read_picture(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as raw:  # PIL refuses sizes over Image.MAX_IMAGE_PIXELS (decompression bombs)
            raw.load()  # forces a full decode so truncated files fail here, not mid-training
            # the EXIF Orientation tag (phones, some scanners) says how the stored pixels must be turned to be seen
            # upright; a viewer applies it, so the model must see the same picture
            img = ImageOps.exif_transpose(raw)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                return np.asarray(img, dtype=np.float32)
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")  # palette, RGBA, LA, CMYK: flatten to RGB first, dropping alpha
            return np.asarray(img.convert("L"), dtype=np.float32)
    except Image.DecompressionBombError as exc:  # its message gives the pixel count and the limit
        raise MedpipeError(
            f"image '{path}' is too large to decode safely ({exc}); a medical picture this size is corrupt or "
            "hostile — downsample it or check its source"
        ) from exc
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise MedpipeError(f"cannot read image '{path}': {exc}") from exc


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise MedpipeError(f"DICOM '{path}' has no pixel data")
        pixels = ds.pixel_array
    except MedpipeError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise MedpipeError(f"cannot read DICOM '{path}': {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MedpipeError(
            f"DICOM '{path}' is a multi-frame image ({frames} frames, shape {pixels.shape}); only single-frame "
            "2-D images are read here: export its frames as single images"
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":  # stored values are indices into the palette: show what a viewer shows
        try:
            pixels = apply_color_lut(pixels, ds)
        except Exception as exc:  # a missing or malformed palette
            raise MedpipeError(f"DICOM '{path}' is PALETTE COLOR but its palette cannot be applied ({exc})") from exc
    colour = ds.get("SamplesPerPixel", 1) > 1 or photometric == "PALETTE COLOR"
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) and colour:
        return pixels[..., :3].astype(np.float32).mean(axis=-1)  # colour: no rescale or window applies
    if pixels.ndim != 2:
        raise MedpipeError(f"DICOM '{path}' is not 2-D (shape {pixels.shape}); ingest volumes with `medpipe ingest`")
    if "RescaleSlope" in ds and ds.RescaleSlope is not None and float(ds.RescaleSlope) == 0:
        raise MedpipeError(f"DICOM '{path}' has RescaleSlope 0: every pixel would map to one value; fix the header")
    pixels = apply_modality_lut(pixels, ds)  # stored values -> HU or OD: the units the VOI window is given in
    pixels = apply_voi_lut(pixels, ds) if "WindowCenter" in ds or "VOILUTSequence" in ds else pixels
    pixels = pixels.astype(np.float32)
    # bright = low values: invert to MONOCHROME2. The Presentation LUT Shape INVERSE asks for the same single
    # inversion (in DX it is the required companion of MONOCHROME1, so the two together still invert once)
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        pixels = pixels.max() - pixels
    return pixels


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        array = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as exc:
        raise MedpipeError(f"cannot read NIfTI '{path}': {exc}") from exc
    array = np.squeeze(array)
    if array.ndim != 2:
        raise MedpipeError(f"NIfTI '{path}' is not a 2-D image (shape {array.shape})")
    return array.T  # NIfTI stores (x, y); rows are y


def load_grey_2d(path: str | Path) -> np.ndarray:
    """Return the image at `path` as a float32 (rows, cols) array scaled to [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"image '{path}' does not exist")
    suffix = image_suffix(path)
    if suffix in PICTURE_SUFFIXES:
        array = _read_picture(path)
    elif suffix in DICOM_SUFFIXES:
        array = _read_dicom(path)
    elif suffix in NIFTI_SUFFIXES:
        array = _read_nifti(path)
    else:
        raise MedpipeError(f"'{path}' is not a supported image (expected one of {sorted(IMAGE_SUFFIXES)})")
    return _min_max(array, path)


class LoadGrey2Dd(MapTransform):
    """MONAI dict transform: replace each path under `keys` by a (1, rows, cols) float tensor in [0, 1]."""

    def __init__(self, keys: str | Sequence[str], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = torch.from_numpy(load_grey_2d(str(out[key]))[None])
        return out
