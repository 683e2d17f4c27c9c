"""A variant of the real-data CT model that tests/test_seg_real_dicom.py trains (issue #28: could a cheaper one keep
the module's floors?): trains it exactly as the `ct_model` fixture does, with the given overrides, and prints the
figures the module asserts on (P002 slice AUC, RIDER infection mL, lung volumes, RIDER's smaller side, RIDER lung
inside the body) and the training seconds.

    OMP_NUM_THREADS=1 MEDPIPE_DATA=../shared/data python benchmarks/ct_test_model.py --work /tmp/fx --name B0
    OMP_NUM_THREADS=1 MEDPIPE_DATA=../shared/data python benchmarks/ct_test_model.py --work /tmp/fx --name F2 \
        patch_size=48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_seg_real_dicom import BUNDLE, CT_MODEL, INFERENCE, body_hull  # noqa: E402

from conftest import real_dataset  # noqa: E402
from medpipe.bundle.config import run_bundle  # noqa: E402
from medpipe.evaluation.real_dicom import read_slice_labels, slice_label_figures  # noqa: E402
from medpipe.io import ct  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the models (one sub-folder per name)")
    parser.add_argument("--name", required=True)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE over the fixture's recipe (e.g. max_cases=650)")
    args = parser.parse_args()
    extra = {k: int(v) if v.lstrip("-").isdigit() else v for k, v in (a.split("=", 1) for a in args.overrides)}
    root, data = args.work / args.name, real_dataset("covid_ct_seg")
    start = time.perf_counter()
    run_bundle(BUNDLE, "train", None, dataset_dir=str(data), ckpt_dir=str(root), output_dir=str(root / "train"),
               fold=-1, val_interval=1000, **{**CT_MODEL, **extra})  # fmt: skip
    train_s = time.perf_counter() - start
    p002, rider = real_dataset("covid_ct_md") / "P002", real_dataset("dicom") / "rider_pilot_chest_ct_0117"
    out = root / "inference"
    run_bundle(BUNDLE, "inference", None, input=[str(p002), str(rider)], output_dir=str(out), dataset_dir=str(data),
               ckpt_dir=str(root), fold=-1, **INFERENCE)  # fmt: skip
    by_name = {Path(v["input"]).name: v for v in json.loads((out / "report.json").read_text())["volumes"]}
    volume = ct.load_volume(p002)
    mask = np.asarray(nib.load(out / by_name["P002"]["files"]["seg"]).dataobj)
    labels = read_slice_labels(p002.parent / "slice_labels.csv")
    figures = slice_label_figures(mask, volume.affine, volume.source_files, labels)
    entry, rider_volume = by_name[rider.name], ct.load_volume(rider)
    lung = np.asarray(nib.load(out / entry["files"]["seg"]).dataobj)[:, :, ::6] >= 1  # as the test samples it
    body = np.stack([body_hull(rider_volume.array[:, :, k]) for k in range(0, rider_volume.array.shape[2], 6)], axis=2)
    result = {
        "name": args.name, "overrides": extra, "train_s": round(train_s, 1), "p002_auc": figures["slice_auc"],
        "rider_infection_ml": entry["infection_volume_ml"],
        "lungs_ml": {k: v["lung_volume_ml"] for k, v in by_name.items()},
        "rider_smaller_side": min(entry["lung_right_ml"], entry["lung_left_ml"]) / entry["lung_volume_ml"],
        "rider_lung_inside_body": float((lung & body).sum() / lung.sum()),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
