"""Faults at the bundle level (issue #20): a bad checkpoint given as the bundle's model, the clean exit of
`medpipe run` after a one-line error, what an installed bundle's configs may run, and evaluation of a folder
without a fold. Data is generated, so these run without MEDPIPE_DATA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import BUNDLES, REPO
from medpipe.bundle.trust import check_allowed_modules, config_modules, expression_names
from medpipe.cli import main
from medpipe.data.synthetic import make_synthetic_set
from medpipe.errors import MedpipeError

BRAIN = REPO / "bundles" / "brain_tumor_cls"
CT = REPO / "bundles" / "covid_ct_seg"
QUICK = ["--epochs", "1", "--image_size", "32", "--num_folds", "2"]


@pytest.fixture(scope="module")
def brain_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_set(tmp_path_factory.mktemp("brain") / "data", per_class=6, size=48)


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medpipe error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("kind", ["other_network", "truncated", "empty", "pickled_module"])
def test_bad_checkpoint_as_the_bundles_model_is_one_line(
    kind: str, brain_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "model.pt"
    if kind == "other_network":
        torch.save(torch.nn.Linear(4, 2).state_dict(), ckpt)
    elif kind == "truncated":
        torch.save({"w": torch.zeros(1000)}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif kind == "empty":
        ckpt.write_bytes(b"")
    else:
        torch.save(torch.nn.Linear(4, 2), ckpt)  # a whole pickled module, refused by weights_only loading
    args = ["run", "brain_tumor_cls", "evaluate", "--dataset_dir", str(brain_set), "--ckpt_path", str(ckpt),
            "--output_dir", str(tmp_path / "eval"), *QUICK]  # fmt: skip
    assert main(args) == 2
    line = _one_line(capsys)
    assert str(ckpt) in line
    assert not (tmp_path / "eval" / "metrics.json").exists()


def _ct_set(root: Path, bad_label: bool) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    items = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / "images" / f"s{i}.png")
        label = np.zeros((32, 32), dtype=np.uint8)
        label[8:20, 8:20] = 7 if (bad_label and i == 2) else 1
        Image.fromarray(label).save(root / "labels" / f"s{i}.png")
        items.append({"image": f"images/s{i}.png", "label": f"labels/s{i}.png", "volume_group": f"v{i // 2}"})
    (root / "datalist.json").write_text(json.dumps({"training": items, "testing": items[:2]}))
    return root


def test_medpipe_run_exits_cleanly_after_a_one_line_error(tmp_path: Path) -> None:
    """The error hook's clean exit also holds for `medpipe run` (it aborted with SIGABRT, exit 134, before)."""
    data = _ct_set(tmp_path / "ct", bad_label=True)
    cmd = [sys.executable, "-m", "medpipe", "run", "covid_ct_seg", "train", "--dataset_dir", str(data),
           "--ckpt_dir", str(tmp_path / "m"), *QUICK]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("medpipe error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "outside the classes 0..2" in errors[0]
    assert "terminate called" not in proc.stderr


def test_evaluating_a_folder_without_a_fold_scores_its_testing_list(tmp_path: Path) -> None:
    """A segmentation folder is scored whole: its `testing` list, even when it has no training entries."""
    from medpipe.bundle.config import run_bundle

    data = _ct_set(tmp_path / "ct", bad_label=False)
    run_bundle(CT, "train", dataset_dir=str(data), ckpt_dir=str(tmp_path / "m"), epochs=1, image_size=32,
               num_folds=2, fold=0, val_interval=1000)  # fmt: skip
    only_testing = tmp_path / "only_testing"
    only_testing.mkdir()
    for sub in ("images", "labels"):
        (only_testing / sub).symlink_to(data / sub)
    testing = json.loads((data / "datalist.json").read_text())["testing"]
    (only_testing / "datalist.json").write_text(json.dumps({"testing": testing}))
    out = tmp_path / "eval"
    run_bundle(CT, "evaluate", dataset_dir=str(only_testing), ckpt_dir=str(tmp_path / "m"), output_dir=str(out),
               image_size=32, num_folds=2)  # fmt: skip
    per_slice = (out / "per_slice.csv").read_text().splitlines()
    assert len(per_slice) == 1 + len(testing)


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_shipped_bundles_use_only_the_modules_they_need(bundle: Path) -> None:
    assert set(config_modules(bundle)) <= {"medpipe", "monai", "torch", "os", "ignite"}
    check_allowed_modules(bundle, ["medpipe", "monai", "torch", "os", "ignite"])
    with pytest.raises(MedpipeError, match="uses 'os' in .*outside --allowed_modules medpipe,ignite"):
        check_allowed_modules(bundle, ["medpipe", "ignite"])


@pytest.mark.parametrize(
    ("config", "named"),
    [({"x": "$__import__('os').system('touch /tmp/owned')"}, "__import__"),
     ({"x": {"_target_": "subprocess.run", "args": ["ls"]}}, "subprocess"),
     ({"imports": ["$import requests"]}, "requests"),
     ({"x": "$().__class__.__base__.__subclasses__()"}, "__base__"),
     ({"x": "$open('/etc/passwd').read()"}, "open"),
     ({"x": "$def ((: not python"}, "<unparsable>")],
)  # fmt: skip
def test_allow_list_refuses_configs_that_reach_further(config: dict, named: str, tmp_path: Path) -> None:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.json").write_text(json.dumps(config))
    with pytest.raises(MedpipeError, match=f"uses '{named}'"):
        check_allowed_modules(tmp_path, ["medpipe", "monai", "torch"])


def test_expression_names_leave_out_local_variables_and_references() -> None:
    assert expression_names("[it['image'] for it in @datalists['val']]") == set()
    assert expression_names("lambda y: torch.tensor([y])") == {"torch"}
    assert expression_names("os.path.join(@bundle_root, 'eval')") == {"os"}


def test_evaluating_training_images_is_said_loudly(
    brain_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Evaluate scores the whole folder without --fold: the images a fold-0 model trained on are counted aloud."""
    from medpipe.bundle.config import run_bundle

    common = {"dataset_dir": str(brain_set), "ckpt_dir": str(tmp_path / "m"), "image_size": 32, "num_folds": 2}
    run_bundle(BRAIN, "train", epochs=1, fold=0, **common)
    trained = json.loads((tmp_path / "m" / "model.trained_on.json").read_text())
    capsys.readouterr()
    run_bundle(BRAIN, "evaluate", output_dir=str(tmp_path / "all"), **common)
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("medpipe warning:")]
    assert len(warning) == 1 and f"{len(trained)} of 12 evaluated images" in warning[0]
    run_bundle(BRAIN, "evaluate", output_dir=str(tmp_path / "fold0"), fold=0, **common)
    assert "medpipe warning" not in capsys.readouterr().err
    held_out = json.loads((tmp_path / "fold0" / "metrics.json").read_text())["n"]
    assert held_out + len(trained) == json.loads((tmp_path / "all" / "metrics.json").read_text())["n"] == 12


def test_volumetric_inference_flags_a_volume_that_is_not_chest_ct(tmp_path: Path) -> None:
    """The wrong-input guard also watches covid_ct_seg's volumes: a brain MRI stacked into an HU-ranged NIfTI passes
    the axial/HU checks, and its report says it does not look like CT; the real RIDER chest CT is not flagged."""
    import nibabel as nib

    from medpipe.inference.ct_volume import VolumeSegmenter
    from medpipe.inference.input_guard import InputGuard
    from medpipe.io.images import load_grey_2d

    data = Path(os.environ.get("MEDPIPE_DATA", "")) / "brain_mri_yes_no" / "yes"
    if not data.is_dir():
        pytest.skip("real data set 'brain_mri_yes_no' not found: set MEDPIPE_DATA")
    brain = load_grey_2d(sorted(data.iterdir())[0])
    volume = np.repeat((brain.T * 2000.0 - 1000.0)[..., None], 8, axis=2).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 5.0, 1.0])), tmp_path / "brain.nii.gz")
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 3, 1)  # the flow, not the masks, is under test
    segmenter = VolumeSegmenter(network, image_size=32, input_guard=InputGuard("ct"))
    report = segmenter(tmp_path / "brain.nii.gz", tmp_path / "out")
    assert any("not" in w and "CT" in w for w in report["volumes"][0]["warnings"]), report["volumes"][0]
    rider = Path(os.environ["MEDPIPE_DATA"]) / "dicom" / "rider_pilot_chest_ct_0117"
    report = VolumeSegmenter(network, image_size=32, input_guard=InputGuard("ct"), write_dicom_seg=False)(
        rider, tmp_path / "rider"
    )
    assert not report["volumes"][0].get("warnings")
