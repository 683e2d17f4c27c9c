"""MLflow tracking for bundle jobs: one run per train or evaluate job with its parameters, provenance tags
(git SHA, bundle version, library versions, data fingerprint), per-epoch metrics, plots, the merged config, the
checkpoint and a TorchScript export.

Switched on per job with the config key `mlflow` (`--mlflow true`): monai's own `--tracking mlflow` is an argument
of `monai.bundle run` that patches in MONAI's handler (loss, metrics and config only), so medpipe uses a key of its
own that behaves the same from `python -m monai.bundle run`, `medpipe run` and `medpipe.bundle.config.run_bundle`.
The store is `--tracking_uri`, else `$MLFLOW_TRACKING_URI`, else `sqlite:///<cwd>/runs/mlflow.db`.

Runs survive crashes: a job that raises marks its run FAILED (KILLED on Ctrl-C); a training job records its run id
beside its checkpoints, and `--resume true` reopens that run when it is not FINISHED (a SIGKILLed job's run is left
RUNNING). A store lost after start-up costs one bounded failing call and a warning; training goes on untracked
(`medpipe.tracking.client`)."""

from __future__ import annotations

import atexit
import json
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medpipe.errors import MedpipeError
from medpipe.files import sha256_file
from medpipe.tracking.client import (
    GuardedClient,
    default_tracking_uri,
    get_or_create_experiment,
    logged_history,
    mlflow_client,
    one_line,
    preflight,
    resumable_run,
    write_run_record,
)
from medpipe.tracking.plots import plot_confusion_matrix, plot_learning_curves, plot_overlays, plot_roc
from medpipe.tracking.provenance import bundle_meta, data_fingerprint, git_sha, running_config, versions
from medpipe.training.checkpoints import TrainingCheckpoint

__all__ = ["PLOTS", "MLflowTracker", "default_tracking_uri", "flatten_metrics", "preflight"]  # configs use these

logger = logging.getLogger(__name__)

PLOTS = ("learning_curves", "roc", "confusion_matrix", "overlays")


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


def _move_last_handler(engine: Any, event: Any, before: Callable[[Any], bool]) -> None:
    """Move the handler just attached to `event` before the first one whose owner `before` accepts. Ignite runs an
    event's handlers in attach order and has no public way to reorder them."""
    handlers = engine._event_handlers[event]
    owners = [getattr(entry[0], "__self__", None) for entry in handlers[:-1]]
    index = next((i for i, owner in enumerate(owners) if before(owner)), None)
    if index is not None:
        handlers.insert(index, handlers.pop())


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
        resume: bool | str = False,
    ) -> None:
        from medpipe.values import flag

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
        self.bundle_name, self.bundle_version = bundle_meta(bundle_root)
        self.resume = flag(resume)
        self.ckpt_dir = Path(checkpoint).parent if checkpoint and job == "train" else None  # holds the run record
        self.run_name = run_name or f"{job}-{self.params.get('network', 'net')}-fold{self.params.get('fold', '')}"
        self.client: GuardedClient | None = None
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
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        _move_last_handler(engine, Events.EXCEPTION_RAISED, lambda owner: True)
        # an epoch is logged before its last.pt is written: a job killed in between resumes from the epoch before
        # and logs this one again, instead of resuming after an epoch that MLflow never saw
        _move_last_handler(engine, Events.EPOCH_COMPLETED, lambda owner: isinstance(owner, TrainingCheckpoint))
        if self.job == "train":
            self._trainer = engine
            if self.validator is not None:
                self.validator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    # -- run lifecycle
    def start(self, engine: Any) -> None:
        """Open the run (a new one, or with `resume` the recorded unfinished one) and record its id; a failure
        here ends the job with one line, since nothing has been trained yet."""
        if self.client is not None:
            return
        self.client = mlflow_client(self.tracking_uri)
        try:
            experiment_id = get_or_create_experiment(self.client, self.experiment_name, self.tracking_uri)
            run = resumable_run(self.client, self.ckpt_dir, experiment_id) if self.resume and self.ckpt_dir else None
            if run is None:
                self._new_run(experiment_id, engine)
            else:
                self._reopen(run, engine)
        except Exception as exc:
            if self.run_id is not None:  # created, then a call failed: do not leave it RUNNING
                self.client.arm(self.run_id)
                self._end("FAILED")
            if isinstance(exc, MedpipeError):
                raise
            raise MedpipeError(f"MLflow tracking could not start at {self.tracking_uri}: {one_line(exc)}") from exc
        self.client.arm(self.run_id)
        atexit.register(self._end, "FAILED")  # an exit before `complete` outside ignite must not leave it RUNNING
        if self.ckpt_dir is not None:
            write_run_record(self.ckpt_dir, self.run_id, self.tracking_uri, experiment_id)
        logger.info(f"MLflow run '{self.run_name}' ({self.run_id}) in experiment '{self.experiment_name}' at "
                    f"{self.tracking_uri}")  # fmt: skip

    def _params(self, engine: Any) -> dict[str, str]:
        params = {**self.params, "job": self.job, "max_epochs": engine.state.max_epochs}
        params |= {f"n_{split}": len(items) for split, items in self.datalists.items()}
        return {_mlflow_name(k): str(v)[:6000] for k, v in params.items()}

    def _new_run(self, experiment_id: str, engine: Any) -> None:
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=self._tags())
        self.run_id = run.info.run_id
        self._log_params(self._params(engine))
        if self.config is not None:
            self.client.log_dict(self.run_id, self.config, "config/merged_config.json")

    def _reopen(self, run: Any, engine: Any) -> None:
        """Continue a killed or failed run: RUNNING again, its logged epochs back in the history (metrics.json),
        params it lacks added; MLflow refuses to change a logged param, so a changed one is only warned about."""
        self.run_id, epoch = run.info.run_id, engine.state.epoch
        self.client.update_run(self.run_id, status="RUNNING")
        self.client.set_tag(self.run_id, "resumed_at_epoch", str(epoch))
        params, logged = self._params(engine), run.data.params
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            logger.warning(f"--resume: {changed} differ from run {self.run_id}'s; MLflow keeps the first values")
        self._log_params({k: v for k, v in params.items() if k not in logged})
        self.history = logged_history(self.client, run, epoch)
        logger.info(f"--resume: continuing MLflow run {self.run_id} after epoch {epoch}")

    def _tags(self) -> dict[str, str]:
        tags = {
            "mlflow.source.git.commit": git_sha(self.bundle_root),
            "bundle": self.bundle_name,
            "bundle_version": self.bundle_version,
            "job": self.job,
            **versions(),
        }
        if self.datalists:
            tags["data_fingerprint"] = data_fingerprint(self.datalists, self.dataset_dir)
        manifest = Path(self.dataset_dir or "") / "MANIFEST.csv"
        if self.dataset_dir and manifest.is_file():
            tags["data_manifest_sha256"] = sha256_file(manifest)
        return tags

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        if params:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

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

    def _failed(self, engine: Any, exc: BaseException) -> None:
        """The job raised: mark the run FAILED (KILLED on Ctrl-C). Ignite stops at the first EXCEPTION_RAISED
        handler that raises (MONAI's StatsHandler does), so `attach` puts this one first; it lets the exception go
        on by raising it only when it is the sole handler, as ignite itself would without any."""
        from ignite.engine import Events

        self._end("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) <= 1:
            raise exc

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
        if self.client.lost is None:  # a lost store: skip the exports, the run stays RUNNING for --resume
            with tempfile.TemporaryDirectory(prefix="medpipe-mlflow-") as tmp:
                if self.job == "train":
                    self._complete_train(Path(tmp))
                else:
                    self._complete_evaluate(Path(tmp))
        self._end("FINISHED")

    def _complete_train(self, tmp: Path) -> None:
        import torch

        from medpipe.export.exporters import export_torchscript

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
            metrics = flatten_metrics(report.get("metrics", report))
            if isinstance(report.get("calibration"), dict):  # segmentation's pixel ECE / Brier sit beside metrics
                metrics |= flatten_metrics(report["calibration"], "calibration.")
            self._log_metrics(metrics, 0)
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
