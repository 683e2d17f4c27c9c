"""Datalists and splits: group-aware folds never put a duplicate group on both sides."""

from __future__ import annotations

from pathlib import Path

import pytest

from medpipe.data.datalists import cap_items, inference_items, scan_class_folders
from medpipe.data.splits import split_items
from medpipe.data.synthetic import make_synthetic_set
from medpipe.errors import MedpipeError


def _groups(items: list[dict]) -> set[str]:
    return {it["group"] for it in items}


def test_real_manifest_groups_never_cross_folds(brain_yes_no: Path) -> None:
    items = scan_class_folders(brain_yes_no, ["no", "yes"])
    assert len(items) == 202
    assert sum(it["label"] for it in items) == 124
    assert len(_groups(items)) < len(items), "MANIFEST near_duplicate_group must merge copies"
    seen_val: list[str] = []
    for fold in range(5):
        split = split_items(items, fold, 5, seed=0, mode="group")
        assert not _groups(split["train"]) & _groups(split["val"])
        assert len(split["train"]) + len(split["val"]) == len(items)
        seen_val += [it["path"] for it in split["val"]]
    assert sorted(seen_val) == sorted(it["path"] for it in items), "every image is validated exactly once"


def test_random_split_leaks_duplicates_on_real_data(brain_yes_no: Path) -> None:
    """The paper's protocol: with ~50 duplicated images, a random split puts copies on both sides."""
    items = scan_class_folders(brain_yes_no, ["no", "yes"])
    leaks = sum(
        len(_groups(s["train"]) & _groups(s["val"]))
        for s in (split_items(items, k, 5, seed=0, mode="random") for k in range(5))
    )
    assert leaks > 0


def test_fold_minus_one_trains_on_everything(tmp_path: Path) -> None:
    items = scan_class_folders(make_synthetic_set(tmp_path, per_class=5, size=32), ["no", "yes"])
    split = split_items(items, -1)
    assert split["val"] == [] and len(split["train"]) == 10


def test_bad_fold_and_mode(tmp_path: Path) -> None:
    items = scan_class_folders(make_synthetic_set(tmp_path, per_class=5, size=32), ["no", "yes"])
    with pytest.raises(MedpipeError, match="fold must be in 0..4"):
        split_items(items, 7, 5)
    with pytest.raises(MedpipeError, match="split_mode"):
        split_items(items, 0, 5, mode="patient")
    with pytest.raises(MedpipeError, match="at least 6 images of every class"):
        split_items(items, 0, 6)


def test_cap_items_is_balanced_and_seeded(tmp_path: Path) -> None:
    items = scan_class_folders(make_synthetic_set(tmp_path, per_class=10, size=32), ["no", "yes"])
    capped = cap_items(items, 6, seed=1)
    assert [it["label"] for it in capped].count(0) == 3 and len(capped) == 6
    assert capped == cap_items(items, 6, seed=1)
    assert cap_items(items, -1) is items


def test_inference_items_folder_file_and_list(tmp_path: Path) -> None:
    root = make_synthetic_set(tmp_path, per_class=2, size=32)
    assert len(inference_items(root)) == 4  # README.txt is not an image and is skipped in folders
    one = root / "yes" / "synthetic_yes_000.png"
    assert inference_items(str(one))[0]["image"] == str(one)
    assert len(inference_items([one, root / "no" / "synthetic_no_000.png"])) == 2
    with pytest.raises(MedpipeError, match="does not exist"):
        inference_items(tmp_path / "missing.png")
    with pytest.raises(MedpipeError, match="not a supported image"):
        inference_items(root / "README.txt")
