"""MLflow tracking for bundle jobs: one run per train or evaluate job with its parameters, provenance tags
(git SHA, bundle version, library versions, data fingerprint), per-epoch metrics, plots, the merged config, the
checkpoint and a TorchScript export; and `medpipe compare`, the UI's runs table in a terminal.

Switched on per job with the config key `mlflow` (`--mlflow true`): monai's own `--tracking mlflow` is an argument
of `monai.bundle run` that patches in MONAI's handler (loss, metrics and config only), so medpipe uses a key of its
own that behaves the same from `python -m monai.bundle run`, `medpipe run` and `medpipe.bundle.config.run_bundle`.
The store is `--tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/runs/mlflow.db`."""

from __future__ import annotations

import atexit
import hashlib
import inspect
import json
import logging
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.files import sha256_file
from medpipe.tracking.plots import plot_confusion_matrix, plot_learning_curves, plot_overlays, plot_roc

logger = logging.getLogger(__name__)

DEFAULT_STORE = Path("runs") / "mlflow.db"
PLOTS = ("learning_curves", "roc", "confusion_matrix", "overlays")
_checked_uris: set[str] = set()




def default_tracking_uri() -> str:
    """`$MLFLOW_TRACKING_URI`, else a sqlite file under ./runs (MLflow >= 3.13 refuses the plain file store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path.cwd() / DEFAULT_STORE).resolve()}"


def preflight(tracking_uri: str, timeout_s: float = 5.0) -> str:
    """Fail in one line, before any data is loaded, when the store cannot be used; return the URI.

    Checked: an http(s) server answers `/health` within `timeout_s`; a sqlite file's folder is writable; a bare path
    or `file:` URI (the file store MLflow refuses) is rejected with the sqlite spelling to use instead.
    """
    if tracking_uri in _checked_uris:
        return tracking_uri
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - a user-chosen server
                response.read(64)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MedpipeError(
                f"MLflow server {tracking_uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
                "--port 5000) or point MLFLOW_TRACKING_URI / --tracking_uri at a running one"
            ) from None
    elif tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MedpipeError(f"cannot create the MLflow store folder '{folder}': {exc.strerror}") from None
        if not os.access(folder, os.W_OK):
            raise MedpipeError(f"the MLflow store folder '{folder}' is not writable")
    elif tracking_uri.startswith("file:") or "://" not in tracking_uri:
        raise MedpipeError(
            f"tracking_uri '{tracking_uri}' is a file store, which MLflow >= 3.13 refuses; "
            f"use sqlite:///{Path(tracking_uri.removeprefix('file://')).resolve()}/mlflow.db"
        )
    _checked_uris.add(tracking_uri)
    return tracking_uri


def _client(tracking_uri: str):  # noqa: ANN202 - mlflow is imported lazily
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=preflight(tracking_uri))


def get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The experiment's id; a new one on a sqlite store keeps its artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another process created it in between
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_sha(path: str | Path) -> str:
    """HEAD of the checkout holding `path`, with '-dirty' when tracked files changed; 'unknown' outside git."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if sha else False
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def data_fingerprint(datalists: dict[str, list[dict[str, Any]]], dataset_dir: str | None = None) -> str:
    """sha256 over the cases a job used: split, keys, values, with files as (path relative to the data set, size).

    Two runs with the same fingerprint saw the same files in the same splits, wherever the data set was mounted.
    """
    digest = hashlib.sha256()
    for split in sorted(datalists):
        for item in datalists[split]:
            row = []
            for key in sorted(item):
                value = item[key]
                if isinstance(value, str) and os.path.isfile(value):
                    rel = os.path.relpath(value, dataset_dir) if dataset_dir else os.path.basename(value)
                    value = [Path(rel).as_posix(), os.path.getsize(value)]
                elif not isinstance(value, (str, int, float, bool, type(None))):
                    continue
                row.append([key, value])
            digest.update(json.dumps([split, row], sort_keys=True).encode())
    return digest.hexdigest()


def running_config() -> dict[str, Any] | None:
    """The merged config (all files + overrides) of the MONAI ConfigParser that is instantiating the caller.

    Found on the call stack: a config component cannot be handed its own parser, and MONAI records the merged
    config only when its own `--tracking` is used.
    """
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, ConfigParser):
            return owner.get()
        frame = frame.f_back
    return None


def _versions() -> dict[str, str]:
    import monai
    import torch

    import medpipe

    versions = {"medpipe": medpipe.__version__, "monai": monai.__version__, "torch": torch.__version__}
    return {f"versions.{k}": v for k, v in versions.items()}


def _bundle_meta(bundle_root: str) -> tuple[str, str]:
    """(bundle name, version) from the bundle folder and its metadata.json."""
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    version = json.loads(meta_file.read_text()).get("version", "unknown") if meta_file.is_file() else "unknown"
    return Path(bundle_root).resolve().name, version


def flatten_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """metrics.json's nested numbers as MLflow metric names: accuracy, accuracy_ci95_low, per_class.no.f1, …"""
    out: dict[str, float] = {}
    for key, value in report.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and np.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            sub = flatten_metrics(value, f"{name}.")
            out |= {k.replace(".value", "") if k.endswith(".value") else k: v for k, v in sub.items()}
        elif key == "ci95" and isinstance(value, list) and len(value) == 2:
            base = prefix.rstrip(".")
            for side, v in zip(("low", "high"), value, strict=True):
                if isinstance(v, (int, float)) and np.isfinite(v):
                    out[f"{base}_ci95_{side}"] = float(v)
    return out


def _mlflow_name(name: str) -> str:
    """MLflow keys allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The one-number entries of an engine's metrics (floats, numpy or one-element tensors)."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if not isinstance(value, bool) and np.size(value) == 1 and np.issubdtype(np.asarray(value).dtype, np.number):
            out[key] = float(np.asarray(value).reshape(-1)[0])
    return out


def _mask(x: Any) -> np.ndarray:
    """(C, H, W) or (H, W) prediction/label -> (H, W) foreground mask (argmax over channels, or > 0.5)."""
    a = np.asarray(x.detach().float().cpu() if hasattr(x, "detach") else x)
    if a.ndim == 3:
        a = a.argmax(0) if a.shape[0] > 1 else a[0] > 0.5
    return np.asarray(a > 0)


class MLflowTracker:
    """Record one bundle job as one MLflow run.

    job 'train': attach to the trainer; logs params and tags at the start, train loss/metrics and learning rate per
    epoch, the `validator`'s metrics at the trainer's epoch, and at the end metrics.json (per-epoch history), the
    learning curves, the checkpoint `checkpoint` (else the network's state dict) and a TorchScript export.
    job 'evaluate': attach to the evaluator; logs the numbers of `<output_dir>/metrics.json`, the files in
    `artifacts`, and the `plots` (roc, confusion_matrix from the written files; overlays from the outputs).
    Put it last in the handler list (it logs the files the handlers before it wrote) and `_disabled_` it off rank 0.
    """

    def __init__(
        self,
        job: str,
        tracking_uri: str,
        experiment_name: str,
        run_name: str | None = None,
        params: dict[str, Any] | None = None,
        bundle_root: str = ".",
        datalists: dict[str, list[dict[str, Any]]] | None = None,
        dataset_dir: str | None = None,
        validator: Any = None,
        optimizer: Any = None,
        network: Any = None,
        checkpoint: str | None = None,
        output_dir: str | None = None,
        artifacts: Sequence[str] = (),
        plots: Sequence[str] = (),
        overlays: int = 4,
        config: dict[str, Any] | None = None,
    ) -> None:
        if job not in ("train", "evaluate"):
            raise MedpipeError(f"MLflowTracker job must be 'train' or 'evaluate', got '{job}'")
        unknown = sorted(set(plots) - set(PLOTS))
        if unknown:
            raise MedpipeError(f"unknown plots {unknown}; known: {list(PLOTS)}")
        self.job, self.tracking_uri, self.experiment_name = job, preflight(tracking_uri), experiment_name
        self.params = dict(params or {})
        self.bundle_root, self.dataset_dir = bundle_root, dataset_dir
        self.datalists = datalists or {}
        self.validator, self.optimizer, self.network = validator, optimizer, network
        self.checkpoint, self.output_dir = checkpoint, Path(output_dir) if output_dir else None
        self.artifacts, self.plots, self.n_overlays = list(artifacts), list(plots), overlays
        self.config = config if config is not None else running_config()
        self.bundle_name, self.bundle_version = _bundle_meta(bundle_root)
        self.run_name = run_name or f"{job}-{self.params.get('network', 'net')}-fold{self.params.get('fold', '')}"
        self.client: Any = None
        self.run_id: str | None = None
        self.history: list[dict[str, float]] = []
        self._losses: list[float] = []
        self._example: Any = None
        self._overlay_cases: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._trainer: Any = None

    # -- wiring
    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch)
        engine.add_event_handler(Events.COMPLETED, self.complete)
        if self.job == "train":
            self._trainer = engine
            if self.validator is not None:
                self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    # -- run lifecycle
    def start(self, engine: Any) -> None:
        if self.run_id is not None:
            return
        self.client = _client(self.tracking_uri)
        experiment_id = get_or_create_experiment(self.client, self.experiment_name, self.tracking_uri)
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self._tags())
        self.run_id = run.info.run_id
        atexit.register(self._end, "FAILED")  # an exception or exit before `complete` must not leave it RUNNING
        params = {**self.params, "job": self.job, "max_epochs": engine.state.max_epochs}
        params |= {f"n_{split}": len(items) for split, items in self.datalists.items()}
        self._log_params(params)
        if self.config is not None:
            self.client.log_dict(self.run_id, self.config, "config/merged_config.json")
        logger.info(f"MLflow run '{self.run_name}' ({self.run_id}) in experiment '{self.experiment_name}' at "
                    f"{self.tracking_uri}")  # fmt: skip

    def _tags(self) -> dict[str, str]:
        tags = {
            "mlflow.source.git.commit": git_sha(self.bundle_root),
            "bundle": self.bundle_name,
            "bundle_version": self.bundle_version,
            "job": self.job,
            **_versions(),
        }
        if self.datalists:
            tags["data_fingerprint"] = data_fingerprint(self.datalists, self.dataset_dir)
        manifest = Path(self.dataset_dir or "") / "MANIFEST.csv"
        if self.dataset_dir and manifest.is_file():
            tags["data_manifest_sha256"] = sha256_file(manifest)
        return tags

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_mlflow_name(k), str(v)[:6000]) for k, v in params.items()]
        self.client.log_batch(self.run_id, params=items)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_mlflow_name(k), float(v), now, step) for k, v in metrics.items() if np.isfinite(v)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def _end(self, status: str) -> None:
        if self.run_id is None:
            return
        run_id, self.run_id = self.run_id, None
        try:
            self.client.set_terminated(run_id, status)
        except Exception as exc:  # at exit the store may be gone: say so, do not mask the real error
            logger.warning(f"could not mark MLflow run {run_id} {status}: {exc}")
        atexit.unregister(self._end)

    # -- per iteration / epoch
    def _iteration(self, engine: Any) -> None:
        output = engine.state.output
        first = output[0] if isinstance(output, list) and output else output
        if self.job == "train" and isinstance(first, dict) and "loss" in first:
            self._losses.append(float(first["loss"]))
        if self.job == "evaluate" and "overlays" in self.plots and len(self._overlay_cases) < self.n_overlays:
            self._collect_overlays(engine)

    def _collect_overlays(self, engine: Any) -> None:
        outputs = engine.state.output if isinstance(engine.state.output, list) else []
        for item in outputs[: self.n_overlays - len(self._overlay_cases)]:
            image = item.get("image")
            if image is None or "pred" not in item or np.asarray(image.shape).size != 3:
                continue
            label = _mask(item["label"]) if item.get("label") is not None else None
            self._overlay_cases.append((np.asarray(image[0].detach().float().cpu()), _mask(item["pred"]), label))

    def _epoch(self, engine: Any) -> None:
        batch = engine.state.batch  # decollated: a list of per-case dicts; else one dict of batched tensors
        if isinstance(batch, list) and batch and hasattr(batch[0].get("image"), "shape"):
            self._example = batch[0]["image"][None]  # a one-case batch for the TorchScript export
        elif isinstance(batch, dict) and hasattr(batch.get("image"), "shape"):
            self._example = batch["image"][:1]
        if self.job != "train":
            return
        epoch = engine.state.epoch
        metrics = _scalars(engine.state.metrics)
        if self._losses:
            metrics["train_loss"] = float(np.mean(self._losses))
            self._losses = []
        if self.optimizer is not None:
            metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self._record(epoch, metrics)

    def _validated(self, validator: Any) -> None:
        metrics = _scalars(validator.state.metrics)
        self._record(self._trainer.state.epoch, metrics)

    def _record(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        self._log_metrics(metrics, epoch)
        row = next((h for h in self.history if h["epoch"] == epoch), None)
        if row is None:
            row = {"epoch": epoch}
            self.history.append(row)
        row.update({k: float(v) for k, v in metrics.items()})

    # -- end of the job
    def complete(self, engine: Any) -> None:
        if self.run_id is None:
            return
        with tempfile.TemporaryDirectory(prefix="medpipe-mlflow-") as tmp:
            if self.job == "train":
                self._complete_train(Path(tmp))
            else:
                self._complete_evaluate(Path(tmp))
        self._end("FINISHED")

    def _complete_train(self, tmp: Path) -> None:
        import torch

        from medpipe.zoo import export_torchscript

        final = self.history[-1] if self.history else {}
        summary = {"bundle": self.bundle_name, "final": final, "history": self.history}
        self.client.log_dict(self.run_id, summary, "metrics.json")
        if "learning_curves" in self.plots and plot_learning_curves(self.history, tmp / "learning_curves.png"):
            self.client.log_artifact(self.run_id, str(tmp / "learning_curves.png"), "plots")
        checkpoint = Path(self.checkpoint) if self.checkpoint else None
        if checkpoint is None or not checkpoint.is_file():
            checkpoint = tmp / "model.pt"
            torch.save(self.network.state_dict(), checkpoint)
        self.client.log_artifact(self.run_id, str(checkpoint), "model")
        if self.network is not None and self._example is not None:
            ts_path = export_torchscript(self.network, self._example, tmp / "model.ts")
            self.client.log_artifact(self.run_id, str(ts_path), "model")

    def _complete_evaluate(self, tmp: Path) -> None:
        out = self.output_dir or Path(".")
        metrics_json = out / "metrics.json"
        if metrics_json.is_file():
            report = json.loads(metrics_json.read_text())
            self._log_metrics(flatten_metrics(report.get("metrics", report)), 0)
            self.client.log_artifact(self.run_id, str(metrics_json))
        for name in self.artifacts:
            path = Path(name) if Path(name).is_absolute() else out / name
            if path.is_file() and path != metrics_json:
                self.client.log_artifact(self.run_id, str(path))
        made = []
        if "roc" in self.plots:
            made.append(plot_roc(out / "predictions.csv", tmp / "roc.png"))
        if "confusion_matrix" in self.plots:
            made.append(plot_confusion_matrix(metrics_json, tmp / "confusion_matrix.png"))
        if "overlays" in self.plots:
            made.append(plot_overlays(self._overlay_cases, tmp / "overlays.png"))
        for path in made:
            if path is not None:
                self.client.log_artifact(self.run_id, str(path), "plots")
