"""Bad input to the brain_tumor_cls bundle: each case ends in one readable line naming the file or key, a
non-zero exit, and no half-written output. Data is generated (medpipe.demo), so these run without MEDPIPE_DATA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from medpipe.bundle.config import run_bundle
from medpipe.data.synthetic import make_synthetic_set
from medpipe.errors import find_medpipe_error

BUNDLE = REPO / "bundles" / "brain_tumor_cls"
TRAIN = str(BUNDLE / "configs" / "train.json")


@pytest.fixture
def toy_set(tmp_path: Path) -> Path:
    return make_synthetic_set(tmp_path / "data", per_class=6, size=64)


def _train(dataset: Path, tmp_path: Path, **extra) -> None:
    run_bundle(BUNDLE, "train", dataset_dir=str(dataset), ckpt_dir=str(tmp_path / "ckpt"),
               output_dir=str(tmp_path / "out"), fold=-1, epochs=1, **extra)  # fmt: skip


def _medpipe_error(tmp_path: Path, dataset: Path, **extra) -> str:
    """Run training, expect a MedpipeError somewhere in the chain, return its message."""
    with pytest.raises(Exception) as info:
        _train(dataset, tmp_path, **extra)
    err = find_medpipe_error(info.value)
    assert err is not None, f"expected a MedpipeError, got {info.value!r}"
    assert not (tmp_path / "ckpt" / "model.pt").exists(), "a failed run must not leave a checkpoint"
    return str(err)


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_truncated_image_names_the_file(toy_set: Path, tmp_path: Path) -> None:
    victim = toy_set / "yes" / "synthetic_yes_002.png"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert "synthetic_yes_002.png" in _medpipe_error(tmp_path, toy_set)


def test_unreadable_image_names_the_file(toy_set: Path, tmp_path: Path) -> None:
    (toy_set / "no" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    assert "garbage.jpg" in _medpipe_error(tmp_path, toy_set)


def test_non_image_file_in_class_folder(toy_set: Path, tmp_path: Path) -> None:
    (toy_set / "no" / "notes.txt").write_text("radiologist notes")
    message = _medpipe_error(tmp_path, toy_set)
    assert "notes.txt" in message and "not an image" in message


def test_empty_class_folder(toy_set: Path, tmp_path: Path) -> None:
    for f in (toy_set / "yes").iterdir():
        f.unlink()
    assert "empty" in _medpipe_error(tmp_path, toy_set)


def test_one_class_only(toy_set: Path, tmp_path: Path) -> None:
    for f in (toy_set / "yes").iterdir():
        f.unlink()
    (toy_set / "yes").rmdir()
    message = _medpipe_error(tmp_path, toy_set)
    assert "class 'yes' (index 1) of brain_tumor_cls has no images" in message  # the data set check, before training


def test_unknown_class_folder(toy_set: Path, tmp_path: Path) -> None:
    (toy_set / "maybe").mkdir()
    assert "maybe" in _medpipe_error(tmp_path, toy_set)


def test_rgb_rgba_grey_and_16bit_mix_just_works(toy_set: Path, tmp_path: Path) -> None:
    grey = np.asarray(Image.open(toy_set / "yes" / "synthetic_yes_000.png"))
    Image.fromarray(np.stack([grey] * 3, -1)).save(toy_set / "yes" / "rgb.jpg")
    Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 200)], -1), "RGBA").save(toy_set / "no" / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(toy_set / "no" / "sixteen.png")
    Image.fromarray(grey).convert("P").save(toy_set / "yes" / "palette.png")
    _train(toy_set, tmp_path)
    assert (tmp_path / "ckpt" / "model.pt").stat().st_size > 0


def test_missing_checkpoint_at_evaluate(toy_set: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        run_bundle(BUNDLE, "evaluate", dataset_dir=str(toy_set), ckpt_dir=str(tmp_path / "nothing"),
                   output_dir=str(tmp_path / "out"), fold=-1)  # fmt: skip
    err = find_medpipe_error(info.value)
    assert err is not None and "checkpoint" in str(err) and "nothing" in str(err)
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_unknown_override_key_in_process(toy_set: Path) -> None:
    with pytest.raises(Exception) as info:
        run_bundle(BUNDLE, "train", dataset_dir=str(toy_set), epochz=1)
    assert "--epochz" in str(find_medpipe_error(info.value))


def test_cli_unknown_override_is_one_line_and_nonzero(toy_set: Path) -> None:
    result = _cli("--dataset_dir", str(toy_set), "--epochz", "1")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medpipe error:") and "--epochz" in last
    assert "Traceback" not in result.stderr


def test_cli_truncated_image_is_one_line_and_nonzero(toy_set: Path, tmp_path: Path) -> None:
    victim = toy_set / "no" / "synthetic_no_001.png"
    victim.write_bytes(victim.read_bytes()[:100])
    result = _cli("--dataset_dir", str(toy_set), "--ckpt_dir", str(tmp_path / "ckpt"), "--fold", "-1",
                  "--epochs", "1")  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("medpipe error:")]
    assert len(errors) == 1 and "synthetic_no_001.png" in errors[0]
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


def test_medpipe_cli_error_exit_code(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "medpipe", "run", "no_such_bundle"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("medpipe error: no bundle 'no_such_bundle'")
