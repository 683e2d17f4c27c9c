"""K-fold cross-validation of a bundle: train + evaluate every fold, then aggregate metrics.json files.

Numbers come from the per-fold files, never from memory (nnU-Net's habit), so a summary can be rebuilt and checked."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.bundle.config import config_files, find_bundle, run_bundle
from medpipe.cluster import sigterm_as_interrupt
from medpipe.data.splits import read_splits, write_splits
from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.evaluation.metrics import classification_report
from medpipe.evaluation.reports import check_report_files
from medpipe.files import atomic_write_text, writable_dir
from medpipe.values import whole_number

SUMMARY_METRICS = ("accuracy", "roc_auc", "macro_roc_auc", "sensitivity", "specificity", "f1")
SPLITS_FILE = "splits.json"  # a run folder's fold partition, written before any fold runs


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


def fold_dirs_of(out_dir: Path) -> list[Path]:
    """The `fold<k>/` folders of a run folder, in fold order."""
    return sorted((d for d in out_dir.glob("fold*/") if d.name[4:].isdigit()), key=lambda d: int(d.name[4:]))


def expected_folds(out_dir: Path, info: dict[str, Any]) -> int | None:
    """How many folds the run has: its splits.json says, else the recorded `folds`; None when neither is known."""
    if (out_dir / SPLITS_FILE).is_file():
        return len(read_splits(out_dir / SPLITS_FILE)["folds"])
    return int(info["folds"]) if isinstance(info.get("folds"), int) else None


def write_summary(out_dir: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Rebuild `<out_dir>/cv_summary.json` from the fold folders' files, print one line, return it.

    Each fold's data files are checked against its metrics.json first (check_report_files). When fewer folds are
    complete than the run has (an interrupted run), the summary says so: `folds_completed` and `missing_folds` in
    the file, and a warning on stderr; `folds` stays the run's fold count, so cv_rescore / cv_ensemble refuse it."""
    fold_dirs = [d for d in fold_dirs_of(out_dir) if (d / "metrics.json").is_file()]
    if not fold_dirs:
        raise MedpipeError(f"no fold*/metrics.json under '{out_dir}'")
    fold_metrics = [check_report_files(d) for d in fold_dirs]
    if (fold_dirs[0] / "per_volume.csv").is_file():  # segmentation bundles pool per-volume rows instead
        from medpipe.evaluation.seg_report import summarize_cv

        pooled = summarize_cv(fold_dirs)
    else:
        pooled = pooled_report(fold_dirs)
    summary = {**info, **summarize(fold_metrics), "pooled_out_of_fold": pooled}
    done = [int(d.name[4:]) for d in fold_dirs]
    folds = expected_folds(out_dir, info) or len(fold_dirs)
    summary.update(folds=folds, folds_completed=len(fold_dirs))
    missing = [k for k in range(folds) if k not in done]
    summary.pop("missing_folds", None)
    if missing:
        summary["missing_folds"] = missing
        print(f"WARNING: '{out_dir}' is incomplete: {len(done)} of {folds} folds have results (missing folds "
              f"{missing}); these figures are not a {folds}-fold cross-validation", file=sys.stderr)  # fmt: skip
    atomic_write_text(out_dir / "cv_summary.json", json.dumps(summary, indent=2))
    parts = [f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in summary.items() if isinstance(v, dict) and "mean" in v]
    pooled = summary["pooled_out_of_fold"].get("metrics", {})
    parts += [f"pooled {k} {pooled[k]['value']:.3f} [{pooled[k]['ci95'][0]:.3f}, {pooled[k]['ci95'][1]:.3f}]"
              for k in ("accuracy", "roc_auc", "macro_roc_auc") if k in pooled and pooled[k]["ci95"]]  # fmt: skip
    for level in ("per_volume", "per_slice"):
        pooled_level = summary["pooled_out_of_fold"].get(level, {})
        parts += [f"{level} {k} {v['value']:.3f} {v['ci95']}" for k, v in pooled_level.items()]
    complete = f"{len(fold_dirs)} folds" if not missing else f"{len(fold_dirs)} of {folds} folds (INCOMPLETE)"
    print(f"{out_dir}: {complete}: " + ", ".join(parts))
    return summary


def read_run_summary(run_dir: Path, required: tuple[str, ...] = ("folds",)) -> dict[str, Any]:
    """`<run_dir>/cv_summary.json` of a finished `medpipe cv` run; MedpipeError if absent, lacking `required` keys,
    or incomplete (a run interrupted before every fold had results)."""
    summary_file = run_dir / "cv_summary.json"
    if not summary_file.is_file():
        raise MedpipeError(f"no cv_summary.json in '{run_dir}': give the --out folder of a finished `medpipe cv` run")
    summary = json.loads(summary_file.read_text())
    if summary.get("missing_folds"):
        raise MedpipeError(f"'{run_dir}' is an incomplete run (folds {summary['missing_folds']} have no results): "
                           "finish it or use a complete run")  # fmt: skip
    missing = [k for k in required if k not in summary]
    if missing:
        raise MedpipeError(f"{summary_file} lacks {missing}: rebuild it with `medpipe cv_report {run_dir}`")
    return summary


def check_out_dir(out_dir: Path, folds: int) -> None:
    """Refuse an --out holding another run's folds: write_summary would pool every fold*/ it finds with the new ones.

    The one check of every command that writes a run folder (cv, cv_rescore, cv_ensemble): the folder must be new,
    or hold no fold results (a fold's model, files, or a fold beyond this run's count)."""
    dirs = [d for d in out_dir.glob("fold*/") if d.is_dir()]
    trained = sorted(f"{d.name}/model.pt" for d in dirs if (d / "model.pt").is_file())
    extra = sorted(d.name for d in dirs if not d.name[4:].isdigit() or int(d.name[4:]) >= folds)
    held = sorted(f"{d.name}/{p.relative_to(d).as_posix()}" for d in dirs for p in d.rglob("*") if p.is_file())
    if trained or extra or held:
        raise MedpipeError(
            f"--out '{out_dir}' already holds {(trained or extra or held)[0]} from another run; give a new or empty "
            "folder"
        )


def _takes_splits_file(files: list[str]) -> bool:
    """Whether the bundle's configs declare `splits_file` (bundles from before splits.json do not)."""
    from monai.bundle import ConfigParser

    return "splits_file" in ConfigParser.load_config_files(files)


def write_run_splits(
    bundle_dir: Path, network: str | None, folds: int, split_mode: str, out_dir: Path, overrides: dict[str, Any],
    splits: str | None = None,
) -> Path:
    """Write `<out_dir>/splits.json` before any fold runs, and return it.

    Without `splits`, the partition is what the bundle's own `datalists` gives each fold with these overrides (the
    same function the fold jobs ran before splits.json existed, so old partitions are reproduced exactly); with
    `splits`, that file's partition, checked against the data first."""
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import check_override_keys
    from medpipe.bundle.parameters import coerce_values, declared_parameters

    files = config_files(bundle_dir, "train", network)
    check_override_keys(files, list(overrides))
    parser = ConfigParser()
    parser.read_config(files)
    values = {**overrides, **coerce_values(declared_parameters(bundle_dir), overrides)}
    parser.update({"bundle_root": str(Path(bundle_dir).resolve()), **values, "num_folds": folds,
                   "split_mode": split_mode})  # fmt: skip
    if "splits_file" in parser.get():
        parser["splits_file"] = None
    meta = {"split_mode": split_mode, "seed": _parsed(parser, "split_seed", None),
            "dataset_dir": str(_parsed(parser, "dataset_dir"))}  # fmt: skip
    if splits:
        given = read_splits(splits)
        if len(given["folds"]) != folds:
            raise MedpipeError(f"--splits '{splits}' has {len(given['folds'])} folds but --folds is {folds}")
        if not _takes_splits_file(files):
            raise MedpipeError(f"bundle '{bundle_dir}' has no splits_file key: it cannot reuse --splits '{splits}'")
        parser["splits_file"] = str(Path(splits).resolve())
        meta = {"seed": None, **given["meta"], "split_mode": split_mode, "dataset_dir": meta["dataset_dir"],
                "copied_from": str(splits)}  # fmt: skip
    by_fold = []
    for fold in range(folds):
        parser["fold"] = fold
        lists = _parsed(parser, "datalists")
        by_fold.append({"train": lists["train"], "val": lists["val"]})
    return write_splits(by_fold, out_dir / SPLITS_FILE, meta)


def _parsed(parser: Any, key: str, *default: Any) -> Any:
    """A parsed config value; a MedpipeError that MONAI wrapped while evaluating it comes out as itself."""
    if default and key not in parser.get():
        return default[0]
    try:
        return parser.get_parsed_content(key, lazy=False)
    except Exception as exc:
        found = find_medpipe_error(exc)
        if found is None:
            raise
        raise MedpipeError(str(found)) from exc


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


def _ignore_sigint() -> None:
    """Fold workers leave Ctrl-C to the parent, which stops them all: a worker must not catch it and go on to
    the next queued fold."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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


def _fold_attempt(threads: int, bundle_dir: Path, network: str | None, fold: int, folds: int, split_mode: str,
                  out_dir: Path, **overrides: Any) -> Path:  # fmt: skip
    """One attempt at a fold on a cluster, where Ray runs a fold again when its worker or node died.

    A fold folder holding metrics.json is complete (the evaluate job writes it last): returned as it is. Anything
    else there is what an attempt that died left (last.pt, its training.lock): cleared, so the fold starts afresh
    rather than being refused as "in use" or "trained already". Only this fold's tasks write there."""
    fold_dir = Path(out_dir) / f"fold{fold}"
    if (fold_dir / "metrics.json").is_file():
        return fold_dir
    if fold_dir.exists():
        print(f"{fold_dir}: clearing what an earlier attempt left, then training the fold again", file=sys.stderr)
        shutil.rmtree(fold_dir)
    return _fold_on_threads(threads, bundle_dir, network, fold, folds, split_mode, out_dir, **overrides)


def _drop_partial_folds(out_dir: Path, folds: int) -> None:
    """Remove the fold folders that have no metrics.json after a cluster run stopped (their tasks have ended), so
    that the run folder holds complete folds only."""
    for fold in range(folds):
        fold_dir = out_dir / f"fold{fold}"
        if fold_dir.is_dir() and not (fold_dir / "metrics.json").is_file():
            shutil.rmtree(fold_dir, ignore_errors=True)


def _wait_interruptibly(jobs: set[Future], return_when: str) -> tuple[set[Future], set[Future]]:
    """`concurrent.futures.wait` that lets Ctrl-C and SIGTERM in at once: the kernel may hand the signal to one of the
    pool's helper threads, and a main thread blocked on a lock would only run the handler when a fold ends."""
    while True:
        done, pending = wait(jobs, timeout=0.5, return_when=return_when)
        failed = any(j.cancelled() or j.exception() for j in done)
        if not pending or failed or (done and return_when == FIRST_COMPLETED):
            return done, pending


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel every fold not yet started and end the running ones (their files are atomic: nothing half-written)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() forgets them
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _interrupted(out_dir: Path, folds: int) -> MedpipeError:
    done = [d.name for d in fold_dirs_of(out_dir) if (d / "metrics.json").is_file()]
    return MedpipeError(
        f"interrupted: {len(done)} of {folds} folds finished in '{out_dir}' and no other fold will start; "
        "rerun into a new --out (cv_report on this folder marks it incomplete)"
    )


def _run_folds(
    bundle_dir: Path, network: str | None, folds: int, split_mode: str, out_dir: Path, parallel: int,
    overrides: dict[str, Any],
) -> None:
    """Folds one after another, or `parallel` at a time in fresh processes sharing the cores between them.

    Why processes: on 2 cores two single-thread folds train ~1.15x faster in total than one fold on two threads
    (small convolutions do not split well across threads). Each fold gets the cores divided by the folds it runs
    alongside, those still running included: a last fold started while another runs must not take all cores
    (oversubscribed OpenMP threads spin-wait), and its threads cannot grow once the other ends.
    A fold is submitted only when a worker is free, so after Ctrl-C or a failing fold no queued fold starts.
    """
    if parallel <= 1:
        try:
            for fold in range(folds):
                run_fold(bundle_dir, network, fold, folds, split_mode, out_dir, **overrides)
        except KeyboardInterrupt:
            raise _interrupted(out_dir, folds) from None
        return
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")  # no forked copy of a half-initialised torch / OpenMP pool
    pool = ProcessPoolExecutor(parallel, mp_context=context, initializer=_ignore_sigint)
    running: set[Future] = set()
    # `kill PID` (SIGTERM) must stop the fold workers too, as Ctrl-C does, not leave them training as orphans
    with sigterm_as_interrupt():
        try:
            for fold in range(folds):
                if len(running) >= parallel:
                    finished, running = _wait_interruptibly(running, FIRST_COMPLETED)
                    for job in finished:
                        job.result()  # re-raises a fold's error here, before another fold starts
                # share the cores among the folds that will run alongside this one (those still running count)
                threads = max(1, cores // min(parallel, folds - fold + len(running)))
                running.add(pool.submit(_fold_on_threads, threads, bundle_dir, network, fold, folds, split_mode,
                                        out_dir, **overrides))  # fmt: skip
            while running:
                finished, running = _wait_interruptibly(running, FIRST_EXCEPTION)
                for job in finished:
                    job.result()
        except KeyboardInterrupt:
            _stop_workers(pool)
            raise _interrupted(out_dir, folds) from None
        except BrokenProcessPool as exc:
            _stop_workers(pool)
            raise MedpipeError(
                "a fold's worker process died (killed, or out of memory?); rerun with --parallel 1 to see why"
            ) from exc
        except BaseException:
            _stop_workers(pool)  # when one fold fails, folds not yet started are dropped
            raise
    pool.shutdown(wait=True)


@dataclass(frozen=True)
class ClusterPlan:
    """Where `medpipe cv --cluster` runs its folds: the `--cluster` address and what each fold task declares."""

    address: str
    cpus_per_fold: int = 1
    gpus_per_fold: float = 0.0
    fold_retries: int = 2  # Ray runs a fold lost with its worker or node again, this many times

    @classmethod
    def checked(
        cls, address: str, cpus_per_fold: Any = 1, gpus_per_fold: Any = 0, fold_retries: Any = 2
    ) -> ClusterPlan:
        """The plan from the command line's values, each checked (one line for a bad one)."""
        from medpipe.cluster import ray_address

        ray_address(address)
        cpus, retries = whole_number("--cpus_per_fold", cpus_per_fold), whole_number("--fold_retries", fold_retries)
        try:
            gpus = float(gpus_per_fold)
        except (TypeError, ValueError):
            raise MedpipeError(f"--gpus_per_fold must be a number, got {gpus_per_fold!r}") from None
        if cpus < 1 or gpus < 0 or retries < 0:
            raise MedpipeError(f"--cpus_per_fold must be >= 1, --gpus_per_fold and --fold_retries >= 0; got "
                               f"{cpus}, {gpus_per_fold}, {retries}")  # fmt: skip
        return cls(str(address), cpus, gpus, retries)


def _run_folds_on_cluster(
    bundle_dir: Path, network: str | None, folds: int, split_mode: str, out_dir: Path, plan: ClusterPlan,
    overrides: dict[str, Any],
) -> None:
    """Every fold as one Ray task running the fold function the process pool runs, with the plan's CPUs / GPUs.

    A fold that fails (after Ray's retries when its worker or node died) or Ctrl-C / SIGTERM cancels the other
    folds' tasks; the folds they left unfinished are removed, so the run folder holds complete folds only."""
    from medpipe.cluster import Task, run_tasks

    args = (plan.cpus_per_fold, Path(bundle_dir).resolve(), network)
    tasks = [Task(f"fold {k}", (*args, k, folds, split_mode, Path(out_dir).resolve()), overrides) for k in range(folds)]
    finished: list[str] = []

    def report(task: Task, fold_dir: Path) -> None:
        finished.append(task.name)
        print(f"{task.name} finished ({len(finished)} of {folds}): {fold_dir}", flush=True)

    with sigterm_as_interrupt():
        try:
            run_tasks(_fold_attempt, tasks, num_cpus=plan.cpus_per_fold, num_gpus=plan.gpus_per_fold,
                      max_retries=plan.fold_retries, on_done=report)  # fmt: skip
        except KeyboardInterrupt:
            _drop_partial_folds(out_dir, folds)
            raise _interrupted(out_dir, folds) from None
        except MedpipeError as exc:
            _drop_partial_folds(out_dir, folds)
            raise MedpipeError(f"{exc}; the other folds were stopped, no summary written (cv_report on '{out_dir}' "
                               "summarises the finished ones as incomplete)") from None  # fmt: skip


def run_cv(
    bundle: str,
    network: str | None = None,
    folds: int = 5,
    split_mode: str = "group",
    out: str | None = None,
    parallel: int = 1,
    splits: str | None = None,
    cluster: ClusterPlan | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train and evaluate folds 0..K-1, each scored on its own held-out fold, then write cv_summary.json.

    `<out>/splits.json` is written first (from `splits` when given) and every fold job reads its lists from it.
    Folds run here (one after another, or `parallel` processes at a time) or, with `cluster`, as Ray tasks."""
    parallel, folds = whole_number("--parallel", parallel), whole_number("--folds", folds)
    if parallel < 1:
        raise MedpipeError(f"--parallel must be >= 1, got {parallel}")
    if folds < 2:
        raise MedpipeError(f"--folds must be at least 2, got {folds}")
    if cluster is not None and parallel != 1:
        raise MedpipeError("--parallel is for folds on this machine; on a --cluster, Ray runs as many folds at once "
                           "as the nodes have --cpus_per_fold / --gpus_per_fold for")  # fmt: skip
    splits = splits or overrides.pop("splits_file", None)
    bundle_dir = find_bundle(bundle)
    out_dir = Path(out or f"results/{bundle_dir.name}/{network or 'default'}_{split_mode}")
    check_out_dir(out_dir, folds)
    if cluster is not None:  # no cluster answering (or no Ray): one line before anything is written
        from medpipe.cluster import connect

        connect(cluster.address)
    writable_dir(out_dir, "--out folder")
    splits_path = write_run_splits(bundle_dir, network, folds, split_mode, out_dir, overrides, splits)
    jobs = dict(overrides)
    if _takes_splits_file(config_files(bundle_dir, "train", network)):
        jobs["splits_file"] = str(splits_path.resolve())
    started = time.perf_counter()
    if cluster is None:
        _run_folds(bundle_dir, network, folds, split_mode, out_dir, parallel, jobs)
    else:
        _run_folds_on_cluster(bundle_dir, network, folds, split_mode, out_dir, cluster, jobs)
    info = {
        "bundle": bundle_dir.name, "network": network or "default", "split_mode": split_mode, "folds": folds,
        "overrides": overrides, "splits": str(splits_path), "parallel": parallel,
        **({"cluster": cluster.address} if cluster else {}), "wall_time_s": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    return write_summary(out_dir, info)


def rescore_cv(run: str, out: str, **overrides: Any) -> dict[str, Any]:
    """Evaluate the fold models of a finished CV run again, with extra overrides (e.g. `tta=True`), into `out`.

    Network, split, folds and the run's own overrides come from `<run>/cv_summary.json`, and the partition from
    `<run>/splits.json` (copied into `out`), so every fold is scored on exactly the images it held out, by the model
    trained without them.
    """
    run_dir, out_dir = Path(run), Path(out)
    if out_dir.resolve() == run_dir.resolve():
        raise MedpipeError(f"--out must differ from the run folder '{run_dir}' (its own metrics would be overwritten)")
    old = read_run_summary(run_dir, ("bundle", "network", "split_mode", "folds"))
    absent = [f"fold{k}/model.pt" for k in range(old["folds"]) if not (run_dir / f"fold{k}" / "model.pt").is_file()]
    if absent:  # checked before scoring any fold, so a run with a lost model leaves no partial output
        raise MedpipeError(f"'{run_dir}' lacks {', '.join(absent)}: only runs that kept their models can be rescored")
    check_out_dir(out_dir, old["folds"])
    writable_dir(out_dir, "--out folder")
    bundle_dir = find_bundle(old["bundle"])
    network = None if old["network"] == "default" else old["network"]
    merged = {**old.get("overrides", {}), **overrides}
    jobs = dict(merged)
    run_splits = run_dir / SPLITS_FILE
    if run_splits.is_file():  # runs from before splits.json recompute their folds, as they were made
        if len(read_splits(run_splits)["folds"]) != old["folds"]:
            raise MedpipeError(f"'{run_splits}' does not have the run's {old['folds']} folds")
        if _takes_splits_file(config_files(bundle_dir, "train", network)):
            jobs["splits_file"] = str(run_splits.resolve())
    started = time.perf_counter()
    for fold in range(old["folds"]):
        name = f"fold{fold}"
        job = fold_overrides(fold, old["folds"], old["split_mode"], run_dir / name, out_dir / name, jobs)
        run_bundle(bundle_dir, "evaluate", network, **job)
    if run_splits.is_file():
        atomic_write_text(out_dir / SPLITS_FILE, run_splits.read_text())
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
        kept = ("bundle", "network", "split_mode", "folds", "overrides", "splits", "parallel", "cluster", "wall_time_s",
                "rescored_from", "ensemble_of", "members", "wrong_by_every_member")
        info = {k: old[k] for k in kept if k in old}
    return write_summary(out_dir, info)
