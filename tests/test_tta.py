"""Test-time mirroring (`tta` in brain_tumor_cls) and re-scoring a finished CV run's fold models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.inferers.mirror import MirrorAveragingInferer, mean_probability_logits


def _plain(inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    return network(inputs)


class LeftHalfScore(torch.nn.Module):
    """One logit per image from its left half only: a mirror image gets a different score."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 4 * x[..., : x.shape[-1] // 2].mean(dim=(-2, -1)) - 1


def test_sigmoid_average_is_exact_and_finite_for_huge_logits() -> None:
    logits = [torch.tensor([[2.0], [-30.0], [80.0]]), torch.tensor([[-1.0], [-90.0], [100.0]])]
    got = mean_probability_logits(logits, "sigmoid")
    want = (torch.sigmoid(logits[0].double()) + torch.sigmoid(logits[1].double())) / 2
    assert torch.isfinite(got).all()
    assert torch.allclose(torch.sigmoid(got.double())[:2], want[:2], rtol=1e-5)
    assert got[2] > 80  # both near-certain: stays near-certain instead of saturating to inf
    same = mean_probability_logits([logits[0], logits[0]], "sigmoid")
    assert torch.allclose(same, logits[0], atol=1e-5)  # averaging a score with itself changes nothing


def test_softmax_average_is_the_mean_of_the_probabilities() -> None:
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    got = torch.softmax(mean_probability_logits([a, b], "softmax"), dim=1)
    assert torch.allclose(got, (torch.softmax(a, 1) + torch.softmax(b, 1)) / 2, atol=1e-6)


def test_mirroring_averages_the_image_and_its_mirror() -> None:
    image = torch.zeros(1, 1, 4, 6)
    image[..., :3] = 1.0  # bright left half: the mirror is dark there
    net = LeftHalfScore()
    got = MirrorAveragingInferer(_plain)(image, net)
    want = (torch.sigmoid(net(image)) + torch.sigmoid(net(torch.flip(image, [-1])))) / 2
    assert got.shape == (1, 1)
    assert torch.allclose(torch.sigmoid(got), want, atol=1e-6)
    half = torch.rand(2, 1, 4, 3)
    symmetric = torch.cat([half, torch.flip(half, [-1])], -1)  # its own mirror: nothing to average
    assert torch.allclose(MirrorAveragingInferer(_plain)(symmetric, net), net(symmetric), atol=1e-5)


def test_spatial_outputs_are_mirrored_back_before_averaging() -> None:
    logits = torch.randn(2, 3, 5, 7)
    identity = torch.nn.Identity()  # a "segmentation net" whose logits are its input
    got = MirrorAveragingInferer(_plain, activation="softmax", spatial_output=True)(logits, identity)
    assert torch.allclose(torch.softmax(got, 1), torch.softmax(logits, 1), atol=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"activation": "relu"}, "activation"), ({"flip_dims": []}, "flip_dims"), ({"flip_dims": [1]}, "flip_dims"),
])  # fmt: skip
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MirrorAveragingInferer(_plain, **kwargs)
    with pytest.raises(ValueError, match="flip_dims"):
        MirrorAveragingInferer(_plain, flip_dims=[-3])(torch.zeros(2, 5), torch.nn.Identity())


@pytest.mark.parametrize("stack", [["evaluate.json"], ["inference.json"], ["pretrain_4class.json", "evaluate.json"]])
def test_tta_key_switches_the_scoring_inferer(stack: list[str]) -> None:
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import find_bundle

    configs = find_bundle("brain_tumor_cls") / "configs"

    def inferer(on: object) -> object:
        parser = ConfigParser()
        parser.read_config([str(configs / "train.json"), *(str(configs / c) for c in stack)])
        parser["tta"] = on
        return parser.get_parsed_content("validate#inferer")

    assert not isinstance(inferer(False), MirrorAveragingInferer)  # the default
    on = inferer("true")  # as fire passes it from the command line
    assert isinstance(on, MirrorAveragingInferer) and on.flip_dims == [-1]
    assert on.activation == ("softmax" if "pretrain_4class.json" in stack else "sigmoid")
    text = (configs / "inference.json").read_text()
    assert '"inferer": "@validate#inferer"' in text  # inference scores the way evaluate does


def test_rescore_reproduces_a_run_and_adds_mirroring(tmp_path: Path) -> None:
    from medpipe.data.synthetic import make_synthetic_set
    from medpipe.evaluation.cv import rescore_cv, run_cv

    data = make_synthetic_set(tmp_path / "data", per_class=6, size=64)
    run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(tmp_path / "cv"), dataset_dir=str(data), epochs=1)
    again = rescore_cv(str(tmp_path / "cv"), str(tmp_path / "again"))
    for fold in (0, 1):
        name = f"fold{fold}/predictions.csv"
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "cv" / name).read_bytes()
    assert again["rescored_from"] == str(tmp_path / "cv") and again["n"] == 12
    assert (tmp_path / "again" / "splits.json").read_text() == (tmp_path / "cv" / "splits.json").read_text()
    mirrored = rescore_cv(str(tmp_path / "cv"), str(tmp_path / "tta"), tta=True)
    assert mirrored["overrides"]["tta"] is True
    fold0 = json.loads((tmp_path / "tta" / "fold0" / "metrics.json").read_text())
    assert fold0["tta"] is True
    plain = (tmp_path / "cv" / "fold0" / "predictions.csv").read_bytes()
    assert (tmp_path / "tta" / "fold0" / "predictions.csv").read_bytes() != plain
    # mirroring has two members (image, mirror): every case gets their spread; a plain run has no such column
    with (tmp_path / "tta" / "fold0" / "predictions.csv").open(newline="") as fh:
        spreads = [float(r["member_spread"]) for r in csv.DictReader(fh)]
    assert len(spreads) == fold0["n"] and all(0.0 <= v <= 1.0 for v in spreads) and max(spreads) > 0
    assert b"member_spread" not in plain
    # the folds come from the run's splits.json: an image added since cannot silently move images between folds
    (data / "yes" / "added.png").write_bytes((data / "yes" / "synthetic_yes_000.png").read_bytes())
    with pytest.raises(Exception) as info:  # noqa: PT011 - MONAI wraps it; the CLI prints the MedpipeError inside
        rescore_cv(str(tmp_path / "cv"), str(tmp_path / "added"))
    assert "in no val fold (first: 'yes/added.png')" in str(find_medpipe_error(info.value))
    assert not list((tmp_path / "added").rglob("*.csv")) and not (tmp_path / "added" / "splits.json").exists()


def test_rescore_refuses_a_folder_that_is_not_a_run_or_its_own_output(tmp_path: Path) -> None:
    from medpipe.evaluation.cv import rescore_cv

    with pytest.raises(MedpipeError, match="no cv_summary.json"):
        rescore_cv(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "cv_summary.json").write_text(json.dumps({"bundle": "brain_tumor_cls"}))
    with pytest.raises(MedpipeError, match="must differ"):
        rescore_cv(str(tmp_path), str(tmp_path))
    with pytest.raises(MedpipeError, match="lacks"):
        rescore_cv(str(tmp_path), str(tmp_path / "out"))
    summary = {"bundle": "brain_tumor_cls", "network": "paper_cnn", "split_mode": "group", "folds": 2}
    (tmp_path / "cv_summary.json").write_text(json.dumps(summary))
    (tmp_path / "fold0").mkdir()
    (tmp_path / "fold0" / "model.pt").write_bytes(b"")
    with pytest.raises(MedpipeError, match="fold1/model.pt"):
        rescore_cv(str(tmp_path), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "fold1").mkdir()
    (tmp_path / "fold1" / "model.pt").write_bytes(b"")
    (tmp_path / "out" / "fold2").mkdir(parents=True)  # another run's third fold would be pooled into the summary
    with pytest.raises(MedpipeError, match="already holds fold2"):
        rescore_cv(str(tmp_path), str(tmp_path / "out"))
