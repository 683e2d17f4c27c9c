"""Run the cross-validation jobs that need a GPU as parallel fold processes, and pack what finished by a deadline.

On the lent GPU machine (see tools/gpu_cv/README.md for the whole call):

    python tools/gpu_cv/run_device.py --out $OUT --deadline 430 [--smoke]

Each fold of each job is one process (`run_device.py fold JSON`) doing exactly what `medpipe cv` does for one
fold: the bundle's train job, then its evaluate job, into `results/<job>/fold<k>/`. Folds run side by side
(one CPU thread each) because one small 2-D network leaves an H100 mostly idle. At the deadline unfinished folds
are stopped, `cv_summary.json` is written for every job whose folds all finished, and `$OUT` receives
`results.tar.gz` (metrics, predictions, logs; no checkpoints) plus the checkpoints of jobs marked `return_models`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"

# name, bundle, network, split mode, overrides, evaluate on this machine, bring fold checkpoints back; jobs with
# "default": False (shorter variants for the tail of a lease) run only when named in --only
JOBS: list[dict[str, Any]] = [
    {"name": "covid_cxr_cls/densenet121_224_e25", "bundle": "covid_cxr_cls", "network": "densenet121",
     "split_mode": "group", "overrides": {"epochs": 25, "image_size": 224}, "evaluate": True, "cost": 10},
    {"name": "covid_ct_seg/unet128_e60", "bundle": "covid_ct_seg", "network": "unet", "split_mode": "group",
     "overrides": {"epochs": 60, "image_size": 128, "val_interval": 1000}, "evaluate": True, "cost": 8,
     "return_models": True},
    {"name": "covid_cxr_cls/densenet121_224_e10", "bundle": "covid_cxr_cls", "network": "densenet121",
     "split_mode": "group", "overrides": {"epochs": 10, "image_size": 224}, "evaluate": True, "cost": 10,
     "default": False},
    {"name": "covid_ct_seg/unet128_e25", "bundle": "covid_ct_seg", "network": "unet", "split_mode": "group",
     "overrides": {"epochs": 25, "image_size": 128, "val_interval": 1000}, "evaluate": True, "cost": 8,
     "return_models": True, "default": False},
    # second GPU session: loader workers for augmentation (num_workers); run with --only and --parallel
    {"name": "covid_cxr_cls/densenet121_224_e20_w2", "bundle": "covid_cxr_cls", "network": "densenet121",
     "split_mode": "group", "overrides": {"epochs": 20, "image_size": 224, "num_workers": 2}, "evaluate": True,
     "cost": 10, "default": False},
    {"name": "covid_ct_seg/unet128_e30_w2", "bundle": "covid_ct_seg", "network": "unet", "split_mode": "group",
     "overrides": {"epochs": 30, "image_size": 128, "val_interval": 1000, "num_workers": 2}, "evaluate": True,
     "cost": 8, "return_models": True, "default": False},
    {"name": "covid_ct_seg/unet128_e30_w2_batchdice", "bundle": "covid_ct_seg", "network": "unet",
     "split_mode": "group", "overrides": {"epochs": 30, "image_size": 128, "val_interval": 1000, "num_workers": 2,
                                          "batch_dice": True},
     "evaluate": True, "cost": 8, "return_models": True, "default": False},
    {"name": "brain_tumor_cls/densenet121_group", "bundle": "brain_tumor_cls", "network": "densenet121",
     "split_mode": "group", "overrides": {}, "evaluate": True, "cost": 3},
    {"name": "brain_tumor_cls/densenet121_random", "bundle": "brain_tumor_cls", "network": "densenet121",
     "split_mode": "random", "overrides": {}, "evaluate": True, "cost": 3},
    {"name": "brain_tumor_cls/resnet18_random", "bundle": "brain_tumor_cls", "network": "resnet18",
     "split_mode": "random", "overrides": {"epochs": 30}, "evaluate": True, "cost": 2},
]  # fmt: skip
SMOKE_OVERRIDES = {"epochs": 1, "max_cases": 40}


def run_fold(spec: dict[str, Any]) -> None:
    """One fold: train, then evaluate, as `medpipe cv` does (child process)."""
    import torch

    torch.set_num_threads(1)
    from medpipe.bundle.config import find_bundle
    from medpipe.evaluation.cv import run_fold as train_and_evaluate

    bundle, out_dir = find_bundle(spec["bundle"]), Path(spec["results"]) / spec["name"]
    started = time.perf_counter()
    fold_dir = train_and_evaluate(bundle, spec["network"], spec["fold"], spec["folds"], spec["split_mode"], out_dir,
                                  evaluate=spec["evaluate"], **spec["overrides"])  # fmt: skip
    timing = {"train_and_evaluate_s": round(time.perf_counter() - started, 1)}
    (fold_dir / "timing.json").write_text(json.dumps(timing))


def fold_specs(smoke: bool, folds: int) -> list[dict[str, Any]]:
    specs = []
    for job in sorted(JOBS, key=lambda j: -j["cost"]):
        overrides = {**job["overrides"], **(SMOKE_OVERRIDES if smoke else {})}
        for fold in range(1 if smoke else folds):
            specs.append({**job, "overrides": overrides, "fold": fold, "folds": folds, "results": str(RESULTS)})
    return specs


def launch(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    log = RESULTS / spec["name"] / f"fold{spec['fold']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, __file__, "fold", json.dumps(spec)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )


def run_all(specs: list[dict[str, Any]], parallel: int, deadline: float) -> dict[str, str]:
    """Start folds as slots free up; stop what is left at the deadline. Returns each fold's outcome."""
    pending, running, outcome = list(specs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            spec = pending.pop(0)
            running[f"{spec['name']}/fold{spec['fold']}"] = (launch(spec), time.perf_counter())
        for key, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                outcome[key] = f"rc {proc.returncode} after {time.perf_counter() - started:.0f} s"
                print(f"[{time.strftime('%H:%M:%S')}] {key}: {outcome[key]}", flush=True)
                del running[key]
        if time.perf_counter() > deadline:
            for key, (proc, _) in running.items():
                os.killpg(proc.pid, signal.SIGKILL)
                outcome[key] = "stopped at the deadline"
            outcome.update({f"{s['name']}/fold{s['fold']}": "not started" for s in pending})
            break
        time.sleep(1)
    return outcome


def summarize(smoke: bool, folds: int) -> None:
    from medpipe.evaluation.cv import write_summary

    for job in JOBS:
        out_dir = RESULTS / job["name"]
        done = [d for d in out_dir.glob("fold*/") if (d / "metrics.json").is_file()]
        if len(done) == (1 if smoke else folds):
            info = {"bundle": job["bundle"], "network": job["network"] or "default", "split_mode": job["split_mode"],
                    "folds": folds, "overrides": job["overrides"], "machine": "gpu (tools/gpu_cv)"}  # fmt: skip
            try:
                write_summary(out_dir, info)
            except Exception as exc:  # one job's summary must not lose the others' results
                print(f"{out_dir}: no summary: {exc}", flush=True)


def pack(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for job in JOBS:
            for path in sorted((RESULTS / job["name"]).rglob("*")):
                if path.is_file() and path.suffix != ".pt":
                    tar.add(path, arcname=str(path.relative_to(RESULTS)))
        for extra in sorted(RESULTS.glob("gpu_*")):
            tar.add(extra, arcname=extra.name)
    for job in (j for j in JOBS if j.get("return_models")):
        for model in sorted((RESULTS / job["name"]).glob("fold*/model.pt")):
            shutil.copy(model, out / f"{job['name'].replace('/', '__')}__{model.parent.name}.pt")


def side_runs(smoke: bool) -> None:
    """The CXR speed benchmark (before the folds, alone on the GPU) is run by main; this makes the Grad-CAM figure."""
    for job in (j for j in JOBS if j["bundle"] == "covid_cxr_cls"):
        fold0 = RESULTS / job["name"] / "fold0"
        if not ((fold0 / "model.pt").is_file() and (fold0 / "predictions.csv").is_file()):
            continue
        command = [sys.executable, "bundles/covid_cxr_cls/scripts/gradcam_figure.py", str(fold0.parent),
                   "--network", job["network"], "--out", str(RESULTS / "gpu_gradcam_examples.png")]  # fmt: skip
        _logged(command, RESULTS / "gpu_gradcam.log", timeout=60)
        break


def _logged(command: list[str], log: Path, timeout: float) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as fh:
        try:
            subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            fh.write(b"\nstopped: timeout\n")
    print(log.read_text()[-1500:], flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "fold":
        run_fold(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=430.0, help="seconds from start; then pack and exit")
    parser.add_argument("--parallel", type=int, default=16)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="1 epoch, 40 cases, fold 0 of each job")
    parser.add_argument("--only", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace job folders that hold a cv_summary.json")
    parser.add_argument("--skip_bench", action="store_true", help="for a dry run on a CPU machine")
    args = parser.parse_args()
    deadline = time.perf_counter() + args.deadline
    unknown = set(filter(None, args.only.split(","))) - {j["name"] for j in JOBS}
    if unknown:
        raise SystemExit(f"--only names unknown jobs {sorted(unknown)}; known: {[j['name'] for j in JOBS]}")
    JOBS[:] = (
        [j for j in JOBS if j["name"] in args.only.split(",")]
        if args.only
        else [j for j in JOBS if j.get("default", True)]
    )
    global RESULTS
    if args.smoke:  # never mix smoke folds with real ones
        RESULTS = RESULTS / "smoke"
    for job in JOBS:
        job_dir = RESULTS / job["name"]
        if (job_dir / "cv_summary.json").is_file() and not args.overwrite:
            raise SystemExit(f"'{job_dir}' holds finished results; move it away or pass --overwrite")
        shutil.rmtree(job_dir, ignore_errors=True)
    specs = fold_specs(args.smoke, args.folds)
    steps = "2" if args.smoke else "20"
    for batch in () if args.skip_bench else ("16", "64"):
        _logged([sys.executable, "benchmarks/bench_cxr.py", "--steps", steps, "--batch", batch],
                RESULTS / f"gpu_bench_cxr_b{batch}.txt", timeout=90)  # fmt: skip
    print(f"{len(specs)} fold runs, {args.parallel} at a time, deadline {args.deadline:.0f} s", flush=True)
    outcome = run_all(specs, args.parallel, deadline)
    (RESULTS / "gpu_outcome.json").write_text(json.dumps(outcome, indent=1))
    summarize(args.smoke, args.folds)
    side_runs(args.smoke)
    pack(args.out)
    failed = {k: v for k, v in outcome.items() if not v.startswith("rc 0")}
    print(f"finished: {len(outcome) - len(failed)} of {len(outcome)} folds; not finished: {failed}", flush=True)


if __name__ == "__main__":
    main()
