"""The `medpipe` verbs: each parses its arguments, calls one library function and prints where the output went.

Library modules hold no command functions; this module holds nothing else. Imports are local to each verb so that
`medpipe --help` does not import torch, MONAI or MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError

BANNER = "=" * 78


def ingest_command(
    dicom_dir: str,
    out_dir: str,
    on_gap: str = "error",
    skip_invalid: bool = False,
    date_shift_days: int | None = None,
) -> None:
    """Convert every DICOM series under DICOM_DIR to NIfTI (RAS affine) + de-identified JSON sidecar in OUT_DIR.

    --on_gap error|warn: a series with missing slices fails (default) or is written with the gap filled.
    --skip_invalid: leave invalid series out (listed in the summary) instead of failing.
    --date_shift_days N: keep the study date shifted by N days in the sidecar (default: dates removed).
    """
    from medpipe.io.ingest import format_summary, ingest

    summary = ingest(str(dicom_dir), str(out_dir), str(on_gap), bool(skip_invalid), date_shift_days)
    print(format_summary(summary))


def compare_command(experiment: str, tracking_uri: str | None = None, max_runs: int = 20) -> None:
    """medpipe compare EXPERIMENT [--tracking_uri URI] [--max_runs N]

    Print the experiment's runs side by side, newest first: status, time, git SHA, parameters and last metric values.
    """
    from medpipe.tracking.compare import format_table, runs_table

    print(format_table(runs_table(experiment, tracking_uri, max_runs)))


def run_command(bundle: str, config: str = "train", network: str | None = None, **overrides: Any) -> None:
    """medpipe run BUNDLE [train|evaluate|inference] [--network NAME] [--key value …]

    BUNDLE is a bundle folder or the name of one under ./bundles.
    """
    from medpipe.bundle.config import find_bundle, run_bundle

    run_bundle(find_bundle(bundle), config, network, **overrides)


def cv_command(
    bundle: str, network: str | None = None, folds: int = 5, split_mode: str = "group", out: str | None = None,
    parallel: int = 1, **overrides: Any,
) -> None:
    """medpipe cv BUNDLE [--network NAME] [--folds 5] [--split_mode group|random] [--out DIR] [--parallel N]
    [--key value …]

    --parallel N trains N folds at a time in separate processes, splitting the CPU cores between them.
    Writes `<out>/fold<k>/{model.pt,metrics.json,predictions.csv}` and `<out>/cv_summary.json` (mean ± sd over
    folds, and pooled out-of-fold metrics with bootstrap CIs).
    """
    from medpipe.evaluation.cv import run_cv

    run_cv(bundle, network, folds, split_mode, out, parallel, **overrides)


def cv_report_command(out: str) -> None:
    """medpipe cv_report OUT_DIR — rebuild cv_summary.json from the fold folders' files and print it."""
    from medpipe.evaluation.cv import rebuild_summary

    rebuild_summary(Path(out))


def cv_rescore_command(run: str, out: str, **overrides: Any) -> None:
    """medpipe cv_rescore RUN_DIR --out DIR [--key value …] — score a finished CV run's fold models again.

    Example: `medpipe cv_rescore results/brain_tumor_cls/paper_cnn_group --out paper_cnn_group_tta --tta true`.
    Writes `<out>/fold<k>/{metrics.json,predictions.csv}` and `<out>/cv_summary.json` like `medpipe cv`.
    """
    from medpipe.evaluation.cv import rescore_cv

    rescore_cv(run, out, **overrides)


def cv_ensemble_command(*runs: str, out: str) -> None:
    """medpipe cv_ensemble RUN_DIR RUN_DIR [...] --out DIR — score the per-fold ensemble of CV runs made on the same
    folds (mean class probability per image, as the `ensemble_ckpts` key computes).

    Example: `medpipe cv_ensemble results/brain_tumor_cls/a results/brain_tumor_cls/b --out results/brain_tumor_cls/ab`.
    Writes `<out>/fold<k>/{metrics.json,predictions.csv}` and `<out>/cv_summary.json` like `medpipe cv`.
    """
    from medpipe.evaluation.cv_ensemble import ensemble_cv

    ensemble_cv(list(runs), out)


def verify_command(bundle: str) -> None:
    """medpipe verify BUNDLE — schema and network input/output checks, offline."""
    from medpipe.bundle.verify import verify_bundle

    for line in verify_bundle(bundle):
        print(f"ok  {line}")


def zoo_command(action: str, *args: Any, **kwargs: Any) -> None:
    """medpipe zoo package BUNDLE [--out_dir dist] [--ckpt PATH] [--network NAME] [--key value …]
    medpipe zoo index FOLDER
    medpipe zoo install NAME[==VERSION] --index FOLDER_OR_URL [--dest DIR] [--overwrite] [--ignore_versions]
    """
    import logging
    import time

    from medpipe.zoo import index, install, package

    actions = {"package": package, "index": index, "install": install}
    if action not in actions:
        raise MedpipeError(f"medpipe zoo: unknown action '{action}'; use one of {sorted(actions)}")
    started = time.time()
    actions[action](*args, **kwargs)
    logging.getLogger("medpipe.zoo").info(f"zoo {action} took {time.time() - started:.1f}s")


def _table(metrics: dict) -> str:
    rows = ["| metric | value | 95 % CI |", "|---|---|---|"]
    for name, entry in metrics["metrics"].items():
        if isinstance(entry, dict) and "value" in entry and entry["value"] is not None:
            ci = entry["ci95"]
            ci_text = f"{ci[0]:.3f} – {ci[1]:.3f}" if ci else "n/a"
            rows.append(f"| {name} | {entry['value']:.3f} | {ci_text} |")
    rows.append(f"| n (held-out images) | {metrics['n']} | |")
    rows.append(f"| confusion matrix (rows true {metrics['class_names']}) | {metrics['confusion_matrix']} | |")
    return "\n".join(rows)


def demo_command(out: str = "results/demo", network: str = "paper_cnn", epochs: int | None = None) -> None:
    """medpipe demo [--out DIR] [--network paper_cnn|densenet121|resnet18] [--epochs N]

    Trains on 4/5 of the data (group-aware fold 0) and scores the held-out fifth; epochs default to the bundle's
    (train.json and the network's overlay).
    """
    import os

    from medpipe.bundle.config import find_bundle, run_bundle
    from medpipe.data.synthetic import make_synthetic_set

    out_dir = Path(out).resolve()
    real = Path(os.environ.get("MEDPIPE_DATA", "")) / "brain_mri_yes_no"
    if os.environ.get("MEDPIPE_DATA") and real.is_dir():
        dataset, source = real, f"real data: {real}"
    else:
        dataset = make_synthetic_set(out_dir / "synthetic_data")
        source = "SYNTHETIC DATA (MEDPIPE_DATA/brain_mri_yes_no not found): these numbers say nothing about MRI"
        print(f"{BANNER}\n!! {source}\n!! generated in {dataset}\n{BANNER}")
    common = {"dataset_dir": str(dataset), "ckpt_dir": str(out_dir / "models"), "fold": 0}
    if epochs is not None:
        common["epochs"] = epochs
    bundle = find_bundle("brain_tumor_cls")
    run_bundle(bundle, "train", network, output_dir=str(out_dir), **common)
    run_bundle(bundle, "evaluate", network, output_dir=str(out_dir), **common)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"\n{BANNER}\nbrain_tumor_cls / {network}, group-aware fold 0 of 5, {source}\n{BANNER}")
    print(_table(metrics))
    print(f"\nfiles: {out_dir / 'metrics.json'}, {out_dir / 'predictions.csv'}, {out_dir / 'models' / 'model.pt'}")
