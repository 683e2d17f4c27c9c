"""Ray against the local loop on this machine: what a second Ray worker buys and what Ray costs.

Two workloads, each timed in the local loop, then on a local Ray instance with 1 and with 2 worker CPUs, and printed
with ratios against the local loop measured in the same run (never absolute targets):

- inference: N copies of the RIDER chest CT (`$MEDPIPE_DATA/dicom/rider_pilot_chest_ct_0117`, 95 × 512²) through
  covid_ct_seg's inference job with seeded random weights (weights do not change the speed). Local: one job over
  all N series (`medpipe run covid_ct_seg inference`, the model loaded once). Ray: the same command with `--cluster`
  (medpipe.bundle.archive: one task per series running the same job, the network built once per worker and the
  checkpoint loaded per series, the manifest and the merged report.json), so the ratio holds Ray's scheduling, the
  per-task job set-up and the bookkeeping; series per minute for each;
- cross-validation: a 2-fold brain_tumor_cls CV (paper CNN, synthetic images) with `medpipe cv`'s own code: folds one
  after another, `--parallel 2`, and `--cluster` on 1 and 2 Ray workers.

    OMP_NUM_THREADS=1 MEDPIPE_DATA=../shared/data python benchmarks/bench_ray.py [--copies 4] [--skip_inference]
        [--skip_cv] [--epochs 2]

Needs `pip install -e '.[ray]'`. One thread per task (the worker count is the only thing that changes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CT_BUNDLE = REPO / "bundles" / "covid_ct_seg"
RIDER = "dicom/rider_pilot_chest_ct_0117"


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def stage_copies(series: Path, copies: int, root: Path) -> list[Path]:
    """`copies` folders holding the series' files (hard links where the file system allows: no extra space)."""
    folders = []
    for i in range(copies):
        folder = root / f"series_{i:03d}"
        folder.mkdir(parents=True)
        for src in sorted(p for p in series.iterdir() if p.is_file()):
            try:
                os.link(src, folder / src.name)
            except OSError:
                shutil.copy2(src, folder / src.name)
        folders.append(folder)
    return folders


def random_checkpoint(root: Path) -> Path:
    """The bundle's default network with seeded initial weights, saved as a model.pt the inference job loads."""
    import torch
    from monai.bundle import ConfigParser

    from medpipe.bundle.config import config_files

    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files(CT_BUNDLE, "train", None)])
    parser["bundle_root"] = str(CT_BUNDLE)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    path = root / "model.pt"
    torch.save(network.state_dict(), path)
    return path


def infer(inputs: list[str], ckpt: str, output_dir: str) -> None:
    """covid_ct_seg's inference job on one thread, as `medpipe run covid_ct_seg inference` runs it."""
    import torch

    from medpipe.bundle.config import run_bundle

    torch.set_num_threads(1)
    run_bundle(CT_BUNDLE, "inference", None, ckpt_path=ckpt, input=inputs, output_dir=output_dir)


def on_ray(workers: int, work: Callable[[], Any]) -> float:
    """Wall time of `work` on a fresh local Ray instance with `workers` CPUs (its start-up not counted)."""
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        return timed(work)
    finally:
        ray.shutdown()


def bench_inference(series: list[Path], ckpt: Path, root: Path) -> None:
    from medpipe.bundle.archive import InferencePlan, run_inference_on_cluster

    n, inputs = len(series), [str(s) for s in series]
    local = timed(lambda: infer(inputs, str(ckpt), str(root / "local")))
    print(f"inference, {n} series, local loop (one job, model loaded once): {local:.1f} s, "
          f"{60 * n / local:.2f} series/min (1.00x)")  # fmt: skip
    for workers in (1, 2):
        job = {"input": inputs, "ckpt_path": str(ckpt), "output_dir": str(root / f"ray{workers}")}
        plan = InferencePlan("ray", per_task=1, cpus_per_task=1, task_retries=0)
        wall = on_ray(workers, lambda job=job, plan=plan: run_inference_on_cluster("covid_ct_seg", None, plan, **job))
        print(f"inference, {n} series, --cluster on {workers} Ray worker(s) (one task per series): {wall:.1f} s, "
              f"{60 * n / wall:.2f} series/min ({local / wall:.2f}x the local loop)")  # fmt: skip


def bench_cv(root: Path, epochs: int) -> None:
    from medpipe.data.synthetic import make_synthetic_set
    from medpipe.evaluation.cv import ClusterPlan, run_cv

    data = make_synthetic_set(root / "data", per_class=12, size=64)
    common = {"dataset_dir": str(data), "epochs": epochs, "image_size": 64}

    def cv(name: str, **options: Any) -> Callable[[], Any]:
        return lambda: run_cv("brain_tumor_cls", "paper_cnn", 2, "group", str(root / name), **options, **common)

    import torch

    torch.set_num_threads(1)  # the sequential baseline on one thread, as each Ray fold task runs
    local = timed(cv("sequential"))
    print(f"2-fold CV, folds one after another: {local:.1f} s (1.00x)")
    pool = timed(cv("parallel2", parallel=2))
    print(f"2-fold CV, --parallel 2 (process pool): {pool:.1f} s ({local / pool:.2f}x)")
    for workers in (1, 2):
        wall = on_ray(workers, cv(f"ray{workers}", cluster=ClusterPlan("ray", cpus_per_fold=1)))
        print(f"2-fold CV, --cluster on {workers} Ray worker(s): {wall:.1f} s ({local / wall:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="copies of the RIDER series to segment")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per CV fold")
    parser.add_argument("--skip_inference", action="store_true")
    parser.add_argument("--skip_cv", action="store_true")
    args = parser.parse_args()
    print(f"cpus {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory(prefix="bench_ray_") as tmp:
        root = Path(tmp)
        if not args.skip_inference:
            from medpipe.data.datalists import data_root

            rider = Path(data_root()) / RIDER
            if not rider.is_dir():
                raise SystemExit(f"no RIDER series at {rider}: set MEDPIPE_DATA (or pass --skip_inference)")
            bench_inference(stage_copies(rider, args.copies, root / "series"), random_checkpoint(root), root)
        if not args.skip_cv:
            bench_cv(root / "cv", args.epochs)


if __name__ == "__main__":
    main()
