"""The `medpipe` verbs: each parses its arguments, calls one library function and prints where the output went.

Library modules hold no command functions; this module holds nothing else. Imports are local to each verb so that
`medpipe --help` does not import torch, MONAI or MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medpipe.errors import MedpipeError

if TYPE_CHECKING:  # for the annotations only: `medpipe --help` imports no MONAI
    from medpipe.data.classification_check import ClassificationBundle

BANNER = "=" * 78


def ingest_command(
    dicom_dir: str,
    out_dir: str,
    on_gap: str = "error",
    skip_invalid: bool = False,
    date_shift_days: int | None = None,
    allow_burned_in: bool = False,
) -> None:
    """Convert every DICOM series under DICOM_DIR to NIfTI (RAS affine) + de-identified JSON sidecar in OUT_DIR.

    --on_gap error|warn: a series with missing slices fails (default) or is written with the gap filled.
    --skip_invalid: leave invalid series out (listed in the summary) instead of failing.
    --date_shift_days N: keep the study date shifted by N days in the sidecar (default: dates removed).
    --allow_burned_in: ingest series with BurnedInAnnotation YES (refused by default), recorded in their sidecars.
    """
    from medpipe.io.ingest import format_summary, ingest
    from medpipe.values import flag

    try:
        skip = flag(skip_invalid)  # fire passes `--skip_invalid false` as the string 'false'
    except MedpipeError as exc:
        raise MedpipeError(f"--skip_invalid: {exc}") from exc
    try:
        burned_in = flag(allow_burned_in)
    except MedpipeError as exc:
        raise MedpipeError(f"--allow_burned_in: {exc}") from exc
    summary = ingest(str(dicom_dir), str(out_dir), str(on_gap), skip, date_shift_days, burned_in)
    print(format_summary(summary))


def compare_command(experiment: str, tracking_uri: str | None = None, max_runs: int = 20) -> None:
    """medpipe compare EXPERIMENT [--tracking_uri URI] [--max_runs N]

    Print the experiment's runs side by side, newest first: status, time, git SHA, parameters and last metric values.
    """
    from medpipe.tracking.compare import format_table, runs_table

    print(format_table(runs_table(experiment, tracking_uri, max_runs)))


def run_command(
    bundle: str, config: str = "train", network: str | None = None, cluster: str | None = None,
    per_task: int | None = None, cpus_per_task: int | None = None, gpus_per_task: float | None = None,
    task_retries: int | None = None, **overrides: Any,
) -> None:
    """medpipe run BUNDLE [train|evaluate|inference] [--network NAME] [--key value …]
    medpipe run BUNDLE inference --cluster ray|auto|ray://HOST:PORT|HOST:PORT [--per_task N] [--cpus_per_task 1]
        [--gpus_per_task 0] [--task_retries 2] [--key value …]

    BUNDLE is a bundle folder or the name of one under ./bundles.
    --cluster runs the inference over its inputs as Ray tasks, --per_task inputs each (default one series, or 4 of
    the bundle's batches of images), recording finished inputs in `<output_dir>/inference_manifest.jsonl`: a rerun
    skips them. It ends with the summary the local run writes (docs/scale.md: every node needs the same paths).
    """
    from medpipe.bundle.config import find_bundle, run_bundle

    task = {"per_task": per_task, "cpus_per_task": cpus_per_task, "gpus_per_task": gpus_per_task,
            "task_retries": task_retries}  # fmt: skip
    given = {k: v for k, v in task.items() if v is not None}
    if cluster is None:
        if given:
            raise MedpipeError(f"--{next(iter(given))} applies to inference on a --cluster")
        run_bundle(find_bundle(bundle), config, network, **overrides)
        return
    if config != "inference":
        raise MedpipeError(f"--cluster runs inference jobs, not '{config}': for training folds on a cluster use "
                           "`medpipe cv --cluster`, for one training on several machines torchrun (docs/scale.md)")
    from medpipe.bundle.archive import InferencePlan, run_inference_on_cluster

    run_inference_on_cluster(bundle, network, InferencePlan.checked(cluster, **given), **overrides)


def run_help_command(bundle: str, config: str = "train", network: str | None = None) -> None:
    """medpipe run BUNDLE [train|evaluate|inference] --help — the bundle's declared parameters with their defaults."""
    from medpipe.bundle.config import config_files, find_bundle
    from medpipe.bundle.parameters import describe_parameters

    bundle_dir = find_bundle(bundle)
    print(f"medpipe run {bundle} {config} [--network NAME] [--key value …]; parameters:\n")
    print(describe_parameters(bundle_dir, config_files(bundle_dir, config, network)))


def cv_command(
    bundle: str, network: str | None = None, folds: int = 5, split_mode: str = "group", out: str | None = None,
    parallel: int = 1, splits: str | None = None, cluster: str | None = None, cpus_per_fold: int | None = None,
    gpus_per_fold: float | None = None, fold_retries: int | None = None, **overrides: Any,
) -> None:
    """medpipe cv BUNDLE [--network NAME] [--folds 5] [--split_mode group|random] [--out DIR] [--parallel N]
    [--splits FILE] [--cluster ray|auto|ray://HOST:PORT|HOST:PORT [--cpus_per_fold 1] [--gpus_per_fold 0]
    [--fold_retries 2]] [--key value …]

    --parallel N trains N folds at a time in separate processes, splitting the CPU cores between them.
    --cluster runs every fold as a Ray task declaring --cpus_per_fold / --gpus_per_fold; a fold lost with its worker
    or node is run again up to --fold_retries times (docs/scale.md: every node needs the same paths).
    --splits FILE reuses the fold partition of a splits.json (e.g. another run's `<out>/splits.json`).
    --out must be a new folder, or one holding no fold results. Writes `<out>/splits.json` before any fold runs,
    `<out>/fold<k>/{model.pt,metrics.json,predictions.csv}` and `<out>/cv_summary.json` (mean ± sd over folds, and
    pooled out-of-fold metrics with bootstrap CIs).
    """
    from medpipe.evaluation.cv import ClusterPlan, run_cv

    task = {"cpus_per_fold": cpus_per_fold, "gpus_per_fold": gpus_per_fold, "fold_retries": fold_retries}
    given = {k: v for k, v in task.items() if v is not None}
    if cluster is None and given:
        raise MedpipeError(f"--{next(iter(given))} applies to folds on a --cluster; without one, use --parallel N")
    plan = None if cluster is None else ClusterPlan.checked(cluster, **given)
    run_cv(bundle, network, folds, split_mode, out, parallel, splits, cluster=plan, **overrides)


def cv_report_command(out: str) -> None:
    """medpipe cv_report OUT_DIR — rebuild cv_summary.json from the fold folders' files and print it.

    A run with fewer finished folds than its splits.json holds is summarised with a warning and marked incomplete
    (`folds_completed`, `missing_folds`); cv_rescore and cv_ensemble refuse such a run."""
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


def cv_postprocessing_command(run: str, fractions: Any = None) -> None:
    """medpipe cv_postprocessing RUN_DIR [--fractions 0.0005,0.001] — choose segmentation post-processing by CV.

    RUN_DIR holds raw out-of-fold label maps:
    `medpipe cv_rescore CV_RUN --out RUN_DIR --save_predictions true --min_infection_fraction 0`.
    Scores each candidate (infection components under a fraction of the slice area become lung) as evaluation
    does, keeps the best only if it beats none, writes `<RUN_DIR>/postprocessing.json` and prints the table; use
    the chosen value as `--min_infection_fraction` (covid_ct_seg).
    """
    from medpipe.evaluation.postprocessing_choice import CANDIDATES, choose_postprocessing

    grid = CANDIDATES
    if fractions is not None:
        grid = tuple(fractions) if isinstance(fractions, (list, tuple)) else tuple(str(fractions).split(","))
    result = choose_postprocessing(run, grid)
    print(f"{'min_infection_fraction':>24} {'Dice lung':>10} {'Dice infection':>15} {'HD95 infection':>15}")
    for row in result["candidates"]:
        cells = [row[k]["value"] for k in ("dice_lung", "dice_infection", "hd95_infection")]
        print(f"{row['min_infection_fraction']:>24g} {cells[0]:>10.4f} {cells[1]:>15.4f} {cells[2]:>15.2f}")
    chosen = result["chosen"]["min_infection_fraction"]
    print(f"chosen: --min_infection_fraction {chosen:g} -> {Path(run) / 'postprocessing.json'}")


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


def serve_command(
    routing: str, work_dir: str | None = None, port: int | None = None, ae_title: str | None = None,
    quiet_seconds: float | None = None,
) -> None:
    """medpipe serve ROUTING_FILE [--work_dir DIR] [--port N] [--ae_title AE] [--quiet_seconds S]
    medpipe serve status WORK_DIR

    Run the DICOM node (docs/serve.md) until SIGTERM / Ctrl-C; the options override the routing file's `node`.
    `status` prints queue counts, jobs waiting to send and the last errors of the node whose work folder is WORK_DIR.
    """
    import logging
    import signal

    if routing == "status":
        from medpipe.serve.status import format_status, node_status

        print(format_status(node_status(work_dir or ".")))
        return
    from medpipe.serve.routing import load_settings
    from medpipe.serve.worker import Node

    settings = load_settings(routing, work_dir=work_dir, port=port, ae_title=ae_title, quiet_seconds=quiet_seconds)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    node = Node(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: node.stopping.set())
    print(f"medpipe node {settings.ae_title} on {settings.host}:{settings.port}, work folder {settings.work_dir}")
    node.serve_forever()


def pull_command(study_uid: str, routing: str, source: str, work_dir: str | None = None) -> None:
    """medpipe pull STUDY_UID ROUTING_FILE --source AE@HOST:PORT|dicomweb+http://HOST:PORT/PATH [--work_dir DIR]

    Fetch a study into the node's queue (the running `medpipe serve` processes it): by C-GET from a DICOM peer, or by
    QIDO-RS + WADO-RS from a DICOMweb service (credentials: the routing file's destination with the same URL).
    """
    from medpipe.serve.pull import parse_peer, pull_study
    from medpipe.serve.routing import load_settings

    settings = load_settings(routing, work_dir=work_dir)
    count = pull_study(settings, parse_peer(source), str(study_uid))
    print(f"pulled {count} instance(s) of study {study_uid} into {settings.work_dir}")


def viewer_command(routing: str, port: int = 3000, orthanc_port: int = 8042, work_dir: str | None = None) -> None:
    """medpipe viewer ROUTING_FILE [--port 3000] [--orthanc_port 8042] [--work_dir DIR]
    medpipe viewer install

    Start, on 127.0.0.1 only, Orthanc (DICOMweb on) as the routing file's destination, the node, and the OHIF
    viewer over Orthanc's /dicom-web/; print the viewer's URL and run until SIGTERM / Ctrl-C (docs/viewer.md).
    `install` only fetches the pinned OHIF release with npm into the cache folder.
    """
    import logging
    import signal
    import threading

    from medpipe.viewer.ohif import install_ohif

    if routing == "install":
        print(f"OHIF in {install_ohif()}")
        return
    from medpipe.serve.routing import load_settings
    from medpipe.viewer.stack import ViewerStack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stack = ViewerStack(load_settings(routing, work_dir=work_dir), orthanc_http_port=int(orthanc_port), port=int(port))
    try:
        settings = stack.settings
        print(f"Orthanc {stack.orthanc.url} (DICOM {settings.destination.ae_title}@127.0.0.1:"
              f"{settings.destination.port}), node {settings.ae_title}@127.0.0.1:{settings.port}", flush=True)
        print(f"viewer: {stack.url}", flush=True)
        while not stop.wait(1.0):
            if not stack.node_thread.is_alive():
                raise stack.node_error or MedpipeError("the node stopped")
    finally:
        stack.stop()


def export_command(
    bundle: str, format: str = "onnx", quantize: str | None = None, ckpt: str | None = None,  # noqa: A002
    network: str | None = None, calibration_images: int = 32, **overrides: Any,
) -> None:
    """medpipe export BUNDLE --format onnx|torchscript [--quantize int8] [--ckpt PATH] [--network NAME] [--key value …]

    Writes the trained network beside the checkpoint (default the bundle's ckpt_path): model.onnx, model.int8.onnx
    or model.ts, verified against eager PyTorch, with a sidecar <file>.json (sha256, checkpoint sha256, versions).
    int8 is calibrated on --calibration_images training images (needs the bundle's data). Run the bundle on it with
    `--runtime onnxruntime|onnxruntime_int8|torchscript`.
    """
    from medpipe.export.exporters import export_bundle

    export_bundle(bundle, format, quantize, ckpt, network, calibration_images, **overrides)


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
    # the demo's folder is its own: a rerun (`make main` again) replaces its model, which training alone refuses
    for old in ("model.pt", "last.pt", "model.trained_on.json"):
        (out_dir / "models" / old).unlink(missing_ok=True)
    if epochs is not None:
        common["epochs"] = epochs
    bundle = find_bundle("brain_tumor_cls")
    run_bundle(bundle, "train", network, output_dir=str(out_dir), **common)
    run_bundle(bundle, "evaluate", network, output_dir=str(out_dir), **common)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    print(f"\n{BANNER}\nbrain_tumor_cls / {network}, group-aware fold 0 of 5, {source}\n{BANNER}")
    print(_table(metrics))
    print(f"\nfiles: {out_dir / 'metrics.json'}, {out_dir / 'predictions.csv'}, {out_dir / 'models' / 'model.pt'}")


def cards_command(action: str = "render", *args: Any, root: str = ".", **kwargs: Any) -> None:
    """medpipe cards render|check [--root .]
    medpipe cards add RESULTS_JSON RUN_DIR --recipe NAME [--table performance] [--label TEXT] [--command CMD]
        [--date YYYY-MM-DD] [--device TEXT]

    render: rewrite the performance tables of the model cards from docs/results/*.json; check: fail if a card
    differs from its results file; add: put a CV run's cv_summary.json into a results file as a row, then render.
    """
    from medpipe.evaluation.results_tables import add_run, render_all, render_file

    if action == "add":
        known = {"recipe", "table", "label", "command", "date", "device"}
        if len(args) != 2 or "recipe" not in kwargs or set(kwargs) - known:
            raise MedpipeError(
                "usage: medpipe cards add RESULTS_JSON RUN_DIR --recipe NAME [--table T] [--label TEXT] "
                "[--command CMD] [--date YYYY-MM-DD] [--device TEXT]"
            )
        row = add_run(args[0], args[1], **{k: str(v) for k, v in kwargs.items()})  # fire turns '7' into 7
        print(f"{args[0]}: row '{row['recipe']}' from {args[1]}")
        changed = render_file(args[0], root)
    elif action in ("render", "check"):
        if args or kwargs:
            raise MedpipeError(f"medpipe cards {action} takes only --root, got {list(args) + list(kwargs)}")
        changed = render_all(root, check=action == "check")
    else:
        raise MedpipeError(f"medpipe cards: unknown action '{action}'; use render, check or add")
    print("\n".join(f"rendered {p}" for p in changed) if changed else "cards are up to date")


def calibrate_command(run: str, out: str | None = None) -> None:
    """medpipe calibrate RUN_DIR [--out FILE] — fit a temperature on a CV run's out-of-fold predictions.

    Reads `RUN_DIR/fold*/predictions.csv`, writes calibration.json (default `RUN_DIR/calibration.json`: temperature,
    ECE / Brier / NLL before and after, reliability bins, the uncertainty threshold that flags 10 % of cases and the
    accuracy of flagged vs unflagged cases) and prints before/after. Bundles apply it with `--calibration_file FILE`.
    """
    from medpipe.evaluation.calibration import calibrate_run, format_calibration

    print(format_calibration(calibrate_run(run, out)))


def guard_command(
    action: str, *paths: str, expected: str | None = None, data_root: str | None = None, out: str | None = None,
    seed: int = 0, model_file: str | None = None,
) -> None:
    """medpipe guard fit [--data_root $MEDPIPE_DATA] [--out FILE] [--seed 0]
    medpipe guard check IMAGE [IMAGE …] --expected brain_mri|chest_xray|ct [--model_file FILE]

    fit: refit the wrong-input guard on a group-aware draw of the shared sets and print held-out flag rates
    (default --out: input_guard.npz in $MEDPIPE_CACHE_DIR or ~/.cache/medpipe, where first use also fits it).
    check: one line per image (ok, or what it looks like instead).
    """
    if action == "fit":
        from medpipe.data.datalists import data_root as default_root
        from medpipe.inference.guard_fit import fit_guard, format_measurement

        print(format_measurement(fit_guard(data_root or default_root(), out, int(seed))))
    elif action == "check":
        from medpipe.inference.input_guard import MODALITIES, InputGuard

        if not paths or expected not in MODALITIES:
            raise MedpipeError(f"usage: medpipe guard check IMAGE [IMAGE …] --expected one of {sorted(MODALITIES)}")
        guard = InputGuard(expected, model_file, log_flags=False)  # the lines below say it once
        for path in paths:
            modality, verdict = guard.check(str(path))
            print(f"{path}: {verdict} (most like {modality})")
    else:
        raise MedpipeError(f"medpipe guard: unknown action '{action}'; use fit or check")


def dataset_command(
    action: str, path: str | None = None, dst: str | None = None, layout: str | None = None,
    bundle: str | None = None, label_map: Any = None, absent_structures: Any = None, to: str | None = None,
    max_cases: int = -1,
) -> None:
    """medpipe dataset check PATH [--layout nnunet|msd|dicom_seg] [--bundle NAME [--label_map JSON]
    [--absent_structures S]]
    medpipe dataset check PATH --bundle brain_tumor_cls|covid_cxr_cls
    medpipe dataset check PATH --bundle covid_ct_seg   (PATH holding datalist.json: the shipped PNG slice layout)
    medpipe dataset convert SRC DST --to nnunet [--max_cases N]

    check: a segmentation data set (nnU-Net v2 raw, MSD / MONAI datalist or DICOM + DICOM-SEG, docs/datasets.md):
    one `error:` line per problem, then a summary (cases, labels and voxel counts, spacings, orientations, intensity
    range); exits non-zero on any problem. --bundle NAME: also map the labels onto the bundle's classes, by name or by
    --label_map '{"lung": ["left lung", "right lung"]}'; --absent_structures infection: the data set holds none.
    With a classification bundle, PATH is checked as that bundle reads it (class folders or labels.csv, its classes):
    one `error:` line per problem, then images per class, sizes, modes, exact copies and the groups folds split by.
    convert: the covid_ct_seg PNG slices (datalist.json) into an nnU-Net v2 raw folder DST, each volume group's
    slices stacked in source_index order (--max_cases N: the first N volume groups).
    """
    from medpipe.data.integrity import bundle_classes, check_dataset, format_report, parse_label_map, parse_names

    if action == "convert":
        from medpipe.data.convert import convert_dataset

        if path is None or dst is None or to is None:
            raise MedpipeError("usage: medpipe dataset convert SRC DST --to nnunet [--max_cases N]")
        written = convert_dataset(str(path), str(dst), str(to), int(max_cases))
        print(f"wrote {written['cases']} case(s) ({written['slices']} slices) to {written['folder']}")
        return
    if action != "check" or path is None or dst is not None:
        raise MedpipeError("usage: medpipe dataset check PATH [--layout nnunet|msd|dicom_seg] [--bundle NAME] "
                           "[--label_map JSON] | medpipe dataset convert SRC DST --to nnunet")
    classes = None
    if bundle is not None:
        from medpipe.bundle.config import find_bundle
        from medpipe.data.classification_check import classification_bundle

        bundle_dir = find_bundle(str(bundle))
        reads = classification_bundle(bundle_dir)
        if reads is not None:
            _check_classification_dataset(str(path), reads, layout=layout, label_map=label_map,
                                          absent_structures=absent_structures)  # fmt: skip
            return
        classes = bundle_classes(bundle_dir)
        if (Path(str(path)) / "datalist.json").is_file() and layout in (None, "png"):
            _check_png_slices(str(path), classes, label_map=label_map, absent_structures=absent_structures)
            return
    elif label_map is not None or absent_structures is not None:
        given = "--label_map" if label_map is not None else "--absent_structures"
        raise MedpipeError(f"{given} maps labels onto a bundle's classes: give --bundle NAME too")
    report = check_dataset(str(path), None if layout is None else str(layout), classes, parse_label_map(label_map),
                           parse_names(absent_structures))  # fmt: skip
    print(format_report(report))
    if not report.ok:
        raise MedpipeError(f"{path}: {len(report.problems)} problem(s), each an 'error:' line above")


def _check_png_slices(path: str, classes: dict[str, Any], **volume_only: Any) -> None:
    """`dataset check PATH --bundle covid_ct_seg` on the shipped slice layout (datalist.json of PNG slices)."""
    from medpipe.data.slices_check import check_png_slices, format_slice_report

    given = [f"--{key}" for key, value in volume_only.items() if value is not None]
    if given:
        raise MedpipeError(f"{', '.join(given)}: for volume layouts; '{path}' is the PNG slice layout, whose labels "
                           "are the bundle's classes")  # fmt: skip
    report = check_png_slices(path, classes["class_names"])
    print(format_slice_report(report))
    if not report.ok:
        raise MedpipeError(f"{path}: {len(report.problems)} problem(s), each an 'error:' line above")


def _check_classification_dataset(path: str, reads: ClassificationBundle, **segmentation_only: Any) -> None:
    """`dataset check PATH --bundle NAME` for a classification bundle: the layout and classes are the bundle's."""
    from medpipe.data.classification_check import check_classification_dataset, format_classification_report

    given = [f"--{key}" for key, value in segmentation_only.items() if value is not None]
    if given:
        raise MedpipeError(f"{', '.join(given)}: segmentation only; {reads.name} reads {reads.layout} with its own "
                           "classes (docs/datasets.md)")  # fmt: skip
    report = check_classification_dataset(path, reads)
    print(format_classification_report(report))
    if not report.ok:
        raise MedpipeError(f"{path}: {len(report.problems)} problem(s), each an 'error:' line above")
