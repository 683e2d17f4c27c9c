"""Inference of a bundle over many inputs as Ray tasks (`medpipe run BUNDLE inference --cluster …`): resumable, and
ending in the summary the local run writes.

The inputs (a classification bundle's images, covid_ct_seg's series or volumes) are cut into parts; each part is one
Ray task that runs the bundle's own inference job on it into a staging folder of its own, moves the per-input files
(masks, DICOM-SEG, Grad-CAM overlays) into the output folder and hands back its summary rows. Only the driver writes
the record: one line per finished part in `<output_dir>/inference_manifest.jsonl` (its inputs, files and rows), and
at the end the summary (`predictions.csv` / `report.json`) of all inputs in input order, built from those lines with
the functions the bundles' own writers use. A rerun skips the inputs the manifest holds and never writes their files
again; a summary that would not change is not rewritten."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medpipe.errors import MedpipeError, find_medpipe_error
from medpipe.files import atomic_write_text, sha256_file, writable_dir
from medpipe.values import path_list, whole_number

MANIFEST = "inference_manifest.jsonl"
MANIFEST_FORMAT = "medpipe inference manifest 1"
STAGING = ".parts"  # each task's own staging folder lies below it, inside the output folder (same file system)
PER_PART = ("input", "output_dir", "output_names")  # what differs between the jobs of one run
IMAGES_PER_TASK = 4  # default images per task, in the bundle's batches


@dataclass(frozen=True)
class Kind:
    """How a bundle's inference summarises its inputs, and how that summary is cut into rows and joined again."""

    unit: str  # what one input is, in messages
    summary: str  # the file a local run writes for all inputs
    split: Callable[[Path], tuple[Any, dict[str, Any]]]  # summary file -> (header, {input: row})
    join: Callable[[Any, Sequence[Any]], str]  # header, rows in input order -> the summary's text


def _split_predictions(path: Path) -> tuple[Any, dict[str, Any]]:
    from medpipe.evaluation.reports import split_predictions

    return split_predictions(path.read_text())


def _join_predictions(header: Any, rows: Sequence[Any]) -> str:
    from medpipe.evaluation.reports import join_predictions

    return join_predictions(header, rows)


def _split_report(path: Path) -> tuple[Any, dict[str, Any]]:
    from medpipe.inference.ct_volume import split_report

    return split_report(json.loads(path.read_text()))


def _join_report(header: Any, rows: Sequence[Any]) -> str:
    from medpipe.inference.ct_volume import join_report

    return join_report(header, rows)


KINDS = {
    "images": Kind("images", "predictions.csv", _split_predictions, _join_predictions),
    "volumes": Kind("series", "report.json", _split_report, _join_report),
}


def bundle_kind(files: Sequence[str]) -> str:
    """The kind "volumes" for a bundle whose inference segments volumes (an `infer#segmenter`), else "images"."""
    from monai.bundle import ConfigParser

    infer = ConfigParser.load_config_files(list(files)).get("infer", {})
    return "volumes" if isinstance(infer, Mapping) and "segmenter" in infer else "images"


@dataclass(frozen=True)
class InferencePlan:
    """Where `medpipe run BUNDLE inference --cluster` runs, and what each task takes and declares."""

    address: str
    per_task: int | None = None  # inputs per task; None: one series, or IMAGES_PER_TASK batches of images
    cpus_per_task: int = 1
    gpus_per_task: float = 0.0
    task_retries: int = 2  # Ray runs a task lost with its worker or node again, this many times

    @classmethod
    def checked(
        cls, address: str, per_task: Any = None, cpus_per_task: Any = 1, gpus_per_task: Any = 0, task_retries: Any = 2
    ) -> InferencePlan:
        """The plan from the command line's values, each checked (one line for a bad one)."""
        from medpipe.cluster import ray_address

        ray_address(address)
        per = None if per_task is None else whole_number("--per_task", per_task)
        cpus, retries = whole_number("--cpus_per_task", cpus_per_task), whole_number("--task_retries", task_retries)
        try:
            gpus = float(gpus_per_task)
        except (TypeError, ValueError):
            raise MedpipeError(f"--gpus_per_task must be a number, got {gpus_per_task!r}") from None
        if (per is not None and per < 1) or cpus < 1 or gpus < 0 or retries < 0:
            raise MedpipeError(f"--per_task and --cpus_per_task must be >= 1, --gpus_per_task and --task_retries >= 0;"
                               f" got {per_task}, {cpus}, {gpus_per_task}, {retries}")  # fmt: skip
        return cls(str(address), per, cpus, gpus, retries)


# --- on a worker -------------------------------------------------------------------------------------------------

_NETWORKS: dict[str, Any] = {}  # this worker process's built networks, by the job settings they were built for


def run_inference_job(bundle_dir: Path, network: str | None, job: dict[str, Any]) -> None:
    """The bundle's inference job, as `medpipe run BUNDLE inference` runs it. The network its config builds is kept
    in this process and handed to the next job with the same settings, so a worker builds it once; each job still
    loads and checks its checkpoint into it, as the bundle's config says."""
    from medpipe.bundle.config import config_files, initialized_workflow

    files = config_files(bundle_dir, "inference", network)
    key = json.dumps([files, {k: v for k, v in sorted(job.items()) if k not in PER_PART}], default=str)
    built = _NETWORKS.get(key)
    workflow = initialized_workflow(files, **job, **({"network": built} if built is not None else {}))
    workflow.run()
    if built is None:
        _NETWORKS[key] = workflow.parser.get_parsed_content("network")
    workflow.finalize()


def infer_part(
    bundle_dir: Path, network: str | None, kind: str, inputs: list[str], names: list[str] | None, out_dir: str,
    part: str, threads: int, **overrides: Any,
) -> dict[str, Any]:  # fmt: skip
    """One task: the bundle's inference job on `inputs` into `<out_dir>/.parts/<part>/`, then its per-input files
    moved into `out_dir`; returns the part's record (inputs, files, summary header and one row per input).

    What an earlier attempt of this part left (its worker or node died) is cleared first; only this part writes
    there, and none of its inputs is in the manifest yet, so their files may be written again."""
    import torch

    torch.set_num_threads(threads)
    spec, out = KINDS[kind], Path(out_dir)
    staging = out / STAGING / part
    if staging.exists():
        print(f"{staging}: clearing what an earlier attempt left, then running the part again", file=sys.stderr)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    job = {**overrides, "input": list(inputs), "output_dir": str(staging)}
    if names is not None:
        job["output_names"] = list(names)
    try:
        run_inference_job(bundle_dir, network, job)
    except Exception as exc:  # a pickled exception loses its cause chain: send the one-line error itself
        found = find_medpipe_error(exc)
        if found is None:
            raise
        raise MedpipeError(str(found)) from None
    header, rows = spec.split(staging / spec.summary)
    missing = [p for p in inputs if p not in rows]
    if missing:
        raise MedpipeError(f"the job wrote no {spec.summary} row for '{missing[0]}' ({len(missing)} input(s))")
    (staging / spec.summary).unlink()
    files = []
    for src in sorted(p for p in staging.rglob("*") if p.is_file()):
        target = out / src.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, target)  # within one file system: whole files only
        files.append(src.relative_to(staging).as_posix())
    shutil.rmtree(staging)
    return {"inputs": list(inputs), "files": files, "header": header, "rows": [rows[p] for p in inputs]}


# --- on the driver -------------------------------------------------------------------------------------------------


def _resolved(bundle_dir: Path, files: list[str], overrides: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """Values of the inference config with these overrides, as the job will see them; MONAI-wrapped one-line
    errors come out as themselves."""
    from monai.bundle import ConfigParser

    from medpipe.bundle.parameters import coerce_values, declared_parameters

    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"bundle_root": str(bundle_dir.resolve()), **overrides,
                   **coerce_values(declared_parameters(bundle_dir), overrides)})  # fmt: skip
    try:
        return {key: parser.get_parsed_content(key) for key in keys}
    except Exception as exc:
        found = find_medpipe_error(exc)
        if found is None:
            raise
        raise MedpipeError(str(found)) from None


def _inputs(kind: str, given: Any) -> list[str]:
    """Every input of the run, as the job names them: images found as the job finds them; series as given."""
    if kind == "images":
        from medpipe.data.datalists import inference_items

        return [str(item["image"]) for item in inference_items(given)]
    paths = [str(Path(p)) for p in path_list(given)]
    if not paths:
        raise MedpipeError("no input volumes given: pass --input <DICOM series folder or .nii.gz>")
    absent = [p for p in paths if not Path(p).exists()]
    if absent:
        more = f" (nor do {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise MedpipeError(f"input '{absent[0]}' does not exist{more}")
    return paths


def _per_task(kind: str, plan: InferencePlan, batch_size: int) -> int:
    """Inputs per task. Images go in whole batches of the bundle's batch_size, so every image is scored in the batch
    it is scored in by the local run (the network sees the same tensors)."""
    if kind == "volumes":
        return plan.per_task or 1
    per_task = plan.per_task or IMAGES_PER_TASK * batch_size
    if per_task % batch_size:
        raise MedpipeError(f"--per_task {per_task} is not a multiple of the bundle's batch_size {batch_size}: give "
                           f"{per_task - per_task % batch_size or batch_size} or {per_task - per_task % batch_size + batch_size}, "  # noqa: E501
                           "so images are scored in the batches of the local run")  # fmt: skip
    return per_task


def _gradcam_names_clash(kind: str, resolved: dict[str, Any], inputs: list[str]) -> None:
    """Grad-CAM overlays are named by image name, told apart by folder only within one job: two inputs of one name
    could land in different tasks and write the same overlay. Refused, rather than one overlay silently lost."""
    from medpipe.values import flag

    if kind != "images" or not flag(resolved.get("gradcam", False)):
        return
    seen: dict[str, str] = {}
    for path in inputs:
        stem = Path(path).name.split(".")[0]
        if stem in seen:
            raise MedpipeError(f"'{seen[stem]}' and '{path}' would write the same Grad-CAM overlay from different "
                               "tasks: pass --gradcam false, or give images with distinct names")  # fmt: skip
        seen[stem] = path


def _settings(bundle_dir: Path, network: str | None, ckpt_path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """What makes two runs' outputs comparable: bundle, network, overrides and the checkpoint's content."""
    kept = {k: v for k, v in sorted(overrides.items()) if k not in PER_PART}
    settings = {"format": MANIFEST_FORMAT, "bundle": bundle_dir.name, "network": network or "default",
                "overrides": kept, "checkpoint_sha256": sha256_file(ckpt_path)}  # fmt: skip
    return json.loads(json.dumps(settings, default=str))


def read_manifest(manifest: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished parts a manifest records, after checking it was written with these settings. A last line cut
    short (the driver died while appending it) is dropped from the file: its part is run again."""
    if not manifest.is_file():
        return []
    lines = manifest.read_text(encoding="utf-8").splitlines(keepends=True)
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                atomic_write_text(manifest, "".join(lines[:-1]))
                break
            raise MedpipeError(f"'{manifest}' line {number} is not JSON: move the folder aside and run again") from None
    if records and records[0] != settings:
        old = records[0]
        differ = sorted(k for k in {*old, *settings} if old.get(k) != settings.get(k))
        raise MedpipeError(f"--output_dir '{manifest.parent}' holds inference made with other settings "
                           f"({', '.join(differ)} differ): give a new folder, or the same settings to finish "
                           "that run")  # fmt: skip
    return records[1:]


def _append(manifest: Path, record: dict[str, Any]) -> None:
    """One line, flushed to disk before the next part is counted as finished."""
    with manifest.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _write_summary(out: Path, spec: Kind, inputs: list[str], done: dict[str, tuple[Any, Any]]) -> Path:
    """The summary of all inputs, in input order, from the manifest's rows; left alone when it would not change."""
    headers = [done[p][0] for p in inputs]
    if any(h != headers[0] for h in headers):
        raise MedpipeError(f"the parts recorded in '{out / MANIFEST}' disagree on the {spec.summary} header: move the "
                           "folder aside and run again")  # fmt: skip
    text = spec.join(headers[0], [done[p][1] for p in inputs])
    target = out / spec.summary
    if not (target.is_file() and target.read_bytes() == text.encode()):  # bytes: csv rows end in \r\n
        atomic_write_text(target, text)
    return target


def _parts(kind: str, todo: list[str], per_task: int) -> list[tuple[str, list[str]]]:
    """(task name, inputs) of each part, in input order."""
    one, parts = {"images": "image", "volumes": "series"}[kind], []
    for k, start in enumerate(range(0, len(todo), per_task)):
        chunk = todo[start : start + per_task]
        many = f"part {k} ({len(chunk)} {KINDS[kind].unit} from '{chunk[0]}')"
        parts.append((f"{one} '{chunk[0]}'" if len(chunk) == 1 else many, chunk))
    return parts


def _progress(total: int, unit: str, skipped: int) -> Callable[[Any, dict[str, Any]], int]:
    started, finished = time.perf_counter(), [skipped]

    def line(task: Any, record: dict[str, Any]) -> int:
        finished[0] += len(record["inputs"])
        rate = (finished[0] - skipped) / max(time.perf_counter() - started, 1e-9) * 60
        left = (total - finished[0]) / rate if rate > 0 else 0.0
        print(f"[{finished[0]}/{total}] {unit} finished ({rate:.1f} {unit}/min, about {left:.0f} min left): "
              f"{task.name}", flush=True)  # fmt: skip
        return finished[0]

    return line


def run_inference_on_cluster(bundle: str, network: str | None, plan: InferencePlan, **overrides: Any) -> Path:
    """Run the bundle's inference over every input as Ray tasks; return the summary file written.

    Everything is checked before anything is written (bundle, overrides, checkpoint, inputs, the manifest's
    settings, the cluster); inputs the manifest holds are skipped. A task that fails (after Ray's retries when its
    worker or node died) or Ctrl-C / SIGTERM stops the other tasks in one line; the parts finished so far stay in
    the manifest for the rerun, and no summary is written."""
    from medpipe.bundle.config import check_override_keys, config_files, find_bundle
    from medpipe.bundle.handlers import require_checkpoint
    from medpipe.cluster import Task, connect, run_tasks, sigterm_as_interrupt

    bundle_dir = find_bundle(bundle).resolve()
    files = config_files(bundle_dir, "inference", network)
    check_override_keys(files, list(overrides))
    if "output_names" in overrides:
        raise MedpipeError("--output_names is planned by the run itself over all inputs; leave it out")
    kind = bundle_kind(files)
    spec = KINDS[kind]
    keys = ["input", "output_dir", "ckpt_path", "batch_size"] + (["gradcam"] if _has_key(files, "gradcam") else [])
    resolved = _resolved(bundle_dir, files, overrides, keys)
    ckpt = require_checkpoint(str(resolved["ckpt_path"]))
    inputs = _inputs(kind, resolved["input"])
    if len(set(inputs)) != len(inputs):
        raise MedpipeError(f"an input is given twice ('{next(p for p in inputs if inputs.count(p) > 1)}'): "
                           "each input has one summary row")  # fmt: skip
    _gradcam_names_clash(kind, resolved, inputs)
    per_task = _per_task(kind, plan, int(resolved["batch_size"]))
    out = Path(str(resolved["output_dir"])).resolve()
    manifest = out / MANIFEST
    settings = _settings(bundle_dir, network, ckpt, overrides)
    done = {p: (record["header"], row) for record in read_manifest(manifest, settings)
            for p, row in zip(record["inputs"], record["rows"], strict=True)}  # fmt: skip
    todo = [p for p in inputs if p not in done]
    print(f"{len(inputs) - len(todo)} of {len(inputs)} {spec.unit} already finished in '{out}' ({MANIFEST}); "
          f"{len(todo)} to run", flush=True)  # fmt: skip
    if todo:
        connect(plan.address)
        writable_dir(out, "--output_dir")
        if not manifest.is_file() or not manifest.read_text(encoding="utf-8").strip():
            atomic_write_text(manifest, json.dumps(settings) + "\n")
        names = None
        if kind == "volumes":
            from medpipe.inference.ct_volume import output_stems

            names = dict(zip(inputs, output_stems(inputs), strict=True))  # planned over all inputs, as locally
        parts = _parts(kind, todo, per_task)
        tasks = [Task(name, (bundle_dir, network, kind, chunk, None if names is None else [names[p] for p in chunk],
                             str(out), f"part{k:06d}", plan.cpus_per_task), overrides)
                 for k, (name, chunk) in enumerate(parts)]  # fmt: skip
        progress = _progress(len(inputs), spec.unit, len(inputs) - len(todo))
        finished = [len(inputs) - len(todo)]

        def record(task: Task, part: dict[str, Any]) -> None:
            _append(manifest, {"task": task.name, **part})
            done.update({p: (part["header"], row) for p, row in zip(part["inputs"], part["rows"], strict=True)})
            finished[0] = progress(task, part)

        try:
            with sigterm_as_interrupt():
                run_tasks(infer_part, tasks, num_cpus=plan.cpus_per_task, num_gpus=plan.gpus_per_task,
                          max_retries=plan.task_retries, on_done=record)  # fmt: skip
        except KeyboardInterrupt:
            raise MedpipeError(f"interrupted: {finished[0]} of {len(inputs)} {spec.unit} finished, recorded in "
                               f"'{manifest}'; run the same command again to do the rest") from None  # fmt: skip
        except MedpipeError as exc:
            raise MedpipeError(f"{exc}; the other tasks were stopped and no {spec.summary} written ({finished[0]} of "
                               f"{len(inputs)} {spec.unit} finished are kept in '{manifest}')") from None  # fmt: skip
        finally:
            shutil.rmtree(out / STAGING, ignore_errors=True)
    summary = _write_summary(out, spec, inputs, done)
    print(f"{len(inputs)} {spec.unit}: {summary}", flush=True)
    return summary


def _has_key(files: Sequence[str], key: str) -> bool:
    from monai.bundle import ConfigParser

    return key in ConfigParser.load_config_files(list(files))
