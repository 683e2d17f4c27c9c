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


# ------------------------------- outside probe: inverse LUT shape, EXIF orientation, palette colour (item 20)


def ct_small_copy(tmp_path: Path, name: str, **attrs: object) -> Path:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name


def test_presentation_lut_shape_inverse_inverts_once(tmp_path: Path) -> None:
    """INVERSE shows the image inverted, as a viewer does; with MONOCHROME1 (its required companion in DX) the two
    ask for the same single inversion."""
    plain = load_grey_2d(ct_small_copy(tmp_path, "plain.dcm"))
    inverse = load_grey_2d(ct_small_copy(tmp_path, "inverse.dcm", PresentationLUTShape="INVERSE"))
    identity = load_grey_2d(ct_small_copy(tmp_path, "identity.dcm", PresentationLUTShape="IDENTITY"))
    mono1 = load_grey_2d(ct_small_copy(tmp_path, "m1.dcm", PhotometricInterpretation="MONOCHROME1",
                                       PresentationLUTShape="INVERSE"))  # fmt: skip
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)
    np.testing.assert_array_equal(identity, plain)
    np.testing.assert_allclose(mono1, 1.0 - plain, atol=1e-6)


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    """Orientation 6: the stored pixels are shown turned 90° clockwise, so the stored top rows end up on the right."""
    stored = np.zeros((40, 64), np.uint8)
    stored[:10] = 255  # bright top band as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = load_grey_2d(tmp_path / "phone.jpg")
    assert out.shape == (64, 40)
    assert out[:, -10:].mean() > 0.9 and out[:, :-10].mean() < 0.1


def test_palette_colour_dicom_is_read_through_its_palette(tmp_path: Path) -> None:
    """PALETTE COLOR pixels are indices: the grey image is the palette's colours, not the indices."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    index = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))  # a left-to-right ramp of indices
    ds.Rows, ds.Columns = index.shape
    ds.PixelData = index.tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "PALETTE COLOR", 1
    for tag in ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth"):
        if tag in ds:
            del ds[tag]
    lut = (65535 - np.arange(256) * 257).astype("<u2")  # a reversing grey palette: index 0 is white
    for colour in ("Red", "Green", "Blue"):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", lut.tobytes())
    ds.save_as(tmp_path / "palette.dcm")
    out = load_grey_2d(tmp_path / "palette.dcm")
    expected = 1.0 - index.astype(np.float32) / index.max()
    np.testing.assert_allclose(out, expected, atol=1e-3)
