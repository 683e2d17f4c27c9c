"""One grey [0, 1] image from any 2-D input format."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medpipe.errors import MedpipeError
from medpipe.io.images import LoadGrey2Dd, load_grey_2d

RAMP = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (20, 1))  # 20 x 25, min 0, max 240


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA"])
def test_colour_modes_become_the_same_grey(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode}.png"
    Image.fromarray(RAMP).convert(mode).save(path)
    out = load_grey_2d(path)
    assert out.shape == (20, 25) and out.dtype == np.float32
    np.testing.assert_allclose(out, RAMP / 240.0, atol=2 / 255)


def test_16bit_png_is_scaled_like_8bit(tmp_path: Path) -> None:
    path = tmp_path / "x16.png"
    Image.fromarray(RAMP.astype(np.uint16) * 257).save(path)
    np.testing.assert_allclose(load_grey_2d(path), RAMP / 240.0, atol=1e-4)


def test_dicom_2d_and_monochrome1_is_inverted(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    out = load_grey_2d(get_testdata_file("CT_small.dcm"))
    assert out.shape == (ds.Rows, ds.Columns) and out.min() == 0.0 and out.max() == 1.0
    for tag in ("WindowCenter", "WindowWidth"):
        if tag in ds:
            del ds[tag]
    ds.save_as(tmp_path / "mono2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    inverted, plain = load_grey_2d(tmp_path / "mono1.dcm"), load_grey_2d(tmp_path / "mono2.dcm")
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-6)


def test_nifti_2d_rows_are_y(tmp_path: Path) -> None:
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(RAMP.T.astype(np.float32), np.eye(4)), path)
    np.testing.assert_allclose(load_grey_2d(path), RAMP / 240.0, atol=1e-6)


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(MedpipeError, match="does not exist"):
        load_grey_2d(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(MedpipeError, match="bad.png"):
        load_grey_2d(tmp_path / "bad.png")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(MedpipeError, match="not a supported image"):
        load_grey_2d(tmp_path / "a.txt")
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), np.eye(4)), tmp_path / "vol.nii")
    with pytest.raises(MedpipeError, match="not a 2-D image"):
        load_grey_2d(tmp_path / "vol.nii")


def test_dict_transform_adds_channel(tmp_path: Path) -> None:
    Image.fromarray(RAMP).save(tmp_path / "a.png")
    out = LoadGrey2Dd("image")({"image": str(tmp_path / "a.png"), "label": 1})
    assert tuple(out["image"].shape) == (1, 20, 25) and out["label"] == 1
