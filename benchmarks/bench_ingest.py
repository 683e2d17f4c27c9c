"""Benchmark: medpipe DICOM series load/ingest against MONAI LoadImage(reader="ITKReader"), same folder, same run.

    python benchmarks/bench_ingest.py [--folder DIR] [--repeats 5]

Runs alternate (medpipe, ITK, medpipe, ...) after one warm-up each, so both see the same file cache; imports are not
timed. "load" is scan + validate + decode to an HU array (what LoadImage does); "ingest" adds writing the .nii.gz and
JSON sidecar. Target: ingest ≤ 2 s on 2 cores and load no slower than ITK.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from medpipe.io import dicom, ingest

DEFAULT = Path(os.environ.get("MEDPIPE_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
DEFAULT_FOLDER = DEFAULT / "dicom" / "rider_pilot_chest_ct_0117"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # the folder's README/MANIFEST are skipped with a warning each run

    from monai.transforms import LoadImage  # torch + ITK import: seconds, not part of the timing

    itk_load = LoadImage(reader="ITKReader", image_only=True)
    out = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    runs: dict[str, Callable[[], object]] = {
        "medpipe load": lambda: dicom.load_series(args.folder),
        "medpipe ingest (+ write .nii.gz)": lambda: ingest.ingest(args.folder, out),
        "monai LoadImage(ITKReader)": lambda: itk_load(str(args.folder)),
    }
    mine, reference = runs["medpipe load"](), runs["monai LoadImage(ITKReader)"]()  # warm-up, and a sanity check
    assert np.array_equal(mine.array, np.asarray(reference)), "medpipe and ITK disagree on the voxels"
    runs["medpipe ingest (+ write .nii.gz)"]()

    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn)[0])

    n_files = len(mine.source_files)
    print(f"{args.folder} ({n_files} slices, shape {mine.array.shape}), {args.repeats} repeats, {os.cpu_count()} CPUs")
    for name, values in times.items():
        print(f"  {name:34s} median {statistics.median(values):6.3f} s   min {min(values):6.3f} s")
    ratio = statistics.median(times["medpipe load"]) / statistics.median(times["monai LoadImage(ITKReader)"])
    print(f"  ratio medpipe load / ITK (median): {ratio:.2f}  ({'faster' if ratio < 1 else 'slower'} than ITK)")


if __name__ == "__main__":
    main()
