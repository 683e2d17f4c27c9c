"""covid_ct_seg side by side with nnU-Net v2 on the same data, the same fold and the same CPU budget (issue #30).

One run: converts the shipped PNG set to an nnU-Net raw folder (`medpipe dataset convert`), runs nnU-Net's own
planning and preprocessing (`nnUNetv2_plan_and_preprocess -c 2d --verify_dataset_integrity`), writes nnU-Net's
splits_final.json with the fold of a medpipe fold folder (its held-out volumes, per_volume.csv), trains nnU-Net's
2d configuration for the wall time medpipe's training of that fold took (benchmarks/nnunet_side.py: nnU-Net's
trainer, epoch count fitted to the budget), predicts the held-out volumes with nnU-Net's predictor, and prints both
per-volume Dice tables (infection, lung; pixels pooled per volume, as medpipe's evaluation) and the time per epoch
and per volume of both.

nnU-Net runs in its own venv (it pins packages medpipe does not):
    python -m venv .venv-nnunet && .venv-nnunet/bin/pip install torch==2.13.0 nnunetv2
    OMP_NUM_THREADS=2 MEDPIPE_DATA=/work/shared/data python benchmarks/bench_nnunet.py \
        --medpipe-fold results/covid_ct_seg/v3_base/fold0 --work /tmp/nnunet_bench \
        --json results/covid_ct_seg/nnunet.json

medpipe's side is read from the fold folder: per_volume.csv (its evaluation: the bundle defaults, TTA and
post-processing) and train.log (ignite's "Epoch[k] Complete. Time taken" and "Engine run finished" lines).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET_ID, DATASET_NAME = 501, "CovidCTSeg"
LABELS = {"lung": (1, 2), "infection": (2,)}  # lung = lung not infected + infection, as the bundle scores it


def _seconds(text: str) -> float:
    h, m, s = text.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def medpipe_side(fold: Path) -> dict[str, Any]:
    log = (fold / "train.log").read_text()
    epochs = [_seconds(t) for t in re.findall(r"Epoch\[\d+\] Complete\. Time taken: ([\d:.]+)", log)]
    total = re.findall(r"Engine run finished\. Time taken: ([\d:.]+)", log)
    if not epochs or not total:
        raise SystemExit(f"{fold / 'train.log'}: no ignite epoch times in it (save the training's log there)")
    with open(fold / "per_volume.csv") as f:
        rows = list(csv.DictReader(f))
    # the budget: epochs x the median epoch, so that another job slowing some epochs does not lengthen it
    return {"train_s": _seconds(total[0]), "epochs": len(epochs), "epoch_s_median": statistics.median(epochs),
            "budget_s": round(len(epochs) * statistics.median(epochs), 1),
            "dice": {r["volume_group"]: {"infection": float(r["dice_infection"]), "lung": float(r["dice_lung"])}
                     for r in rows}}  # fmt: skip


def run(cmd: list[str], env: dict[str, str]) -> str:
    print("$", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{cmd[0]} failed ({done.returncode})")
    return done.stdout


def dice(pred: np.ndarray, true: np.ndarray, values: tuple[int, ...]) -> float:
    p, t = np.isin(pred, values), np.isin(true, values)
    denominator = p.sum() + t.sum()
    return float(2 * (p & t).sum() / denominator) if denominator else 1.0


def main() -> None:
    import nibabel as nib

    from medpipe.data.convert import convert_dataset

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--medpipe-fold", required=True, help="a covid_ct_seg fold folder (evaluated, with train.log)")
    parser.add_argument("--work", required=True, help="a scratch folder for nnU-Net's raw/preprocessed/results")
    parser.add_argument("--nnunet-python", default=str(REPO / ".venv-nnunet" / "bin" / "python"))
    parser.add_argument("--iterations", type=int, default=10, help="nnU-Net iterations per epoch (its default: 250; "
                        "on 2 CPU threads one iteration of its 2d plan, batch 49 of 256², takes ~40 s)")
    parser.add_argument("--budget-s", type=float, default=None, help="nnU-Net's training wall time (default: "
                        "medpipe's epochs x its median epoch time)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data"))
    ours = medpipe_side(Path(args.medpipe_fold))
    held_out = sorted(ours["dice"])
    work = Path(args.work)
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "nnUNet_n_proc_DA": "1"}  # fmt: skip
    raw = work / "raw" / f"Dataset{DATASET_ID}_{DATASET_NAME}"
    if not raw.exists():
        convert_dataset(data / "covid_ct_seg", raw, "nnunet")
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    missing = sorted(set(held_out) - set(cases))
    if missing:
        raise SystemExit(f"held-out volumes {missing} are not cases of {raw}")
    bindir = Path(args.nnunet_python).parent
    started = time.perf_counter()
    preprocessed = work / "preprocessed" / raw.name
    if not (preprocessed / "nnUNetPlans.json").is_file():  # planned in an earlier run of this --work folder: reused
        run([str(bindir / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "2d", "-np", "1",
             "--verify_dataset_integrity"], env)  # fmt: skip
    plan_s = time.perf_counter() - started
    splits = [{"train": [c for c in cases if c not in held_out], "val": held_out}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))
    side = str(REPO / "benchmarks" / "nnunet_side.py")
    budget = args.budget_s if args.budget_s is not None else ours["budget_s"]
    out = run([args.nnunet_python, side, "train", str(DATASET_ID), str(budget), str(args.iterations)], env)
    trained = json.loads([line for line in out.splitlines() if line.startswith('{"nnunet_epochs"')][-1])
    log = next((work / "results" / raw.name).glob("TimedTrainer__*/fold_0")).glob("training_log_*.txt")
    epoch_times = [float(t) for f in log for t in re.findall(r"Epoch time: ([\d.]+) s", f.read_text())]
    out = run([args.nnunet_python, side, "predict", str(DATASET_ID), str(work / "pred"), *held_out], env)
    predict_s = {r["case"]: r["nnunet_predict_s"]
                 for r in (json.loads(line) for line in out.splitlines() if line.startswith('{"case"'))}  # fmt: skip
    theirs = {}
    for case in held_out:
        pred = np.asarray(nib.load(work / "pred" / f"{case}.nii.gz").dataobj)
        true = np.asarray(nib.load(raw / "labelsTr" / f"{case}.nii.gz").dataobj)
        theirs[case] = {name: dice(pred, true, values) for name, values in LABELS.items()}

    print(f"\nfold of {args.medpipe_fold}: held-out volumes {', '.join(held_out)}; nnU-Net's budget {budget:.0f} s")
    print(f"{'volume':>22} {'medpipe infection':>18} {'nnU-Net infection':>18} {'medpipe lung':>13} "
          f"{'nnU-Net lung':>13}")
    for case in held_out:
        print(f"{case:>22} {ours['dice'][case]['infection']:>18.4f} {theirs[case]['infection']:>18.4f} "
              f"{ours['dice'][case]['lung']:>13.4f} {theirs[case]['lung']:>13.4f}")
    mean = lambda side_, key: float(np.mean([side_[c][key] for c in held_out]))  # noqa: E731
    print(f"{'mean per volume':>22} {mean(ours['dice'], 'infection'):>18.4f} {mean(theirs, 'infection'):>18.4f} "
          f"{mean(ours['dice'], 'lung'):>13.4f} {mean(theirs, 'lung'):>13.4f}")
    print(f"medpipe: {ours['epochs']} epochs, {ours['epoch_s_median']:.1f} s per epoch (median), training "
          f"{ours['train_s']:.0f} s as logged, {ours['budget_s']:.0f} s at the median epoch")
    print(f"nnU-Net: planning + preprocessing {plan_s:.0f} s; {trained['nnunet_epochs']} epochs of "
          f"{trained['nnunet_iterations_per_epoch']} iterations (batch {trained['nnunet_batch_size']}), "
          f"{statistics.median(epoch_times) if epoch_times else float('nan'):.1f} s per epoch (median), training "
          f"{trained['nnunet_train_s']:.0f} s; prediction {statistics.median(predict_s.values()):.1f} s per volume")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"medpipe": ours, "nnunet": {"dice": theirs, **trained,
                                               "epoch_s": epoch_times, "predict_s": predict_s,
                                               "plan_preprocess_s": round(plan_s, 1)}}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
