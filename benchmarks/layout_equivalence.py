"""The shipped covid_ct_seg PNG slices and the same data as an nnU-Net raw folder give the same CV (issue #30).

One run, same recipe, same folds, one after the other:
1. `medpipe dataset convert` the PNG set to an nnU-Net raw folder (the slices of each volume group stacked in
   source_index order; channel `CLAHE`, so the volume path z-scores each volume, as nnU-Net would);
2. `medpipe cv covid_ct_seg` on the PNG slices (their own 5-fold partition by volume group);
3. the same partition by case (an nnU-Net-style splits_final.json: the volume groups of each fold), and
   `medpipe cv covid_ct_seg` on the nnU-Net folder with it (`--splits`);
4. both runs' pooled per-volume Dice (infection, lung) with their bootstrap CIs, and the per-volume paired differences.

The rule, written before either run was scored: the two paths are equivalent when, for infection and lung Dice per
volume (pooled out of fold, 11 volumes), each path's mean lies inside the other's 95 % CI.

The recipe is the bundle's default network at half resolution for 15 epochs (the real-data test model's recipe), so
that both CVs fit one session on 2 CPU cores; it compares the two data paths, not the recipe's best figures (those are
the results log's full CVs).

    OMP_NUM_THREADS=2 MEDPIPE_DATA=/work/shared/data python benchmarks/layout_equivalence.py \
        --work /tmp/layout_equivalence --json results/covid_ct_seg/layout_equivalence.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RECIPE = ["--epochs", "15", "--image_size", "128", "--patch_size", "64"]
METRICS = ("dice_infection", "dice_lung")


def medpipe(*args: str, log: Path) -> float:
    """Run one medpipe command (its output to `log`), stop the benchmark if it fails; seconds taken."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "medpipe", *args], stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"medpipe {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def case_splits(png_run: Path, datalist: Path, out: Path) -> Path:
    """The PNG run's partition by volume group, as nnU-Net's splits_final.json lists cases."""
    items = json.loads(datalist.read_text())["training"]
    group = {str(it["image"]): str(it["volume_group"]) for it in items}
    folds = json.loads((png_run / "splits.json").read_text())["folds"]
    cases = [{k: sorted({group[i] for i in f[k]}) for k in ("train", "val")} for f in folds]
    out.write_text(json.dumps(cases, indent=1))
    return out


def per_volume(run: Path) -> dict[str, dict[str, float]]:
    """{volume group: {metric: value}} over the run's fold folders (each volume is held out by one fold)."""
    rows: dict[str, dict[str, float]] = {}
    for path in sorted(run.glob("fold*/per_volume.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                rows[row["volume_group"]] = {m: float(row[m]) for m in METRICS}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a new folder for the converted data and both runs")
    parser.add_argument("--json", type=Path, help="write the comparison here")
    args = parser.parse_args()
    source = Path(os.environ["MEDPIPE_DATA"]) / "covid_ct_seg"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=False)
    raw = work / "Dataset601_CovidCT"
    seconds = {"convert": medpipe("dataset", "convert", str(source), str(raw), "--to", "nnunet",
                                  log=work / "convert.log")}  # fmt: skip
    seconds["cv_png"] = medpipe("cv", "covid_ct_seg", "--out", str(work / "png"), "--dataset_dir", str(source),
                                *RECIPE, log=work / "cv_png.log")  # fmt: skip
    splits = case_splits(work / "png", source / "datalist.json", work / "splits_final.json")
    seconds["cv_nnunet"] = medpipe("cv", "covid_ct_seg", "--out", str(work / "nnunet"), "--dataset_dir", str(raw),
                                   "--splits", str(splits), *RECIPE, log=work / "cv_nnunet.log")  # fmt: skip

    runs = {name: json.loads((work / name / "cv_summary.json").read_text()) for name in ("png", "nnunet")}
    pooled = {name: s["pooled_out_of_fold"]["per_volume"] for name, s in runs.items()}
    volumes = {name: per_volume(work / name) for name in runs}
    if set(volumes["png"]) != set(volumes["nnunet"]):
        raise SystemExit(f"the runs scored other volumes: {sorted(volumes['png'])} vs {sorted(volumes['nnunet'])}")
    result: dict[str, Any] = {"recipe": " ".join(RECIPE), "seconds": {k: round(v, 1) for k, v in seconds.items()},
                              "volumes": len(volumes["png"]), "metrics": {}}  # fmt: skip
    print(f"{'metric':16s} {'PNG slices':>26s} {'nnU-Net raw folder':>26s}  mean paired diff  equivalent")
    for metric in METRICS:
        a, b = pooled["png"][metric], pooled["nnunet"][metric]
        inside = a["ci95"][0] <= b["value"] <= a["ci95"][1] and b["ci95"][0] <= a["value"] <= b["ci95"][1]
        diffs = [volumes["nnunet"][v][metric] - volumes["png"][v][metric] for v in sorted(volumes["png"])]
        result["metrics"][metric] = {"png": a, "nnunet": b, "paired_diff_mean": sum(diffs) / len(diffs),
                                     "paired_diff_per_volume": dict(zip(sorted(volumes["png"]), diffs, strict=True)),
                                     "equivalent": inside}  # fmt: skip
        print(f"{metric:16s} {a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]      "
              f"{b['value']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]      {sum(diffs) / len(diffs):+.3f}"
              f"          {'yes' if inside else 'NO'}")  # fmt: skip
    print(f"seconds: {result['seconds']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
