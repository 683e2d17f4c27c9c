"""Training checkpoints: `last.pt` every epoch (resumable), `model.pt` at the end, and resuming from `last.pt`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


def _state_dicts(model: torch.nn.Module, state: dict[str, Any], engine: Engine) -> dict[str, Any]:
    objects = {k: v.state_dict() for k, v in state.items()}
    return {"model": model.state_dict(), **objects, "trainer": engine.state_dict()}


class TrainingCheckpoint:
    """Write `<ckpt_dir>/last.pt` after every epoch (model, optimizer, scheduler…, trainer epoch: what `--resume`
    needs) and `<ckpt_dir>/model.pt` (the plain model state dict) at the end, each to a temporary file renamed
    over the old one.

    Why not MONAI's CheckpointSaver: it switches ignite's atomic saving off (`atomic=False`, for file permissions),
    so a run killed while saving leaves a half-written model.pt. Rank 0 only: `_disabled_` it on other ranks.
    """

    def __init__(
        self, ckpt_dir: str, model: torch.nn.Module, state: dict[str, Any] | None = None,
        final_filename: str = "model.pt", last_filename: str = "last.pt",
        trained_on: Sequence[dict[str, Any]] | None = None,
    ) -> None:  # fmt: skip
        self.ckpt_dir = Path(ckpt_dir)
        self.model, self.state = model, dict(state or {})
        self.final_filename, self.last_filename = final_filename, last_filename
        self.trained_on = [str(Path(it["image"]).resolve()) for it in trained_on or [] if "image" in it]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def _save(self, obj: Any, name: str) -> Path:
        from medpipe.files import atomic_write

        return atomic_write(self.ckpt_dir / name, lambda tmp: torch.save(obj, tmp))

    def save_last(self, engine: Engine) -> None:
        self._save(_state_dicts(self.model, self.state, engine), self.last_filename)

    def save_final(self, engine: Engine) -> None:
        if self.trained_on:
            from medpipe.files import atomic_write_text

            atomic_write_text(trained_on_file(self.ckpt_dir / self.final_filename), json.dumps(self.trained_on))
        path = self._save(self.model.state_dict(), self.final_filename)
        logger.info(f"saved the final model (epoch {engine.state.epoch}) to {path}")


def trained_on_file(ckpt_path: str | Path) -> Path:
    """`model.pt` → `model.trained_on.json`: the images a final model was trained on, written beside it."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(ckpt_path.stem + ".trained_on.json")


def read_trained_on(ckpt_path: str | Path) -> set[str]:
    """The resolved image paths a final model was trained on; empty when it has no readable record."""
    record = trained_on_file(ckpt_path)
    try:
        return set(json.loads(record.read_text())) if record.is_file() else set()
    except (OSError, ValueError):
        return set()


def warn_if_trained_on(ckpt_path: str | Path, items: Sequence[dict[str, Any]]) -> int:
    """Say loudly when evaluated images were in the checkpoint's training set: such metrics are not held out.

    Evaluating a folder scores all of it unless `--fold k` is given, so scoring a fold-0 model on its own data set
    without `--fold 0` would otherwise report training-set metrics as if they were an estimate. Returns the count.
    """
    trained = read_trained_on(ckpt_path)
    if not trained:
        return 0
    seen = sum(str(Path(it["image"]).resolve()) in trained for it in items if "image" in it)
    if seen:
        print(f"medpipe warning: {seen} of {len(items)} evaluated images were in the training set of {ckpt_path}: "
              "these metrics are not a held-out estimate (score its held-out fold with --fold k)", file=sys.stderr)
    return seen


class ResumeTraining:
    """With `--resume true`: before the first epoch, load `last.pt` (see TrainingCheckpoint) into the model,
    optimizer, scheduler… and the trainer's epoch counter, on every rank, so a killed run goes on where its last
    finished epoch ended and stops at the same `epochs`. No `last.pt` yet: train from the start (same command for
    the first start and every restart)."""

    def __init__(
        self, path: str, model: torch.nn.Module, state: dict[str, Any] | None = None, map_location: Any = "cpu"
    ) -> None:
        self.path = Path(path)
        self.model, self.state, self.map_location = model, dict(state or {}), map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from medpipe.errors import MedpipeError

        if not self.path.is_file():
            logger.warning(f"--resume: no checkpoint '{self.path}' yet, training from the start")
            return
        ckpt = torch.load(self.path, map_location=self.map_location, weights_only=True)
        missing = [k for k in ["model", "trainer", *self.state] if k not in ckpt]
        if missing:
            raise MedpipeError(f"'{self.path}' lacks {missing}: not a resume checkpoint written by this bundle")
        max_epochs, done = engine.state.max_epochs, ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]
        if done > max_epochs:
            raise MedpipeError(f"'{self.path}' is at epoch {done}, beyond --epochs {max_epochs}")
        self.model.load_state_dict(ckpt["model"])
        for key, obj in self.state.items():
            obj.load_state_dict(ckpt[key])
        engine.load_state_dict(ckpt["trainer"])
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from '{self.path}' after epoch {engine.state.epoch} of {max_epochs}")
