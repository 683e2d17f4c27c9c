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


# ---------------------------------------------------------------- outputs of inputs named alike, one ckpt_dir (#22)


def test_ct_inputs_whose_folders_share_a_name_keep_their_own_outputs(tmp_path: Path) -> None:
    """`--input "['a/ct.nii.gz','b/ct.nii.gz']"` (or series folders a/s1, b/s1): each volume keeps its masks; the
    second no longer writes over the first's ct_seg.nii.gz."""
    import nibabel as nib

    from medpipe.inference.ct_volume import VolumeSegmenter

    inputs = []
    for name, slices in (("a", 6), ("b", 4)):  # different depths tell the two masks apart
        hu = np.full((40, 40, slices), -1000, dtype=np.int16)
        hu[6:34, 8:32] = 0
        hu[10:20, 12:28] = -850
        (tmp_path / name).mkdir()
        nib.save(nib.Nifti1Image(hu, np.diag([0.7, 0.7, 2.0, 1.0])), tmp_path / name / "ct.nii.gz")
        inputs.append(tmp_path / name / "ct.nii.gz")
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(torch.nn.Conv2d(1, 3, 1), image_size=32, keep_components=0, write_dicom_seg=False)
    report = segmenter(inputs, tmp_path / "out")
    seg_files = [entry["files"]["seg"] for entry in report["volumes"]]
    assert seg_files == ["a_ct_seg.nii.gz", "b_ct_seg.nii.gz"], seg_files
    for name, slices in zip(seg_files, (6, 4), strict=True):
        assert nib.load(tmp_path / "out" / name).shape == (40, 40, slices)


def test_gradcam_overlays_of_images_named_alike_do_not_collide(tmp_path: Path) -> None:
    """`a/x.jpg` and `b/x.jpg` predicted alike wrote one x_gradcam_<class>.png; each now has its own overlay."""
    from collections import OrderedDict

    from ignite.engine import Engine
    from monai.data import Dataset

    from medpipe.inference.gradcam import GradCamWriter

    torch.manual_seed(0)
    net = torch.nn.Sequential(OrderedDict(conv=torch.nn.Conv2d(1, 4, 3, padding=1), pool=torch.nn.AdaptiveAvgPool2d(1),
                                          flat=torch.nn.Flatten(), fc=torch.nn.Linear(4, 2)))  # fmt: skip
    image = torch.rand(1, 16, 16)
    items = [{"image": image, "path": str(tmp_path / d / "x.jpg")} for d in ("a", "b")]  # same pixels, same class
    loaders = {"planned": Dataset(items), "unplanned": items}  # a plain list has no `data`: named as they come
    for case, data in loaders.items():
        engine = Engine(lambda e, batch: None)
        GradCamWriter(str(tmp_path / case), net, "conv", ["neg", "pos"]).attach(engine)
        engine.run(torch.utils.data.DataLoader(data, batch_size=2, collate_fn=lambda batch: batch), max_epochs=1)
        written = sorted(p.name.split("_gradcam_")[0] for p in (tmp_path / case).glob("*.png"))
        assert written == (["a_x", "b_x"] if case == "planned" else ["b_x", "x"]), written


def _train_cmd(data: Path, ckpt: Path, *extra: str) -> list[str]:
    return ["run", "brain_tumor_cls", "train", "--dataset_dir", str(data), "--ckpt_dir", str(ckpt), "--epochs", "1",
            "--image_size", "32", "--num_folds", "2", "--val_interval", "1000", *extra]  # fmt: skip


def test_training_over_an_earlier_model_is_refused_unless_resuming(
    brain_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "m"
    assert main(_train_cmd(brain_set, ckpt)) == 0
    model = (ckpt / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(_train_cmd(brain_set, ckpt)) == 2
    line = _one_line(capsys)
    assert str(ckpt / "model.pt") in line and "--resume true" in line and "new --ckpt_dir" in line
    assert (ckpt / "model.pt").read_bytes() == model and not (ckpt / "training.lock").exists()
    assert main(_train_cmd(brain_set, ckpt, "--resume", "true", "--epochs", "2")) == 0  # continuing is fine
    assert (ckpt / "model.pt").read_bytes() != model


def test_a_second_training_into_a_busy_ckpt_dir_is_refused(
    brain_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A training runs in another process: a second one into its --ckpt_dir is one line naming that process; once
    it is gone (SIGKILLed, its lock left behind), the folder can be trained into again."""
    import signal
    import time

    ckpt = tmp_path / "m"
    cmd = [sys.executable, "-m", "medpipe", *_train_cmd(brain_set, ckpt)]
    cmd[cmd.index("--epochs") + 1] = "300"  # ~0.1 s each: busy for the whole test
    first = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (ckpt / "last.pt").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        capsys.readouterr()
        assert main(_train_cmd(brain_set, ckpt)) == 2
        line = _one_line(capsys)
        assert f"in use by another training: process {first.pid}" in line and "another --ckpt_dir" in line
        assert first.poll() is None  # the first training goes on
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    assert (ckpt / "training.lock").is_file() and not (ckpt / "model.pt").exists()  # a killed training's lock
    assert main(_train_cmd(brain_set, ckpt)) == 0  # stale: taken over
    assert (ckpt / "model.pt").is_file() and not (ckpt / "training.lock").exists()


# ---------------------------------------------------------------- symlinked sub-folders (#23)


def test_symlinked_sub_folders_of_a_class_are_read_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A class folder whose extra images sit in a linked sub-folder (a third of them here) uses them all; a link
    cycle, or a second link to a folder already read, neither hangs nor counts an image twice (and is logged)."""
    from medpipe.data.datalists import inference_items, scan_class_folders

    data = make_synthetic_set(tmp_path / "data", per_class=4, size=16)
    elsewhere = make_synthetic_set(tmp_path / "elsewhere", per_class=2, size=16)
    (data / "yes" / "more").symlink_to(elsewhere / "yes", target_is_directory=True)
    (data / "no" / "more").symlink_to(elsewhere / "no", target_is_directory=True)
    (data / "no" / "loop").symlink_to(data / "no", target_is_directory=True)  # a cycle
    (data / "no" / "more_again").symlink_to(elsewhere / "no", target_is_directory=True)  # read already
    (data / "README.txt").unlink()
    items = scan_class_folders(data, ["no", "yes"])
    paths = sorted(it["path"] for it in items)
    assert len(paths) == 12 and "yes/more/synthetic_yes_000.png" in paths and "no/more/synthetic_no_001.png" in paths
    assert not any("loop" in p or "more_again" in p for p in paths)
    assert sum("which is read once" in r.getMessage() for r in caplog.records) == 2
    assert len(inference_items(data / "yes")) == 6


# ---------------------------------------------------------------- tracebacks that are one line now (#25)


@pytest.fixture(scope="module")
def brain_model(brain_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A paper-CNN trained one epoch at 32 px: its ckpt folder (model.pt, last.pt)."""
    from medpipe.bundle.config import run_bundle

    ckpt = tmp_path_factory.mktemp("brain_model")
    run_bundle(BRAIN, "train", dataset_dir=str(brain_set), ckpt_dir=str(ckpt), epochs=1, image_size=32, num_folds=2,
               fold=0, val_interval=1000)  # fmt: skip
    return ckpt


def test_an_input_folder_named_with_a_number_is_a_name(
    brain_set: Path, brain_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-fire turns `--input 123` into the number 123 (a traceback before): it is the folder '123'."""
    from medpipe.inference.ct_volume import VolumeSegmenter

    (tmp_path / "123").mkdir()
    for image in sorted((brain_set / "yes").iterdir())[:2]:
        (tmp_path / "123" / image.name).write_bytes(image.read_bytes())
    monkeypatch.chdir(tmp_path)
    args = ["run", "brain_tumor_cls", "inference", "--input", "123", "--ckpt_dir", str(brain_model), "--output_dir",
            "out", "--dataset_dir", str(brain_set), "--image_size", "32", "--input_guard", "false"]  # fmt: skip
    assert main(args) == 0
    rows = (tmp_path / "out" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all("123/synthetic_yes_00" in row for row in rows)
    with pytest.raises(MedpipeError, match="^456: not a DICOM series"):  # CT: the name is looked for, not iterated
        VolumeSegmenter(torch.nn.Conv2d(1, 3, 1), image_size=32)(456, tmp_path / "ct_out")


@pytest.mark.parametrize("job, key", [("train", "ckpt_dir"), ("evaluate", "output_dir"), ("inference", "output_dir")])
def test_a_read_only_output_folder_is_one_line(
    job: str, key: str, brain_set: Path, brain_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The check `ingest` makes (medpipe.files), before the job reads any data; nothing is created there."""
    import errno

    read_only = tmp_path / "ro"
    read_only.mkdir()
    real_open = os.open

    def refuse(path: str | os.PathLike, *args: object, **kwargs: object) -> int:
        if read_only in Path(path).parents and int(args[0]) & os.O_CREAT:  # type: ignore[call-overload]
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refuse)  # root ignores chmod: simulate the read-only file system
    folders = {"ckpt_dir": str(brain_model), "output_dir": str(tmp_path / "out"), key: str(read_only / "out")}
    args = ["run", "brain_tumor_cls", job, "--dataset_dir", str(brain_set), "--image_size", "32", "--num_folds", "2",
            "--epochs", "1", "--input_guard", "false"]  # fmt: skip
    args += [t for k, v in folders.items() for t in (f"--{k}", v)]
    assert main(args) == 2
    line = _one_line(capsys)
    assert f"cannot write to --{key} '{read_only / 'out'}'" in line and "Read-only file system" in line
    assert list(read_only.iterdir()) == []


@pytest.mark.parametrize("change", [["--image_size", "48"], ["--network", "densenet121"]], ids=["size", "network"])
def test_resume_from_another_network_or_image_size_is_one_line(
    change: list[str], brain_set: Path, brain_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "m"
    ckpt.mkdir()
    (ckpt / "last.pt").write_bytes((brain_model / "last.pt").read_bytes())
    args = ["run", "brain_tumor_cls", "train", "--dataset_dir", str(brain_set), "--ckpt_dir", str(ckpt), "--epochs",
            "2", "--num_folds", "2", "--image_size", "32", "--resume", "true", *change]  # fmt: skip
    assert main(args) == 2
    line = _one_line(capsys)
    assert "--resume" in line and "another network or image size" in line and str(ckpt / "last.pt") in line
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.pt"]
    assert (ckpt / "last.pt").read_bytes() == (brain_model / "last.pt").read_bytes()


def test_an_onnx_export_run_at_another_image_size_is_one_line(tmp_path: Path) -> None:
    """A classifier exported at 64 px has a fixed input size: run at 96 px it is one line (an ONNX Runtime
    InvalidArgument traceback before); at 64 px it runs."""
    from medpipe.export.exporters import to_onnx
    from medpipe.export.runtime import OnnxRuntimeNetwork

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))  # fmt: skip
    to_onnx(net, torch.rand(2, 1, 64, 64), tmp_path / "model.onnx")
    runtime = OnnxRuntimeNetwork(tmp_path / "model.onnx", threads=1)
    assert runtime(torch.rand(3, 1, 64, 64)).shape == (3, 2)
    with pytest.raises(MedpipeError, match="takes 1-channel 64x64 inputs, this run gives 1-channel 96x96"):
        runtime(torch.rand(1, 1, 96, 96))
