"""Model ensembles: the `ensemble_ckpts` key (medpipe.ensemble) and `medpipe cv_ensemble` (medpipe.cv_ensemble)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from medpipe.errors import MedpipeError
from medpipe.inferers.ensemble import ModelEnsembleInferer, checkpoint_list, ensemble_inferer, load_member


def _plain(inputs: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    return network(inputs)


def _linear(seed: int, out: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, out))


def test_ensemble_averages_the_members_probabilities() -> None:
    x = torch.randn(5, 2, 4)
    nets = [_linear(0), _linear(1), _linear(2)]
    got = ModelEnsembleInferer(_plain, nets[1:])(x, nets[0])
    want = torch.stack([torch.sigmoid(n(x)) for n in nets]).mean(0)
    assert got.shape == (5, 1)
    assert torch.allclose(torch.sigmoid(got), want, atol=1e-6)
    nets = [_linear(0, 3), _linear(1, 3)]
    got = ModelEnsembleInferer(_plain, nets[1:], activation="softmax")(x, nets[0])
    want = (torch.softmax(nets[0](x), 1) + torch.softmax(nets[1](x), 1)) / 2
    assert torch.allclose(torch.softmax(got, 1), want, atol=1e-6)
    with pytest.raises(ValueError, match="activation"):
        ModelEnsembleInferer(_plain, nets, activation="relu")


def test_checkpoint_list_reads_lists_comma_strings_and_empty_values() -> None:
    assert checkpoint_list(None) == [] and checkpoint_list([]) == [] and checkpoint_list("") == []
    assert checkpoint_list("None") == []
    assert checkpoint_list("a.pt, b.pt") == ["a.pt", "b.pt"]
    assert checkpoint_list(["a.pt", Path("b.pt")]) == ["a.pt", "b.pt"]


def test_no_checkpoints_leaves_the_inferer_alone(tmp_path: Path) -> None:
    assert ensemble_inferer(_plain, _linear(0), []) is _plain
    torch.save(_linear(1).state_dict(), tmp_path / "m.pt")
    wrapped = ensemble_inferer(_plain, _linear(0), str(tmp_path / "m.pt"))
    assert isinstance(wrapped, ModelEnsembleInferer) and len(wrapped.members) == 1
    for ckpts, own in ((f"{tmp_path}/m.pt,{tmp_path}/m.pt", None), (str(tmp_path / "m.pt"), tmp_path / "m.pt")):
        with pytest.raises(MedpipeError, match="twice"):  # one model counted twice would outweigh the others
            ensemble_inferer(_plain, _linear(0), ckpts, own_ckpt=own)


def test_a_member_holds_its_checkpoint_and_leaves_the_network_alone(tmp_path: Path) -> None:
    network, trained = _linear(0), _linear(1)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    torch.save({"model": trained.state_dict()}, tmp_path / "wrapped.pt")  # TrainingCheckpoint's last.pt layout
    torch.save({f"module.{k}": v for k, v in trained.state_dict().items()}, tmp_path / "ddp.pt")
    x = torch.randn(3, 2, 4)
    for name in ("wrapped.pt", "ddp.pt"):
        member = load_member(network, tmp_path / name)
        assert not member.training and member is not network
        assert torch.equal(member(x), trained(x))
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())


def test_bad_member_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    network = _linear(0)
    torch.save(_linear(1, out=2).state_dict(), tmp_path / "other_head.pt")
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "partial.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pt")  # a module object, not tensors
    cases = {
        "missing.pt": "not found; set --ensemble_ckpts", "other_head.pt": "does not fit the network.*wrong shape",
        "partial.pt": "missing", "garbage.pt": "cannot read ensemble checkpoint", "pickled.pt": "other than tensors",
    }  # fmt: skip
    for name, message in cases.items():
        with pytest.raises(MedpipeError, match=message) as info:
            load_member(network, tmp_path / name)
        assert "\n" not in str(info.value)


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 2-fold CV runs of the paper CNN on the same fold partition (split_seed 0), training seeds 0 and 1."""
    from medpipe.data.synthetic import make_synthetic_set
    from medpipe.evaluation.cv import run_cv

    root = tmp_path_factory.mktemp("ens")
    data = make_synthetic_set(root / "data", per_class=6, size=64)
    for seed in (0, 1):
        run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(root / f"seed{seed}"), dataset_dir=str(data),
               epochs=1, seed=seed, split_seed=0)  # fmt: skip
    run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(root / "split1"), dataset_dir=str(data), epochs=1,
           split_seed=1)  # fmt: skip
    return root


def test_cv_ensemble_averages_runs_fold_by_fold(two_runs: Path) -> None:
    from medpipe.evaluation.cv_ensemble import ensemble_cv

    runs = [str(two_runs / "seed0"), str(two_runs / "seed1")]
    summary = ensemble_cv(runs, str(two_runs / "ens"))
    assert summary["n"] == 12 and summary["ensemble_of"] == runs and summary["network"] == "ensemble"
    for fold in (0, 1):
        a, b = (_rows(two_runs / r / f"fold{fold}" / "predictions.csv") for r in ("seed0", "seed1"))
        assert set(a) == set(b)  # same partition: the training seed changed, the folds did not
        got = _rows(two_runs / "ens" / f"fold{fold}" / "predictions.csv")
        assert set(got) == set(a)
        for path, row in got.items():
            want = (float(a[path]["prob_yes"]) + float(b[path]["prob_yes"])) / 2
            assert float(row["prob_yes"]) == pytest.approx(want, abs=1e-6)
            assert row["label"] == a[path]["label"]
            assert row["predicted"] == ("yes" if float(row["prob_yes"]) > 0.5 else "no")
        metrics = json.loads((two_runs / "ens" / f"fold{fold}" / "metrics.json").read_text())
        assert metrics["n"] == len(got) and "accuracy" in metrics["metrics"]
    both_wrong = []
    for fold in (0, 1):
        a, b = (_rows(two_runs / r / f"fold{fold}" / "predictions.csv") for r in ("seed0", "seed1"))
        both_wrong += [p for p, r in a.items() if r["predicted"] != r["label"] and b[p]["predicted"] != r["label"]]
    assert summary["wrong_by_every_member"] == sorted(both_wrong)
    differs = [p for p, r in a.items() if r["prob_yes"] != b[p]["prob_yes"]]
    assert differs  # the two training seeds gave different models: the average is not a copy


def test_ensembles_of_the_bundle_and_of_the_cv_agree(two_runs: Path) -> None:
    """`ensemble_ckpts` at scoring time gives what cv_ensemble estimates from the saved predictions."""
    from medpipe.bundle.config import find_bundle, run_bundle
    from medpipe.evaluation.cv import fold_overrides
    from medpipe.evaluation.cv_ensemble import ensemble_cv

    members = str(two_runs / "seed1" / "fold0" / "model.pt")
    data = str(two_runs / "data")
    job = fold_overrides(0, 2, "group", two_runs / "seed0" / "fold0", two_runs / "scored", {
        "dataset_dir": data, "seed": 0, "split_seed": 0, "ensemble_ckpts": members})  # fmt: skip
    run_bundle(find_bundle("brain_tumor_cls"), "evaluate", "paper_cnn", **job)
    ensemble_cv([str(two_runs / "seed0"), str(two_runs / "seed1")], str(two_runs / "ens_check"))
    want = _rows(two_runs / "ens_check" / "fold0" / "predictions.csv")
    got = _rows(two_runs / "scored" / "predictions.csv")
    assert set(got) == set(want)
    for path, row in got.items():
        assert float(row["prob_yes"]) == pytest.approx(float(want[path]["prob_yes"]), abs=2e-6)
    metrics = json.loads((two_runs / "scored" / "metrics.json").read_text())
    assert metrics["ensemble_ckpts"] == [members]
    # per-case member spread at scoring time equals the spread of the two runs' saved probabilities
    a, b = (_rows(two_runs / r / "fold0" / "predictions.csv") for r in ("seed0", "seed1"))
    for path, row in got.items():
        want_spread = abs(float(a[path]["prob_yes"]) - float(b[path]["prob_yes"]))
        assert float(row["member_spread"]) == pytest.approx(want_spread, abs=2e-4)
        assert float(want[path]["member_spread"]) == pytest.approx(want_spread, abs=2e-4)  # cv_ensemble's column


def test_cv_ensemble_refuses_runs_it_cannot_average(two_runs: Path, tmp_path: Path) -> None:
    import shutil

    from medpipe.evaluation.cv_ensemble import ensemble_cv

    seed0, seed1, split1 = (str(two_runs / r) for r in ("seed0", "seed1", "split1"))
    legacy = tmp_path / "legacy"  # a run from before splits.json: the per-fold image check still holds
    shutil.copytree(split1, legacy)
    (legacy / "splits.json").unlink()
    out = tmp_path / "out"
    cases = [
        ([seed0], "at least two"), ([seed0, seed0], "given twice"), ([seed0, str(tmp_path)], "no cv_summary.json"),
        ([seed0, split1], r"splits.json of .* differ \(fold 0\)"), ([seed0, str(legacy)], "hold different images"),
    ]  # fmt: skip
    for runs, message in cases:
        with pytest.raises(MedpipeError, match=message):
            ensemble_cv(runs, str(out))
        assert not out.exists()  # refused before anything is written
    with pytest.raises(MedpipeError, match="must differ"):
        ensemble_cv([seed0, seed1], seed1)
    with pytest.raises(MedpipeError, match="already holds fold0/model.pt"):  # a CV run's folder, not an output
        ensemble_cv([seed0, seed1], split1)
    (out / "fold7").mkdir(parents=True)  # left by a run with more folds: it would be pooled into the summary
    with pytest.raises(MedpipeError, match="already holds fold7"):
        ensemble_cv([seed0, seed1], str(out))
    assert sorted(p.name for p in out.iterdir()) == ["fold7"]
