"""Which HU -> [0, 1] mapping makes real CT series look, to the model, like the development PNGs?

Label-free: for each candidate mapping (an HU window, or min-max per slice / per volume) the real series go through
volumetric inference's preprocessing (medpipe.transforms.ct_intensity.ct_to_model_slices: mapping, 256², 8-bit, CLAHE,
min-max), and the pooled intensity histogram of their slices between 20 % and 80 % of the z-range (the range the
development PNGs were cut from) is compared with that of all development PNGs by the 1-D Wasserstein distance.
The candidate with the smallest mean distance over the series wins. No label and no model output is used.

    python bundles/covid_ct_seg/scripts/intensity_match.py --out results/covid_ct_seg/intensity_match.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import wasserstein_distance

from medpipe.data.datalists import data_root, read_seg_datalist
from medpipe.files import atomic_write_text
from medpipe.io import ct
from medpipe.io.images import load_grey_2d
from medpipe.transforms.ct_intensity import ct_to_model_slices

CANDIDATES = ("lung", "minmax_slice", "minmax_volume")
SERIES = ("dicom/rider_pilot_chest_ct_0117", "covid_ct_md/P002")
BINS = np.linspace(0.0, 1.0, 257)
CENTRES = (BINS[:-1] + BINS[1:]) / 2


def histogram(values: np.ndarray) -> np.ndarray:
    counts, _ = np.histogram(values, bins=BINS)
    return counts.astype(np.float64)


def development_histogram(root: Path) -> tuple[np.ndarray, int]:
    items = read_seg_datalist(root / "covid_ct_seg")
    counts = np.zeros(len(CENTRES))
    for item in items:
        counts += histogram(load_grey_2d(item["image"]))  # as the training loader reads it: grey, min-max [0, 1]
    return counts, len(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/covid_ct_seg/intensity_match.json")
    args = parser.parse_args()
    root = data_root()
    reference, n_png = development_histogram(root)
    table: dict[str, dict[str, float]] = {}
    for series in SERIES:
        volume = ct.load_volume(root / series)
        for mode in CANDIDATES:
            slices = ct_to_model_slices(volume, mode)
            n = len(slices)
            central = slices[int(0.2 * n) : int(np.ceil(0.8 * n))]
            distance = wasserstein_distance(CENTRES, CENTRES, histogram(central), reference)
            table.setdefault(mode, {})[series] = round(float(distance), 5)
    for row in table.values():
        row["mean"] = round(float(np.mean([row[s] for s in SERIES])), 5)
    chosen = min(CANDIDATES, key=lambda m: table[m]["mean"])
    result = {
        "command": "python bundles/covid_ct_seg/scripts/intensity_match.py --out " + args.out,
        "development_pngs": n_png,
        "distance": "1-D Wasserstein between pooled 256-bin intensity histograms of model inputs in [0, 1]",
        "table": table,
        "chosen": chosen,
    }
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"{'mapping':>14} " + " ".join(f"{s.split('/')[-1]:>28}" for s in SERIES) + f" {'mean':>8}")
    for mode, row in table.items():
        print(f"{mode:>14} " + " ".join(f"{row[s]:>28.4f}" for s in SERIES) + f" {row['mean']:>8.4f}")
    print(f"chosen: {chosen} -> {args.out}")


if __name__ == "__main__":
    main()
