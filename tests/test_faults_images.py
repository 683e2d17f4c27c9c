"""Faults and degenerate input in 2-D image loading (issue #20): decompression bombs, 1-pixel and constant
images, DICOM RescaleSlope 0, and the DICOM window applied in the units it is given in."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from conftest import real_dataset
from medpipe.errors import MedpipeError
from medpipe.io import dicom
from medpipe.io.images import load_grey_2d


def test_decompression_bomb_is_one_line_with_its_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((120, 100), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 12000 pixels is over twice the limit: PIL refuses
    with pytest.raises(MedpipeError, match=r"huge\.png' is too large to decode safely .*12000 pixels") as err:
        load_grey_2d(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1)])
def test_one_pixel_wide_image_is_refused(tmp_path: Path, shape: tuple[int, int]) -> None:
    path = tmp_path / "dot.png"
    Image.fromarray(np.full(shape, 7, np.uint8)).save(path)
    with pytest.raises(MedpipeError, match=rf"dot\.png' is {shape[0]}x{shape[1]} pixels: too small"):
        load_grey_2d(path)


def test_constant_image_loads_as_zeros_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(path)
    with caplog.at_level(logging.WARNING, logger="medpipe.io.images"):
        out = load_grey_2d(path)
    assert out.shape == (32, 32) and not out.any()
    assert [r.getMessage() for r in caplog.records if "blank.png" in r.getMessage()] == [
        f"image {path} is constant (every pixel 128): it carries no information and scores as blank"
    ]


def test_rescale_slope_zero_is_refused_in_2d_and_3d(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.RescaleSlope = 0
    ds.save_as(tmp_path / "slope0.dcm")
    with pytest.raises(MedpipeError, match=r"slope0\.dcm' has RescaleSlope 0"):
        load_grey_2d(tmp_path / "slope0.dcm")
    (tmp_path / "series").mkdir()
    shutil.move(tmp_path / "slope0.dcm", tmp_path / "series" / "slope0.dcm")
    with pytest.raises(MedpipeError, match=r"slope0\.dcm: RescaleSlope 0"):
        dicom.load_series(tmp_path / "series")


def test_dicom_window_is_applied_to_rescaled_values(tmp_path: Path) -> None:
    """WindowCenter/Width are in rescaled units (HU): a 40/400 soft-tissue window must see HU, not stored values."""
    rider = real_dataset("dicom") / "rider_pilot_chest_ct_0117" / "1-050.dcm"
    ds = pydicom.dcmread(rider)
    assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    for tag in ("VOILUTFunction", "VOILUTSequence"):
        if tag in ds:
            del ds[tag]
    ds.save_as(tmp_path / "soft.dcm")
    hu = ds.pixel_array.astype(np.float32) - 1024
    out = load_grey_2d(tmp_path / "soft.dcm")
    air, tissue = hu < -160, (hu > 0) & (hu < 80)  # below the window, inside it
    assert out[air].max() == 0.0  # stored values of air (~0) would sit mid-window if the window saw them raw
    assert 0.3 < float(np.median(out[tissue])) < 0.7
