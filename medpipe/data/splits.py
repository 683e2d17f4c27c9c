"""Leakage-safe folds: whole groups (near-duplicates, patients, volumes) go to one side of every split.

A partition can also be written once as `splits.json` (nnU-Net's `splits_final.json` idea) and read back by every fold
job, rescoring and ensembling: `{"meta": {...}, "folds": [{"train": [ids], "val": [ids]}, ...]}`, where an id is an
item's `path` (relative to the data set folder) and `meta` records num_folds, split_mode, seed and a fingerprint of
the items (ids, labels, groups). nnU-Net's bare list of folds is read too."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.files import atomic_write_text
from medpipe.values import whole_number

SPLIT_MODES = ("group", "random")


def check_fold(fold: Any, num_folds: Any) -> tuple[int, int]:
    """(fold, num_folds) as ints; MedpipeError in one line when non-numeric or out of range (fold -1: all data)."""
    fold, num_folds = whole_number("fold", fold), whole_number("num_folds", num_folds)
    if fold == -1:
        return fold, num_folds
    if num_folds < 2:
        raise MedpipeError(f"num_folds must be at least 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise MedpipeError(f"fold must be in 0..{num_folds - 1} (or -1 for all data), got {fold}")
    return fold, num_folds


def fold_indices(
    labels: Sequence[int], groups: Sequence[str], fold: int, num_folds: int, seed: int, mode: str = "group"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold `fold` of a stratified K-fold; mode 'group' keeps every group on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if mode not in SPLIT_MODES:
        raise MedpipeError(f"split_mode must be one of {SPLIT_MODES}, got '{mode}'")
    fold, num_folds = check_fold(fold, num_folds)
    if fold == -1:
        raise MedpipeError("fold -1 (all data) has no held-out part to index")
    labels_arr, idx = np.asarray(labels), np.arange(len(labels))
    if mode == "group":
        splitter = StratifiedGroupKFold(n_splits=num_folds, shuffle=True, random_state=seed)
        splits = splitter.split(idx, labels_arr, groups=np.asarray(groups))
    else:  # the paper's (leaky) protocol, kept to measure how much duplicates inflate scores
        splits = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed).split(idx, labels_arr)
    for k, (train_idx, val_idx) in enumerate(splits):
        if k == fold:
            return train_idx, val_idx
    raise AssertionError("unreachable")


def split_items(
    items: list[dict[str, Any]], fold: Any, num_folds: Any = 5, seed: int = 0, mode: str = "group",
    splits_file: str | Path | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """{'train': [...], 'val': [...]} for one fold; fold -1 trains on everything and validates on nothing.

    With `splits_file`, the fold's lists come from that file (see apply_splits) instead of being computed."""
    fold, num_folds = check_fold(fold, num_folds)
    if splits_file:
        return apply_splits(items, splits_file, fold, num_folds)
    if fold == -1:
        return {"train": list(items), "val": []}
    labels = [it["label"] for it in items]
    counts = np.bincount(labels)
    if len(counts) < 2 or counts.min() < num_folds:
        raise MedpipeError(
            f"{num_folds}-fold split needs at least {num_folds} images of every class (class counts {counts.tolist()})"
        )
    train_idx, val_idx = fold_indices(labels, [it["group"] for it in items], fold, num_folds, seed, mode)
    return {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}


def _shuffled_by(items: list[dict[str, Any]], key: str, seed: int) -> dict[Any, list[dict[str, Any]]]:
    """Items bucketed by `items[i][key]`, each bucket in one seeded random order."""
    buckets: dict[Any, list[dict[str, Any]]] = {}
    for i in np.random.default_rng(seed).permutation(len(items)):
        buckets.setdefault(items[i][key], []).append(items[i])
    return buckets


# ------------------------------------------------------------------------------------------------------ splits.json


def items_fingerprint(items: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over the items' ids, class labels and groups: changes when the data a partition was made on changes."""
    lines = sorted(
        f"{it['path']}\t{it['label'] if isinstance(it.get('label'), (int, np.integer)) else ''}\t{it.get('group', '')}"
        for it in items
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def write_splits(
    items_by_fold: Sequence[Mapping[str, Sequence[Mapping[str, Any]]]], path: str | Path,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `splits.json` from each fold's datalists ({'train': items, 'val': items}), checked like a read one."""
    folds = [{"train": [str(it["path"]) for it in f["train"]], "val": [str(it["path"]) for it in f["val"]]}
             for f in items_by_fold]  # fmt: skip
    items = list(items_by_fold[0]["train"]) + list(items_by_fold[0]["val"]) if items_by_fold else []
    splits = {"meta": {**(meta or {}), "num_folds": len(folds), "n_items": len(items),
                       "fingerprint": items_fingerprint(items)}, "folds": folds}  # fmt: skip
    _check_partition(splits, items, str(path))
    return atomic_write_text(path, json.dumps(splits, indent=1))


def read_splits(path: str | Path) -> dict[str, Any]:
    """{'meta': {...}, 'folds': [{'train': [ids], 'val': [ids]}, ...]} from a splits file; one line when malformed."""
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"splits file '{path}' not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedpipeError(f"splits file '{path}' is not UTF-8 JSON: {exc}") from exc
    if isinstance(data, list):  # nnU-Net's splits_final.json: a bare list of folds
        data = {"meta": {}, "folds": data}
    folds = data.get("folds") if isinstance(data, dict) else None
    shape_ok = isinstance(folds, list) and len(folds) >= 2 and all(
        isinstance(f, dict) and all(isinstance(f.get(k), list) for k in ("train", "val")) for f in folds
    )
    if not shape_ok:
        raise MedpipeError(f"splits file '{path}' must hold 'folds': a list of at least 2 {{train: [ids], val: [ids]}}")
    return {"meta": data.get("meta") or {}, "folds": [{k: [str(i) for i in f[k]] for k in ("train", "val")}
                                                      for f in folds]}  # fmt: skip


def by_case(splits: dict[str, Any], items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A splits file that lists cases (groups) rather than items, as nnU-Net's splits_final.json lists its cases, with
    each case replaced by its items (a volume layout's slices); any other file as it is."""
    members: dict[str, list[str]] = {}
    for it in items:  # a volume layout's case is its volume_group (its group is the patient where one is named)
        members.setdefault(str(it.get("volume_group", it.get("group"))), []).append(str(it["path"]))
    listed = {i for f in splits["folds"] for k in ("train", "val") for i in f[k]}
    if not listed or listed & {str(it["path"]) for it in items} or not listed <= members.keys():
        return splits
    folds = [{k: [i for case in f[k] for i in members[case]] for k in ("train", "val")} for f in splits["folds"]]
    return {**splits, "folds": folds}


def _check_partition(splits: Mapping[str, Any], items: Sequence[Mapping[str, Any]], where: str) -> None:
    """Every id names an item, every item is validated in exactly one fold, train = the rest, groups never cross."""
    ids = [str(it["path"]) for it in items]
    if len(set(ids)) != len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise MedpipeError(f"item id '{twice}' occurs twice in the data: ids (paths) must be unique for a splits file")
    known = set(ids)
    listed = [i for f in splits["folds"] for k in ("val", "train") for i in f[k]]
    unknown = [i for i in listed if i not in known]
    if unknown:
        raise MedpipeError(f"{where}: names {len(set(unknown))} id(s) not in the data folder (first: '{unknown[0]}')")
    val_fold: dict[str, int] = {}
    for k, fold in enumerate(splits["folds"]):
        for i in fold["val"]:
            if i in val_fold:
                raise MedpipeError(f"{where}: '{i}' is held out in folds {val_fold[i]} and {k}; each item in one fold")
            val_fold[i] = k
    unplaced = [i for i in ids if i not in val_fold]
    if unplaced:
        raise MedpipeError(f"{where}: {len(unplaced)} item(s) of the data folder are in no val fold "
                           f"(first: '{unplaced[0]}'): the data changed since the file was written")  # fmt: skip
    group = {str(it["path"]): it.get("group") for it in items}
    for k, fold in enumerate(splits["folds"]):
        val, train = set(fold["val"]), set(fold["train"])
        if train & val or train | val != known:
            raise MedpipeError(f"{where}: fold {k}'s train list must hold exactly the items not in its val list")
        if splits["meta"].get("split_mode", "group") == "group":
            crossing = sorted({group[i] for i in val} & {group[i] for i in train})
            if crossing:
                raise MedpipeError(
                    f"{where}: fold {k} has group '{crossing[0]}' on both sides ({len(crossing)} group(s)); "
                    "the groups changed since the file was written (or set meta.split_mode 'random')"
                )
    expected = splits["meta"].get("fingerprint")
    if expected and expected != items_fingerprint(items):
        raise MedpipeError(f"{where}: the data's labels or groups changed since the file was written "
                           "(fingerprint differs); write a new partition")  # fmt: skip


def apply_splits(
    items: list[dict[str, Any]], splits_file: str | Path, fold: int, num_folds: int
) -> dict[str, list[dict[str, Any]]]:
    """{'train', 'val'} of fold `fold` as `splits_file` lists them, in the items' own order (fold -1: all train).

    The file must fit the data exactly (every id exists, every item held out once, num_folds agrees), else one line
    naming the first offender: a partition that silently drops or adds images would change what a fold scores."""
    splits = by_case(read_splits(splits_file), items)
    where = f"splits file '{splits_file}'"
    if len(splits["folds"]) != num_folds:
        raise MedpipeError(f"{where} has {len(splits['folds'])} folds but num_folds is {num_folds}: "
                           f"set --num_folds {len(splits['folds'])}")  # fmt: skip
    _check_partition(splits, items, where)
    if fold == -1:
        return {"train": list(items), "val": []}
    val = set(splits["folds"][fold]["val"])
    return {"train": [it for it in items if str(it["path"]) not in val],
            "val": [it for it in items if str(it["path"]) in val]}  # fmt: skip
