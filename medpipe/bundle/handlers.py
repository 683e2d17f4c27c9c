"""The handlers every bundle job attaches, written once: resume, checkpoints and MLflow tracking.

Each bundle's train.json calls `train_job_handlers(…)` in one line and appends the result to its own handlers
(pretrained loading, validation, LR schedule, stats), evaluate.json calls `evaluate_job_handlers(…)` after its
report handler. Only the main DDP rank writes checkpoints or tracks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medpipe.errors import MedpipeError
from medpipe.training.checkpoints import ResumeTraining, TrainingCheckpoint
from medpipe.training.distributed import is_main_rank


def _tracker(job: str, tracking: dict[str, Any], **extra: Any) -> Any:
    from medpipe.tracking.mlflow import MLflowTracker  # mlflow is imported only by jobs that track

    return MLflowTracker(job=job, **tracking, **extra)


def train_job_handlers(
    network: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    validator: Any,
    *,
    device: torch.device,
    ckpt_dir: str,
    resume: bool,
    resume_path: str,
    mlflow: bool,
    tracking: dict[str, Any],
    trained_on: list[dict[str, Any]] | None = None,
    sidecars: dict[str, Any] | None = None,
) -> list[Any]:
    """[ResumeTraining if resume] + [TrainingCheckpoint] + [MLflowTracker if mlflow], main-rank ones on rank 0 only.

    `trained_on` (the training datalist) is recorded beside model.pt so that evaluation can say when it scores
    images the model was trained on; `sidecars` (name -> JSON value, None: none) are written beside it as
    `model.<name>.json` (the HU normalisation of a model trained on volumes). `tracking` holds the MLflowTracker
    settings the bundle shares between jobs (uri, experiment, params, datalists …).
    """
    if trained_on is not None and not trained_on:
        raise MedpipeError("nothing to train on: the data set's training part is empty (a folder with only a "
                           "'testing' list can be evaluated, not trained on)")
    state: dict[str, Any] = {"optimizer": optimizer}
    if lr_scheduler is not None:
        state["lr_scheduler"] = lr_scheduler
    handlers: list[Any] = []
    if resume:
        handlers.append(ResumeTraining(path=resume_path, model=network, state=state, map_location=device))
    if is_main_rank():
        handlers.append(
            TrainingCheckpoint(ckpt_dir=ckpt_dir, model=network, state=state, trained_on=trained_on, resume=resume,
                               sidecars=sidecars)
        )
        if mlflow:
            extra = {"validator": validator, "optimizer": optimizer, "network": network, "resume": resume}
            handlers.append(_tracker("train", tracking, plots=["learning_curves"], **extra))
    return handlers


def evaluate_job_handlers(
    *, mlflow: bool, tracking: dict[str, Any], evaluated: list[dict[str, Any]], output_dir: str,
    artifacts: Sequence[str], plots: Sequence[str],
) -> list[Any]:
    """[MLflowTracker of the evaluate job] when `mlflow` is on (main rank), else nothing."""
    if not (mlflow and is_main_rank()):
        return []
    params = dict(tracking.get("params") or {}, checkpoint=tracking.get("checkpoint"))
    settings = dict(tracking, params=params, datalists={"evaluated": evaluated})
    return [_tracker("evaluate", settings, output_dir=output_dir, artifacts=list(artifacts), plots=list(plots))]


def require_checkpoint(ckpt_path: str) -> str:
    """The first step of evaluate/inference: a missing checkpoint is one line saying how to get one."""
    from medpipe.bundle.config import require_file

    hint = "train first (python -m monai.bundle run training --config_file <bundle>/configs/train.json) or set --ckpt_path"  # noqa: E501
    return require_file(ckpt_path, "checkpoint", hint)


def checkpoint_loader(ckpt_path: str, network: torch.nn.Module, device: torch.device) -> Any:
    """MONAI's CheckpointLoader of the bundle's model, for evaluate and inference, once the file is known to fit.

    A truncated, empty or pickled file, or the checkpoint of another network, is one line here (weights_only read,
    every tensor checked) instead of a loader traceback mid-run."""
    from monai.handlers import CheckpointLoader

    from medpipe.nets.pretrained import fitting_state_dict

    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    hint = "was it trained with this --network (and task / image settings)? pass the matching overlay or --ckpt_path"
    fitting_state_dict(module, require_checkpoint(ckpt_path), "checkpoint", hint)
    return CheckpointLoader(load_path=ckpt_path, load_dict={"model": network}, map_location=device)
