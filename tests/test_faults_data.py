"""Faults and bad input in data folders: a manifest, a splits file or a fold setting that cannot be trusted is one
line naming the first offender; files that are skipped are counted in a warning."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from medpipe.data.datalists import class_folder_datalists, inference_items, scan_class_folders, seg_datalists
from medpipe.data.splits import read_splits, split_items, write_splits
from medpipe.data.synthetic import make_synthetic_set
from medpipe.errors import MedpipeError

CLASSES = ["no", "yes"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_synthetic_set(tmp_path / "data", per_class=6, size=32)


def _manifest(root: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> None:
    with (root / "MANIFEST.csv").open("w", newline="", encoding=encoding) as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


def _one_line(call: Any, match: str) -> str:
    with pytest.raises(MedpipeError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def _paths(root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for c in CLASSES for p in sorted((root / c).glob("*.png"))]


def test_a_manifest_without_a_group_column_is_refused_for_a_group_split(folder: Path) -> None:
    """Issue #20 item 4: such a manifest was ignored without a word, so split_mode group became a random split."""
    _manifest(folder, ["path", "label"], [[p, p.split("/")[0]] for p in _paths(folder)])
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3), "no group column")
    assert len(class_folder_datalists(folder, CLASSES, 0, 3, split_mode="random")["val"]) == 4


def test_a_manifest_without_a_path_column_is_refused(folder: Path) -> None:
    _manifest(folder, ["file", "group"], [[p, "g"] for p in _paths(folder)])
    _one_line(lambda: scan_class_folders(folder, CLASSES), "no 'path' column")


def test_manifest_rows_naming_missing_files_or_contradicting_labels_are_refused(folder: Path) -> None:
    rows = [[p, p.split("/")[0], p] for p in _paths(folder)]
    _manifest(folder, ["path", "label", "group"], rows + [["yes/gone.png", "yes", "x"], ["no/gone.png", "no", "y"]])
    message = _one_line(lambda: scan_class_folders(folder, CLASSES), "names 2 file.s. that do not exist")
    assert "first: 'yes/gone.png'" in message
    rows[0][1], rows[7][1] = "yes", "no"  # no/… labelled yes, yes/… labelled no
    _manifest(folder, ["path", "label", "group"], rows)
    message = _one_line(lambda: scan_class_folders(folder, CLASSES), "gives 2 file.s. a label that contradicts")
    assert f"first: '{rows[0][0]}' labelled 'yes'" in message


def test_a_manifest_that_is_not_utf8_is_one_line(folder: Path) -> None:
    _manifest(folder, ["path", "group"], [[p, "Größe"] for p in _paths(folder)], encoding="latin-1")
    _one_line(lambda: scan_class_folders(folder, CLASSES), "is not UTF-8")


def test_images_a_grouping_manifest_leaves_out_are_counted(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = _paths(folder)
    _manifest(folder, ["path", "near_duplicate_group"], [[p, "g1" if i < 2 else ""] for i, p in enumerate(paths[3:])])
    with caplog.at_level(logging.WARNING, logger="medpipe.data.datalists"):
        items = scan_class_folders(folder, CLASSES)
    assert "3 image(s)" in caplog.text and f"first: '{paths[0]}'" in caplog.text
    assert {it["group"] for it in items if it["path"] in paths[3:5]} == {"g1"}


def test_the_real_brain_manifest_still_passes(brain_yes_no: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medpipe.data.datalists"):
        split = class_folder_datalists(brain_yes_no, CLASSES, 0, 5)
    assert len(split["train"]) + len(split["val"]) == 202 and not caplog.text


def test_unsupported_files_beside_images_are_counted_in_a_warning(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (folder / "yes" / "notes.txt").write_text("x")
    (folder / "no" / "anim.gif").write_bytes(b"GIF89a")
    with caplog.at_level(logging.WARNING, logger="medpipe.data.datalists"):
        items = inference_items(folder)
    assert len(items) == 12
    assert "skipped 3 file(s)" in caplog.text  # README.txt of the synthetic set, notes.txt, anim.gif
    _one_line(lambda: scan_class_folders(folder, CLASSES), "is not an image file")  # training folders stay strict


@pytest.mark.parametrize(
    ("fold", "num_folds", "message"),
    [("x", 5, "fold must be an integer"), (0, "five", "num_folds must be an integer"), (0, 1, "at least 2"),
     (5, 5, "fold must be in 0..4"), (-2, 5, "fold must be in 0..4"), (None, 5, "fold must be an integer")],
)  # fmt: skip
def test_bad_fold_settings_are_one_line(folder: Path, fold: Any, num_folds: Any, message: str) -> None:
    items = scan_class_folders(folder, CLASSES)
    _one_line(lambda: split_items(items, fold, num_folds), message)
    _one_line(lambda: class_folder_datalists(folder, CLASSES, fold, num_folds), message)


def test_fold_settings_given_as_text_are_read_as_numbers(folder: Path) -> None:
    items = scan_class_folders(folder, CLASSES)
    assert split_items(items, "1", "3") == split_items(items, 1, 3)


def _seg_folder(root: Path, volumes: int = 4, slices: int = 2) -> Path:
    import numpy as np
    from PIL import Image

    entries = []
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for v in range(volumes):
        for s in range(slices):
            name = f"{'coronacases' if v % 2 else 'radiopaedia'}_{v:03d}_{s}.png"
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / name)
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "labels" / name)
            entries.append({"image": f"images/{name}", "label": f"labels/{name}", "volume_group": name[:-6]})
    (root / "datalist.json").write_text(json.dumps({"training": entries}))
    return root


def test_splits_json_reproduces_every_fold_and_is_read_back(folder: Path, tmp_path: Path) -> None:
    seg = _seg_folder(tmp_path / "seg")
    for name, folds, datalists in (
        ("class", 3, lambda k, f=None: class_folder_datalists(folder, CLASSES, k, 3, seed=1, splits_file=f)),
        ("seg", 2, lambda k, f=None: seg_datalists(seg, k, 2, splits_file=f)),
    ):
        computed = [datalists(k) for k in range(folds)]
        path = write_splits(computed, tmp_path / f"{name}.json", {"split_mode": "group", "seed": 1})
        assert read_splits(path)["meta"]["num_folds"] == folds
        for k in range(folds):
            read = datalists(k, str(path))
            assert [it["path"] for it in read["val"]] == [it["path"] for it in computed[k]["val"]]
            assert [it["path"] for it in read["train"]] == [it["path"] for it in computed[k]["train"]]
        assert len(datalists(-1, str(path))["train"]) == sum(len(c["val"]) for c in computed)


def test_a_splits_file_that_does_not_fit_the_folder_is_one_line(folder: Path, tmp_path: Path) -> None:
    computed = [class_folder_datalists(folder, CLASSES, k, 3) for k in range(3)]
    path = write_splits(computed, tmp_path / "splits.json", {"split_mode": "group"})
    good = json.loads(path.read_text())

    def case(edit: Any, message: str, num_folds: int = 3) -> None:
        bad = json.loads(json.dumps(good))
        edit(bad)
        path.write_text(json.dumps(bad))
        _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, num_folds, splits_file=str(path)), message)

    case(lambda s: s["folds"][1]["val"].append("yes/ghost.png"), "names 1 id.s. not in the data folder .first: 'yes/")
    case(lambda s: s["folds"][2]["val"].pop(0), "1 item.s. of the data folder are in no val fold")
    case(lambda s: s["folds"][2]["val"].append(s["folds"][0]["val"][0]), "is held out in folds 0 and 2")
    case(lambda s: s["folds"][0]["train"].pop(), "fold 0's train list must hold exactly")
    case(lambda s: None, "has 3 folds but num_folds is 4", num_folds=4)
    case(lambda s: s["meta"].update(fingerprint="0" * 64), "labels or groups changed")
    case(lambda s: s.update(folds=s["folds"][:1]), "at least 2")
    path.write_bytes(b"\xff\xfe not json")
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3, splits_file=str(path)), "not UTF-8 JSON")
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3, splits_file=str(tmp_path / "no.json")),
              "not found")  # fmt: skip
    (folder / "yes" / "synthetic_yes_099.png").write_bytes((folder / "yes" / "synthetic_yes_000.png").read_bytes())
    path.write_text(json.dumps(good))
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3, splits_file=str(path)),
              "1 item.s. of the data folder are in no val fold .first: 'yes/synthetic_yes_099.png'")  # fmt: skip


def test_a_splits_file_whose_groups_now_cross_is_refused(folder: Path, tmp_path: Path) -> None:
    computed = [class_folder_datalists(folder, CLASSES, k, 3) for k in range(3)]
    path = write_splits(computed, tmp_path / "splits.json", {"split_mode": "group"})
    val0, train0 = computed[0]["val"][0]["path"], computed[0]["train"][0]["path"]
    rows = [[p, "g" if p in (val0, train0) else ""] for p in _paths(folder)]
    _manifest(folder, ["path", "near_duplicate_group"], rows)  # two images of different folds are now one group
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(read_splits(path)["folds"]))  # nnU-Net's bare list: no fingerprint to compare
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3, splits_file=str(bare)),
              "fold 0 has group 'g' on both sides")  # fmt: skip
    _one_line(lambda: class_folder_datalists(folder, CLASSES, 0, 3, splits_file=str(path)), "fold 0 has group")
