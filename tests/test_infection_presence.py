"""covid_ct_seg v3 (issue #31): the slice gate (a slice whose infection is a small share of its lung loses it), its
leave-one-source-out threshold rule, the calibrated per-slice probability of infection, and what the report says
about a scan left without infection ("no infection detected")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medpipe.errors import MedpipeError
from medpipe.evaluation.infection_presence import (
    check_coefficients,
    choose_gate,
    fit_presence,
    presence_reliability,
    slice_probabilities,
)
from medpipe.inference import ct_volume
from medpipe.inference.ct_volume import VolumeSegmenter
from medpipe.io.dicom import Volume
from medpipe.transforms.seg_postprocessing import (
    GateInfectionSliced,
    check_lung_fraction,
    gate_infection_slices,
    slice_infection_fractions,
)


def _stack() -> np.ndarray:
    """Three 20x20 slices along axis 2, lung 100 px each: infection 1 px (1 %), 30 px (30 %), none."""
    labels = np.zeros((20, 20, 3), dtype=np.uint8)
    labels[5:15, 5:15, :] = 1
    labels[5, 5, 0] = 2
    labels[5:8, 5:15, 1] = 2
    return labels


def test_slice_fractions_are_infection_over_lung_per_slice() -> None:
    assert np.allclose(slice_infection_fractions(_stack(), axis=2), [0.01, 0.30, 0.0])
    assert slice_infection_fractions(np.zeros((4, 4), np.uint8))[0] == 0.0  # no lung: 0, not a division by zero


def test_gate_removes_infection_only_from_weak_slices_and_keeps_the_lung() -> None:
    labels = _stack()
    gated = gate_infection_slices(labels, 0.05, axis=2)
    assert not (gated[..., 0] == 2).any()  # 1 % < 5 %: relabelled lung
    assert np.array_equal(gated[..., 1], labels[..., 1])  # 30 %: kept as it was
    assert np.array_equal(gated >= 1, labels >= 1)  # the lung mask never changes
    assert gate_infection_slices(labels, 0.0, axis=2) is labels  # off
    assert gate_infection_slices(labels, 0.005, axis=2) is labels  # nothing under it: the input itself
    assert not (gate_infection_slices(labels, 0.5, axis=2) == 2).any()


def test_gate_transform_acts_on_one_slice_tensor() -> None:
    plane = torch.as_tensor(_stack()[..., 0][None])
    out = GateInfectionSliced("pred", 0.05)({"pred": plane})["pred"]
    assert out.shape == plane.shape and out.dtype == plane.dtype and not (out == 2).any()
    assert GateInfectionSliced("pred", 0.005)({"pred": plane})["pred"] is plane


@pytest.mark.parametrize("bad", ["abc", -0.1, 1.5, "false"])
def test_gate_threshold_is_checked_in_one_line(bad: object) -> None:
    with pytest.raises(MedpipeError, match="min_infection_lung_fraction"):
        check_lung_fraction(bad)


def test_choose_gate_leaves_at_most_five_percent_of_negative_slices_with_infection() -> None:
    f = np.r_[np.zeros(50), np.linspace(0.001, 0.05, 50)]  # 100 slices, 50 with some infection
    t = choose_gate(f)
    below = f[f < t].max()  # the next candidate down keeps too many: t is the smallest that holds
    assert ((f >= t) & (f > 0)).sum() <= 5 < ((f >= below) & (f > 0)).sum()
    assert t == pytest.approx(np.sort(f)[-5])
    assert choose_gate(np.r_[np.zeros(99), 0.2]) == 0.0  # one slice in 100 with infection: 1 % kept, no gate needed
    ties = np.full(10, 0.3)
    assert not ((ties >= choose_gate(ties)) & (ties > 0)).any()  # ties above the allowance: just above them
    with pytest.raises(MedpipeError):
        choose_gate([])


def test_presence_probability_is_fitted_monotone_and_checked() -> None:
    rng = np.random.default_rng(0)
    f = np.r_[rng.uniform(0, 0.01, 300), rng.uniform(0.01, 0.5, 300)]
    y = np.r_[np.zeros(300), np.ones(300)]
    y[rng.choice(600, 60, replace=False)] = 1 - y[rng.choice(600, 60, replace=False)]  # some label noise
    a, b = fit_presence(f, y)
    p = slice_probabilities(f, (a, b))
    assert b > 0 and np.all(np.diff(slice_probabilities(np.sort(f), (a, b))) >= 0)
    assert abs(p.mean() - y.mean()) < 0.02  # a logistic fit with an intercept matches the base rate
    bins = presence_reliability(p, y)
    assert sum(bins["counts"]) == 600 and len(bins["observed"]) == 10
    assert check_coefficients("[1.5, 2]") == (1.5, 2.0) and check_coefficients(None) is None
    assert check_coefficients("none") is None
    for bad in ("[1]", "false", "[1, -2]", "[1, nan]"):
        with pytest.raises(MedpipeError, match="infection_probability"):
            check_coefficients(bad)
    with pytest.raises(MedpipeError, match="both kinds"):
        fit_presence([0.1, 0.2], [1, 1])


def _volume_and_probs(infection_pixels: int) -> tuple[Volume, np.ndarray]:
    """A 3-slice 32x32 volume (1 mm voxels) and model probabilities: lung 16x16 on every slice, `infection_pixels`
    infection pixels on slice 1."""
    array = np.full((32, 32, 3), -1000, np.int16)  # air, a body, lungs in it: what check_axial_ct wants of CT
    array[2:30, 2:30], array[8:24, 8:24] = 40, -850
    volume = Volume(array, np.eye(4))
    probs = np.zeros((3, 3, 32, 32), np.float32)
    probs[:, 0] = 1.0
    probs[:, :, 8:24, 8:24] = [[[0.0]], [[1.0]], [[0.0]]]
    patch = np.zeros((16, 16), bool)
    patch.flat[:infection_pixels] = True
    probs[1, 1, 8:24, 8:24][patch], probs[1, 2, 8:24, 8:24][patch] = 0.0, 1.0
    return volume, probs


@pytest.mark.parametrize(("pixels", "gate", "finding"), [
    (8, 0.05, "no infection detected"),  # 8 / 256 = 3 % of the slice's lung: under the gate
    (64, 0.05, "infection on 1 of 3 slices"),  # 25 %: kept
    (8, 0.0, "infection on 1 of 3 slices"),  # gate off
])  # fmt: skip
def test_report_says_no_infection_detected_when_the_gate_leaves_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path, pixels: int, gate: float, finding: str
) -> None:
    volume, probs = _volume_and_probs(pixels)
    monkeypatch.setattr(ct_volume, "predict_slices", lambda *args, **kwargs: probs)
    monkeypatch.setattr(ct_volume, "ct_to_model_slices", lambda *args, **kwargs: None)
    segmenter = VolumeSegmenter(torch.nn.Identity(), 32, window="minmax_slice", keep_components=0,
                                write_dicom_seg=False, min_infection_lung_fraction=gate,
                                infection_probability=[2.0, 1.5])  # fmt: skip
    mask, fractions = segmenter.segment_slices(volume)
    assert fractions[1] == pytest.approx(pixels / 256)
    entry = segmenter.volume_report(mask, volume, fractions)
    assert entry["finding"] == finding
    assert entry["infection_detected"] is (finding != "no infection detected")
    assert (entry["infection_volume_ml"] == 0.0) is (finding == "no infection detected")
    assert entry["lung_volume_ml"] == pytest.approx(3 * 256 / 1000, abs=0.01)  # the gate never removes lung
    expected = slice_probabilities(fractions, (2.0, 1.5))
    assert entry["slice_infection_probability"] == pytest.approx(expected, abs=1e-4)
    assert entry["infection_probability_max"] == pytest.approx(expected.max(), abs=1e-4)
    assert entry["slice_infection_probability"][0] < entry["slice_infection_probability"][1]


def test_a_volume_without_lung_is_not_called_free_of_infection(monkeypatch: pytest.MonkeyPatch) -> None:
    volume, probs = _volume_and_probs(0)
    probs[:, 0], probs[:, 1:] = 1.0, 0.0  # the model finds no lung at all
    monkeypatch.setattr(ct_volume, "predict_slices", lambda *args, **kwargs: probs)
    monkeypatch.setattr(ct_volume, "ct_to_model_slices", lambda *args, **kwargs: None)
    segmenter = VolumeSegmenter(torch.nn.Identity(), 32, window="minmax_slice", keep_components=0,
                                write_dicom_seg=False)  # fmt: skip
    mask, fractions = segmenter.segment_slices(volume)
    entry = segmenter.volume_report(mask, volume, fractions)
    assert entry["finding"] == "no lung found: infection not assessed" and entry["infection_detected"] is None
