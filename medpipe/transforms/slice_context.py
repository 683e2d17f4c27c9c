"""2.5-D input: the neighbouring slices of each 2-D slice as extra channels.

A slice's context is the `k` slices centred on it within its own volume group, in `source_index` order (file order
when a datalist has no index); ends repeat the end slice and no context ever crosses into another volume group.
Volumetric inference stacks the same neighbours from the 3-D volume (`stack_context`), so training and inference
see the same channels.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError

CONTEXT_KEY = "context"
VOLUME_SLICE_KEY = "slice"  # an item cut from a 3-D volume (medpipe.data.layouts): its axial slice index


def check_context_slices(k: int) -> int:
    """k must be odd (centred on the slice) and positive."""
    k = int(k)
    if k < 1 or k % 2 == 0:
        raise MedpipeError(f"context_slices must be an odd number ≥ 1 (1 = plain 2-D), got {k}")
    return k


def neighbour_offsets(k: int) -> range:
    """Offsets -k//2 … k//2 of a centred k-slice window."""
    half = check_context_slices(k) // 2
    return range(-half, half + 1)


def add_slice_context(items: Sequence[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """Copies of `items` with `context`: the image paths of the k slices centred on each (k = 1: items unchanged).

    Items cut from a 3-D volume (a `slice` key, medpipe.data.layouts) are copied as they are: their neighbours are
    taken from the volume when it is read (medpipe.transforms.volume_slices)."""
    offsets = neighbour_offsets(k)
    if k == 1:
        return [dict(it) for it in items]
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if VOLUME_SLICE_KEY not in item:
            by_group[str(item.get("group", item.get("volume_group", "")))].append(i)
    out = [dict(it) for it in items]
    for members in by_group.values():
        ordered = sorted(members, key=lambda i: (_index(items[i]), i))
        last = len(ordered) - 1
        for pos, i in enumerate(ordered):
            out[i][CONTEXT_KEY] = [str(items[ordered[min(max(pos + d, 0), last)]]["image"]) for d in offsets]
    return out


def with_slice_context(datalists: Mapping[str, Sequence[Mapping[str, Any]]], k: int) -> dict[str, list[dict]]:
    """`add_slice_context` on every list of a {'train', 'val', 'test'} datalists dict (folds keep volumes whole)."""
    return {name: add_slice_context(items, k) for name, items in datalists.items()}


def stack_context(slices: np.ndarray, k: int, which: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) slices of one volume, in order → (n, k, H, W): each slice of `which` (default all) with its
    neighbours, ends repeated."""
    n = len(slices)
    centre = np.arange(n) if which is None else np.asarray(which)
    index = np.clip(centre[:, None] + np.asarray(list(neighbour_offsets(k)))[None, :], 0, n - 1)
    return slices[index]


def _index(item: Mapping[str, Any]) -> float:
    value = item.get("source_index")
    try:
        return float(value) if value is not None else float("inf")
    except (TypeError, ValueError) as exc:
        raise MedpipeError(f"'{item.get('image')}': source_index must be a number, got {value!r}") from exc
