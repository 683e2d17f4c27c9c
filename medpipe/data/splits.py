"""Leakage-safe folds: whole groups (near-duplicates, patients, volumes) go to one side of every split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

SPLIT_MODES = ("group", "random")




def fold_indices(
    labels: Sequence[int], groups: Sequence[str], fold: int, num_folds: int, seed: int, mode: str = "group"
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of fold `fold` of a stratified K-fold; mode 'group' keeps every group on one side."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if mode not in SPLIT_MODES:
        raise MedpipeError(f"split_mode must be one of {SPLIT_MODES}, got '{mode}'")
    if not 0 <= fold < num_folds:
        raise MedpipeError(f"fold must be in 0..{num_folds - 1} (or -1 for all data), got {fold}")
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
    items: list[dict[str, Any]], fold: int, num_folds: int = 5, seed: int = 0, mode: str = "group"
) -> dict[str, list[dict[str, Any]]]:
    """{'train': [...], 'val': [...]} for one fold; fold -1 trains on everything and validates on nothing."""
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
