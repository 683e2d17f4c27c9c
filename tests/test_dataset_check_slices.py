"""`medpipe dataset check PATH --bundle covid_ct_seg` on the shipped PNG slice layout (datalist.json), and the same
check first thing in a covid_ct_seg training on it: the real set passes with its counts; each fault, built in
tmp_path from a few copied real slices, is one `error:` line, and a training on it is refused in one line."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from test_dataset_check_classification import in_process_check, summary

from conftest import REPO, real_dataset
from medpipe.bundle.config import run_bundle
from medpipe.errors import find_medpipe_error

CLASSES = ["background", "lung_not_infected", "infection"]


def test_the_real_slices_pass_with_their_counts() -> None:
    root = real_dataset("covid_ct_seg")
    result = in_process_check(str(root), "--bundle", "covid_ct_seg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result, "slices") == "1297 listed, in 11 volume group(s) (folds split by them)"
    assert summary(result, "sizes") == "256x256 (1297)" and summary(result, "result") == "ok"
    # every development slice holds lung and infection (the source kept only slices with infection)
    lines = result.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("labels"))
    rows = [line.split() for line in lines[start + 1:start + 4]]
    assert {row[1]: int(row[2]) for row in rows} == {name: 1297 for name in CLASSES}, result.stdout


@pytest.fixture
def slices(tmp_path: Path) -> Path:
    """4 real slices (2 of each of 2 volume groups) with their combined labels and a datalist.json listing them."""
    source, root = real_dataset("covid_ct_seg"), tmp_path / "slices"
    entries = json.loads((source / "datalist.json").read_text())["training"]
    picked = [e for group in ("coronacases_001", "coronacases_002")
              for e in [e for e in entries if e["volume_group"] == group][:2]]  # fmt: skip
    for entry in picked:
        for key in ("image", "label"):
            (root / entry[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / entry[key], root / entry[key])
    kept = [{k: e[k] for k in ("image", "label", "volume_group", "source_index")} for e in picked]
    (root / "datalist.json").write_text(json.dumps({"name": "four slices", "training": kept}))
    return root


def _entries(root: Path) -> list[dict]:
    return json.loads((root / "datalist.json").read_text())["training"]


def _label_of_another_shape(root: Path) -> tuple[Path, str]:
    from PIL import Image

    entry = _entries(root)[0]
    Image.open(root / entry["label"]).resize((128, 128), Image.Resampling.NEAREST).save(root / entry["label"])
    return root, (f"{entry['image']}: label {Path(entry['label']).name} is 128x128, its image 256x256; the label must "
                  "lie on the image's grid")  # fmt: skip


def _label_value_not_a_class(root: Path) -> tuple[Path, str]:
    from PIL import Image

    entry = _entries(root)[1]
    label = np.asarray(Image.open(root / entry["label"])).copy()
    label[0, 0] = 5
    Image.fromarray(label).save(root / entry["label"])
    return root, f"{entry['image']}: label values [5] outside the classes 0..2 ({', '.join(CLASSES)})"


def _undecodable_image(root: Path) -> tuple[Path, str]:
    entry = _entries(root)[2]
    image = root / entry["image"]
    image.write_bytes(image.read_bytes()[:100])
    return root, f"{entry['image']}: cannot read image '{image}': "


def _missing_label(root: Path) -> tuple[Path, str]:
    entry = _entries(root)[3]
    (root / entry["label"]).unlink()
    return root, f"{root / 'datalist.json'} training[3]: label '{entry['label']}' not found in '{root}'"


def _same_bytes_in_two_groups(root: Path) -> tuple[Path, str]:
    entries = _entries(root)
    first = entries[0]
    shutil.copy(root / first["image"], root / "images" / "copy.png")
    entries.append({**entries[2], "image": "images/copy.png"})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    return root, (f"same image bytes in 2 volume groups (coronacases_001, coronacases_002): {first['image']}, "
                  "images/copy.png; a fold can train on one and score the other: delete all but one")  # fmt: skip


FAULTS: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "label-of-another-shape": _label_of_another_shape, "label-value-not-a-class": _label_value_not_a_class,
    "undecodable-image": _undecodable_image, "missing-label": _missing_label,
    "same-bytes-two-groups": _same_bytes_in_two_groups,
}  # fmt: skip


@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_slice_fault_is_one_line(fault: str, slices: Path) -> None:
    if fault == "missing-label":  # the clean set first, once
        clean = in_process_check(str(slices), "--bundle", "covid_ct_seg")
        assert clean.returncode == 0 and summary(clean, "slices").startswith("4 listed, in 2"), clean.stdout
    root, expected = FAULTS[fault](slices)
    result = in_process_check(str(root), "--bundle", "covid_ct_seg")
    assert result.returncode != 0
    lines = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), result.stdout
    assert summary(result, "result") == "1 problem(s)"


def test_training_on_a_faulty_slice_set_is_refused_before_anything_is_written(slices: Path, tmp_path: Path) -> None:
    root, expected = _label_of_another_shape(slices)
    models = tmp_path / "models"
    with pytest.raises(Exception) as info:
        run_bundle(REPO / "bundles" / "covid_ct_seg", "train", dataset_dir=str(root), ckpt_dir=str(models),
                   output_dir=str(models), epochs=1, fold=-1)  # fmt: skip
    error = find_medpipe_error(info.value)
    assert error is not None and "\n" not in str(error), info.value
    assert str(error) == (f"{root}: the data set check found 1 problem(s), first: {expected}; `medpipe dataset check "
                          f"{root} --bundle covid_ct_seg` lists them all")  # fmt: skip
    assert not models.exists()
