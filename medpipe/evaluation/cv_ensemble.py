"""Cross-validated estimate of a per-fold model ensemble: `medpipe cv_ensemble RUN RUN … --out DIR`.

Several `medpipe cv` runs made on the same fold partition (same `--split_seed`; other training seeds, other networks)
each scored every held-out fold with a model trained without it. Averaging, fold by fold, the class probabilities
those models gave each image is what the bundle's `ensemble_ckpts` key computes at scoring time, so the averaged
out-of-fold predictions estimate that ensemble without any model seeing the image it scores. Runs whose folds hold
different images are refused: averaging them would mix in models that trained on the image. Runs that carry a
splits.json must carry the same partition (it is copied into the output); each fold's files are checked as a pair."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medpipe.data.splits import read_splits
from medpipe.errors import MedpipeError
from medpipe.evaluation.cv import SPLITS_FILE, check_out_dir, read_predictions, read_run_summary, write_summary
from medpipe.evaluation.metrics import classification_report
from medpipe.evaluation.reports import check_report_files, predictions_csv, write_report_files
from medpipe.evaluation.uncertainty import member_columns
from medpipe.files import atomic_write_text


def _fold_rows(run_dir: Path, fold: int) -> tuple[dict[str, dict[str, str]], list[str]]:
    """path -> row of one fold's predictions.csv, and its class names."""
    path = run_dir / f"fold{fold}" / "predictions.csv"
    if not path.is_file():
        raise MedpipeError(f"'{run_dir}' lacks fold{fold}/predictions.csv: rebuild the run or leave it out")
    if (path.parent / "metrics.json").is_file():
        check_report_files(path.parent)
    rows, class_names = read_predictions([path])
    if "label" not in rows[0]:
        raise MedpipeError(f"{path} has no label column: only evaluated folds can be ensembled")
    return {r["path"]: r for r in rows}, class_names


def fold_members(run_dirs: list[Path], fold: int) -> tuple[list[str], list[int], np.ndarray, list[str]]:
    """Paths, labels, and every run's class probabilities (runs × images × classes) of fold `fold`.

    MedpipeError if the runs' folds hold different images, labels or classes.
    """
    first, class_names = _fold_rows(run_dirs[0], fold)
    probs = []
    for run_dir in run_dirs:
        rows, names = _fold_rows(run_dir, fold) if run_dir is not run_dirs[0] else (first, class_names)
        if names != class_names:
            raise MedpipeError(f"'{run_dir}' scores classes {names}, '{run_dirs[0]}' {class_names}")
        if set(rows) != set(first):
            raise MedpipeError(
                f"fold {fold} of '{run_dir}' and of '{run_dirs[0]}' hold different images: ensemble only runs made on "
                "the same fold partition (same --split_seed, --folds and --split_mode)"
            )
        relabelled = [p for p in first if rows[p]["label"] != first[p]["label"]]
        if relabelled:
            raise MedpipeError(f"'{run_dir}' and '{run_dirs[0]}' label {relabelled[0]} differently")
        probs.append([[float(rows[p][f"prob_{c}"]) for c in class_names] for p in first])
    paths = list(first)
    labels = [class_names.index(first[p]["label"]) for p in paths]
    return paths, labels, np.asarray(probs), class_names


def _same_partition(run_dirs: list[Path]) -> str | None:
    """The runs' common splits.json text (None when no run has one); MedpipeError if two runs' partitions differ."""
    found = [(d, [set(f["val"]) for f in read_splits(d / SPLITS_FILE)["folds"]]) for d in run_dirs
             if (d / SPLITS_FILE).is_file()]  # fmt: skip
    for run_dir, folds in found[1:]:
        if folds != found[0][1]:
            differs = next((k for k, (a, b) in enumerate(zip(folds, found[0][1], strict=False)) if a != b), "count")
            raise MedpipeError(
                f"the splits.json of '{run_dir}' and of '{found[0][0]}' differ (fold {differs}): ensemble only runs "
                "made on the same partition (same --split_seed, --folds and --split_mode, or --splits FILE)"
            )
    return (found[0][0] / SPLITS_FILE).read_text() if found else None


def ensemble_cv(runs: list[str], out: str) -> dict[str, Any]:
    """Average the out-of-fold probabilities of `runs` fold by fold into `out` (predictions, metrics, cv_summary)."""
    run_dirs, out_dir = [Path(r) for r in runs], Path(out)
    if len(run_dirs) < 2:
        raise MedpipeError(f"give at least two CV runs to ensemble, got {len(run_dirs)}")
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise MedpipeError("a run is given twice: it would count double in the average")
    if out_dir.resolve() in {d.resolve() for d in run_dirs}:
        raise MedpipeError(f"--out must differ from every run folder ('{out_dir}' is one of them)")
    summaries = [read_run_summary(d) for d in run_dirs]
    for key in ("folds", "split_mode"):
        values = {str(s.get(key)) for s in summaries}
        if len(values) > 1:
            raise MedpipeError(f"the runs differ in {key} ({sorted(values)}): ensemble runs made on the same folds")
    folds = int(summaries[0]["folds"])
    check_out_dir(out_dir, folds)
    partition = _same_partition(run_dirs)
    scored = [fold_members(run_dirs, fold) for fold in range(folds)]  # every check passes before anything is written
    wrong_by_all: list[str] = []
    for fold, (paths, labels, members, class_names) in enumerate(scored):
        probs = members.mean(axis=0)
        # images every member gets wrong: an ensemble cannot fix these (hard, or labelled unlike the rest)
        wrong = members.argmax(axis=2) != np.asarray(labels)[None, :]
        wrong_by_all += [p for p, w in zip(paths, wrong.all(axis=0), strict=True) if w]
        report = {"fold": fold, "ensemble_of": [str(d / f"fold{fold}") for d in run_dirs],
                  **classification_report(labels, probs, class_names)}  # fmt: skip
        header, cells = member_columns(members)  # uncertainty of the mean, member_spread, flag
        csv_text = predictions_csv(paths, probs, class_names, labels, header, cells)
        write_report_files(out_dir / f"fold{fold}", {"predictions.csv": csv_text}, report)
    if partition is not None:
        atomic_write_text(out_dir / SPLITS_FILE, partition)
    info = {
        "bundle": summaries[0].get("bundle"), "network": "ensemble", "split_mode": summaries[0].get("split_mode"),
        "folds": folds, "ensemble_of": [str(d) for d in run_dirs],
        "members": [{"network": s.get("network"), "overrides": s.get("overrides", {})} for s in summaries],
        "wrong_by_every_member": sorted(wrong_by_all),
    }  # fmt: skip
    print(f"{len(wrong_by_all)} images wrong by every member: {', '.join(sorted(wrong_by_all)) or 'none'}")
    return write_summary(out_dir, info)
