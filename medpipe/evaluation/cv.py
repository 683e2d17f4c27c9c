"""K-fold cross-validation of a bundle: train + evaluate every fold, then aggregate metrics.json files.

Numbers come from the per-fold files, never from memory (nnU-Net's habit), so a summary can be rebuilt and checked."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from medpipe.bundle.config import find_bundle, run_bundle
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.evaluation.metrics import classification_report
from medpipe.files import atomic_write_text

SUMMARY_METRICS = ("accuracy", "roc_auc", "macro_roc_auc", "sensitivity", "specificity", "f1")




def _metric_values(fold_metrics: list[dict[str, Any]], name: str) -> list[float]:
    values = [m.get("metrics", {}).get(name, {}).get("value") for m in fold_metrics]
    return [v for v in values if v is not None]


def summarize(fold_metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample sd over folds of each summary metric, plus pooled n."""
    summary: dict[str, Any] = {"folds": len(fold_metrics), "n": sum(m.get("n", 0) for m in fold_metrics)}
    for name in SUMMARY_METRICS:
        values = _metric_values(fold_metrics, name)
        if values:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[name] = {"mean": round(statistics.fmean(values), 4), "sd": round(sd, 4), "per_fold": values}
    return summary


def read_predictions(files: list[Path] | list[str]) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of several predictions.csv files (ClassificationReport's format) and their class names."""
    rows: list[dict[str, str]] = []
    for path in files:
        with Path(path).open(newline="") as fh:
            rows += list(csv.DictReader(fh))
    if not rows:
        raise MedpipeError(f"no predictions in {[str(f) for f in files]}")
    return rows, [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")]


def pooled_report(fold_dirs: list[Path], seed: int = 0) -> dict[str, Any]:
    """Metrics with bootstrap CIs over every fold's out-of-fold predictions together (each image scored once)."""
    rows, class_names = read_predictions([d / "predictions.csv" for d in fold_dirs])
    labels = [class_names.index(r["label"]) for r in rows]
    probs = [[float(r[f"prob_{c}"]) for c in class_names] for r in rows]
    return classification_report(labels, probs, class_names, seed=seed)


def write_summary(out_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Rebuild `<out_dir>/cv_summary.json` from the fold folders' files, print one line, return it."""
    fold_dirs = sorted(out_dir.glob("fold*/"), key=lambda d: int(d.name[4:]))
    fold_dirs = [d for d in fold_dirs if (d / "metrics.json").is_file()]
    if not fold_dirs:
        raise MedpipeError(f"no fold*/metrics.json under '{out_dir}'")
    fold_metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    if (fold_dirs[0] / "per_volume.csv").is_file():  # segmentation bundles pool per-volume rows instead
        from medpipe.evaluation.seg_report import summarize_cv

        pooled = summarize_cv(fold_dirs)
    else:
        pooled = pooled_report(fold_dirs)
    summary = {**info, **summarize(fold_metrics), "pooled_out_of_fold": pooled}
    atomic_write_text(out_dir / "cv_summary.json", json.dumps(summary, indent=2))
    parts = [f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in summary.items() if isinstance(v, dict) and "mean" in v]
    pooled = summary["pooled_out_of_fold"].get("metrics", {})
    parts += [f"pooled {k} {pooled[k]['value']:.3f} [{pooled[k]['ci95'][0]:.3f}, {pooled[k]['ci95'][1]:.3f}]"
              for k in ("accuracy", "roc_auc", "macro_roc_auc") if k in pooled and pooled[k]["ci95"]]  # fmt: skip
    for level in ("per_volume", "per_slice"):
        pooled_level = summary["pooled_out_of_fold"].get(level, {})
        parts += [f"{level} {k} {v['value']:.3f} {v['ci95']}" for k, v in pooled_level.items()]
    print(f"{out_dir}: {len(fold_dirs)} folds: " + ", ".join(parts))
    return summary


def read_run_summary(run_dir: Path, required: tuple[str, ...] = ("folds",)) -> dict[str, Any]:
    """`<run_dir>/cv_summary.json` of a finished `medpipe cv` run; MedpipeError if absent or lacking `required` keys."""
    summary_file = run_dir / "cv_summary.json"
    if not summary_file.is_file():
        raise MedpipeError(f"no cv_summary.json in '{run_dir}': give the --out folder of a finished `medpipe cv` run")
    summary = json.loads(summary_file.read_text())
    missing = [k for k in required if k not in summary]
    if missing:
        raise MedpipeError(f"{summary_file} lacks {missing}: rebuild it with `medpipe cv_report {run_dir}`")
    return summary


def check_out_dir(out_dir: Path, folds: int) -> None:
    """Refuse an --out holding another run's folds: write_summary pools every fold*/ it finds with the new ones."""
    extra = [d.name for d in out_dir.glob("fold*/") if d.name[4:].isdigit() and int(d.name[4:]) >= folds]
    trained = [f"{p.parent.name}/model.pt" for p in out_dir.glob("fold*/model.pt")]
    if extra or trained:
        raise MedpipeError(
            f"--out '{out_dir}' already holds {(extra or trained)[0]} from another run; give a new or empty folder"
        )


def fold_overrides(
    fold: int, folds: int, split_mode: str, ckpt_dir: Path, output_dir: Path, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The overrides that make a bundle job work on fold `fold` of `folds`, reading/writing the given folders."""
    return {"fold": fold, "num_folds": folds, "split_mode": split_mode, "ckpt_dir": str(ckpt_dir),
            "output_dir": str(output_dir), **overrides}  # fmt: skip


def run_fold(
    bundle_dir: Path, network: str | None, fold: int, folds: int, split_mode: str, out_dir: Path,
    evaluate: bool = True, **overrides: Any,
) -> Path:
    """Train on all folds but `fold`, then score the held-out fold, into `<out_dir>/fold<k>/`; returns that folder."""
    fold_dir = Path(out_dir) / f"fold{fold}"
    common = fold_overrides(fold, folds, split_mode, fold_dir, fold_dir, overrides)
    run_bundle(bundle_dir, "train", network, **common)
    if evaluate:
        run_bundle(bundle_dir, "evaluate", network, **common)
    return fold_dir


def _fold_on_threads(threads: int, *args: Any, **overrides: Any) -> Path:
    import torch

    torch.set_num_threads(threads)
    try:
        return run_fold(*args, **overrides)
    except Exception as exc:
        # a pickled exception loses its __cause__ chain: send the one-line MedpipeError itself to the parent
        found = find_medpipe_error(exc)
        if found is None:
            raise
        raise MedpipeError(str(found)) from None


def _run_folds(
    bundle_dir: Path, network: str | None, folds: int, split_mode: str, out_dir: Path, parallel: int,
    overrides: dict[str, Any],
) -> None:
    """Folds one after another, or `parallel` at a time in fresh processes sharing the cores between them.

    Why processes: on 2 cores two single-thread folds train ~1.15x faster in total than one fold on two threads
    (small convolutions do not split well across threads). A fold left to run alone at the end gets all cores.
    """
    if parallel <= 1:
        for fold in range(folds):
            run_fold(bundle_dir, network, fold, folds, split_mode, out_dir, **overrides)
        return
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # no forked copy of a half-initialised torch / OpenMP pool
    with ProcessPoolExecutor(parallel, mp_context=context) as pool:
        jobs = [pool.submit(_fold_on_threads, max(1, cores // min(parallel, folds - fold)),
                            bundle_dir, network, fold, folds, split_mode, out_dir, **overrides)
                for fold in range(folds)]  # fmt: skip
        try:
            for job in jobs:
                job.result()  # re-raises a fold's error here
        except BrokenProcessPool as exc:
            raise MedpipeError(
                "a fold's worker process died (killed, or out of memory?); rerun with --parallel 1 to see why"
            ) from exc
        finally:
            for job in jobs:
                job.cancel()  # when one fold fails, folds not yet started are dropped


def run_cv(
    bundle: str,
    network: str | None = None,
    folds: int = 5,
    split_mode: str = "group",
    out: str | None = None,
    parallel: int = 1,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate folds 0..K-1, each scored on its own held-out fold, then write cv_summary.json."""
    if parallel < 1:
        raise MedpipeError(f"--parallel must be >= 1, got {parallel}")
    bundle_dir = find_bundle(bundle)
    out_dir = Path(out or f"results/{bundle_dir.name}/{network or 'default'}_{split_mode}")
    started = time.perf_counter()
    _run_folds(bundle_dir, network, folds, split_mode, out_dir, parallel, overrides)
    info = {
        "bundle": bundle_dir.name, "network": network or "default", "split_mode": split_mode, "folds": folds,
        "overrides": overrides, "parallel": parallel, "wall_time_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    return write_summary(out_dir, info)


def rescore_cv(run: str, out: str, **overrides: Any) -> dict[str, Any]:
    """Evaluate the fold models of a finished CV run again, with extra overrides (e.g. `tta=True`), into `out`.

    Network, split, folds and the run's own overrides come from `<run>/cv_summary.json`, so every fold is scored on
    exactly the images it held out, by the model trained without them.
    """
    run_dir, out_dir = Path(run), Path(out)
    if out_dir.resolve() == run_dir.resolve():
        raise MedpipeError(f"--out must differ from the run folder '{run_dir}' (its own metrics would be overwritten)")
    old = read_run_summary(run_dir, ("bundle", "network", "split_mode", "folds"))
    absent = [f"fold{k}/model.pt" for k in range(old["folds"]) if not (run_dir / f"fold{k}" / "model.pt").is_file()]
    if absent:  # checked before scoring any fold, so a run with a lost model leaves no partial output
        raise MedpipeError(f"'{run_dir}' lacks {', '.join(absent)}: only runs that kept their models can be rescored")
    check_out_dir(out_dir, old["folds"])
    bundle_dir = find_bundle(old["bundle"])
    network = None if old["network"] == "default" else old["network"]
    merged = {**old.get("overrides", {}), **overrides}
    started = time.perf_counter()
    for fold in range(old["folds"]):
        name = f"fold{fold}"
        job = fold_overrides(fold, old["folds"], old["split_mode"], run_dir / name, out_dir / name, merged)
        run_bundle(bundle_dir, "evaluate", network, **job)
    info = {
        "bundle": old["bundle"], "network": old["network"], "split_mode": old["split_mode"], "folds": old["folds"],
        "overrides": merged, "rescored_from": str(run_dir), "wall_time_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    return write_summary(out_dir, info)


def rebuild_summary(out_dir: Path) -> dict[str, Any]:
    """Rebuild `<out_dir>/cv_summary.json` from its fold folders' files, keeping the run's recorded settings."""
    previous = out_dir / "cv_summary.json"
    info = {}
    if previous.is_file():
        old = json.loads(previous.read_text())
        kept = ("bundle", "network", "split_mode", "folds", "overrides", "parallel", "wall_time_s", "rescored_from",
                "ensemble_of", "members", "wrong_by_every_member")
        info = {k: old[k] for k in kept if k in old}
    return write_summary(out_dir, info)
