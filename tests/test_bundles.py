"""Verification suite run over every bundle under bundles/: layout, metadata schema, network in/out, and a real
(tiny) train -> evaluate -> inference cycle on CPU. A new bundle is picked up without editing this file; its
metadata.json `medpipe` block says which data set it needs, which overrides make a smoke run, and what it writes.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from monai.bundle import verify_metadata, verify_net_in_out

from conftest import BUNDLES, REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.bundle.verify import net_io_overrides

SCHEMA = REPO / "medpipe" / "schemas" / "meta_schema.json"
REQUIRED_FILES = [
    "configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
    "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md", "docs/data_license.txt", "LICENSE",
]  # fmt: skip
COMMON_OVERRIDES = ["dataset_dir", "output_dir", "ckpt_dir", "epochs", "fold", "seed"]

NET_CASES = [
    pytest.param(b, net, id=f"{b.name}-{net}")
    for b in BUNDLES
    for net in json.loads((b / "configs" / "metadata.json").read_text())["medpipe"]["networks"]
]


def _meta(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def test_bundles_found() -> None:
    assert BUNDLES, "no bundles/*/configs/metadata.json found"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_layout_and_common_overrides(bundle: Path) -> None:
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    assert not missing, f"{bundle.name} lacks {missing}"
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert [k for k in COMMON_OVERRIDES if k not in train] == []
    assert "training" in train and "run" in train, "`monai.bundle run training` and plain `run` must both work"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_matches_schema(bundle: Path) -> None:
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_schema_rejects_bad_metadata(bundle: Path, tmp_path: Path) -> None:
    meta = _meta(bundle)
    del meta["network_data_format"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(bad), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle,network", NET_CASES)
def test_network_in_out(bundle: Path, network: str) -> None:
    configs = [str(bundle / "configs" / "train.json")]
    overlay = bundle / "configs" / f"net_{network}.json"
    if overlay.is_file():
        configs.append(str(overlay))
    verify_net_in_out(
        net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"), config_file=configs, device="cpu",
        **net_io_overrides(configs),
    )  # fmt: skip


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_train_evaluate_inference_run(bundle: Path, tmp_path: Path) -> None:
    spec = _meta(bundle)["medpipe"]
    data = real_dataset(spec["dataset"])
    common = {"dataset_dir": str(data), "ckpt_dir": str(tmp_path / "models"), "seed": 0, **spec["smoke_overrides"]}

    run_bundle(bundle, "train", output_dir=str(tmp_path / "train"), **common)
    assert (tmp_path / "models" / "model.pt").stat().st_size > 0

    run_bundle(bundle, "evaluate", output_dir=str(tmp_path / "eval"), **common)
    for name in spec["evaluate_outputs"]:
        assert (tmp_path / "eval" / name).stat().st_size > 0, f"evaluate did not write {name}"
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n"] > 0

    run_bundle(bundle, "inference", output_dir=str(tmp_path / "infer"), **common)
    for name in spec["inference_outputs"]:
        assert (tmp_path / "infer" / name).stat().st_size > 0, f"inference did not write {name}"
    if "predictions.csv" in spec["inference_outputs"]:
        with (tmp_path / "infer" / "predictions.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert rows and all(0.0 <= float(v) <= 1.0 for r in rows for k, v in r.items() if k.startswith("prob_"))


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_medpipe_verify_command(bundle: Path) -> None:
    from medpipe.bundle.verify import verify_bundle

    passed = verify_bundle(bundle)
    assert passed[0].startswith("metadata") and len(passed) == 1 + len(_meta(bundle)["medpipe"]["networks"])
