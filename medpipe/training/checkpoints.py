"""Training checkpoints: `last.pt` every epoch (resumable), `model.pt` at the end, and resuming from `last.pt`.

A checkpoint folder belongs to one training at a time: `training.lock` names the process that writes there, and a
finished training's `model.pt` is continued (`--resume true`), never silently trained over."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)

LOCK_FILE = "training.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _holder(lock: Path) -> dict[str, Any] | None:
    """The lock's record when it names a live process other than this one; None when it is stale."""
    try:
        record = json.loads(lock.read_text())
        pid, host = int(record["pid"]), str(record["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": "?", "host": "?", "started": "?", "command": "unreadable lock file"}  # being written: held
    if host != socket.gethostname():
        return record  # another machine's process cannot be checked from here: held
    if pid == os.getpid() or not _alive(pid):  # this process's earlier job, or a killed training
        return None
    return record


def claim_ckpt_dir(ckpt_dir: str | Path) -> Path:
    """Create `<ckpt_dir>/training.lock` naming this process, or refuse in one line when a live training holds it.

    A lock left by a process that is gone (killed, crashed) is taken over with a warning."""
    from medpipe.errors import MedpipeError

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lock = ckpt_dir / LOCK_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)[:300]}  # fmt: skip
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _holder(lock)
            if holder is not None:
                raise MedpipeError(
                    f"--ckpt_dir '{ckpt_dir}' is in use by another training: process {holder.get('pid')} on "
                    f"{holder.get('host')} since {holder.get('started')} ({holder.get('command')}); wait for it or "
                    f"train into another --ckpt_dir (delete '{lock}' only if that process is gone)"
                ) from None
            logger.warning(f"taking over the stale lock '{lock}' (its process is gone)")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(record))
        return lock
    raise MedpipeError(f"could not take the lock '{lock}': another training keeps taking it; use another --ckpt_dir")


def _state_dicts(model: torch.nn.Module, state: dict[str, Any], engine: Engine) -> dict[str, Any]:
    objects = {k: v.state_dict() for k, v in state.items()}
    return {"model": model.state_dict(), **objects, "trainer": engine.state_dict()}


class TrainingCheckpoint:
    """Write `<ckpt_dir>/last.pt` after every epoch (model, optimizer, scheduler…, trainer epoch: what `--resume`
    needs) and `<ckpt_dir>/model.pt` (the plain model state dict) at the end, each to a temporary file renamed
    over the old one.

    Why not MONAI's CheckpointSaver: it switches ignite's atomic saving off (`atomic=False`, for file permissions),
    so a run killed while saving leaves a half-written model.pt. Rank 0 only: `_disabled_` it on other ranks.

    Before the first epoch the folder is claimed (`training.lock`, see claim_ckpt_dir; released when the training
    ends, however it ends), and a `model.pt` already there is refused unless `resume`: MONAI's CheckpointSaver
    overwrites it silently; ignite's ModelCheckpoint refuses a non-empty folder by default (`require_empty`).
    """

    def __init__(
        self, ckpt_dir: str, model: torch.nn.Module, state: dict[str, Any] | None = None,
        final_filename: str = "model.pt", last_filename: str = "last.pt",
        trained_on: Sequence[dict[str, Any]] | None = None, resume: bool = False,
        sidecars: Mapping[str, Any] | None = None,
    ) -> None:  # fmt: skip
        from medpipe.files import check_writable_dir

        self.ckpt_dir = check_writable_dir(ckpt_dir, "--ckpt_dir")  # before any data is loaded, nothing created
        self.model, self.state = model, dict(state or {})
        self.final_filename, self.last_filename = final_filename, last_filename
        # resolved and in first-seen order: the slices of one volume file count once
        self.trained_on = list(dict.fromkeys(str(Path(it["image"]).resolve()) for it in trained_on or []
                                             if "image" in it))  # fmt: skip
        self.resume, self.sidecars = resume, dict(sidecars or {})
        self._lock: Path | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.claim)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save_last)
        engine.add_event_handler(Events.COMPLETED, self.save_final)
        engine.add_event_handler(Events.COMPLETED, self.release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        # ignite stops at the first EXCEPTION_RAISED handler that raises (MONAI's StatsHandler does): release first
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        handlers.insert(0, handlers.pop())

    def claim(self, engine: Engine) -> None:
        """Lock the folder for this training; refuse a finished training's model.pt unless resuming."""
        from medpipe.errors import MedpipeError

        self._lock = claim_ckpt_dir(self.ckpt_dir)
        atexit.register(self.release)
        final = self.ckpt_dir / self.final_filename
        if final.is_file() and not self.resume:
            self.release()
            raise MedpipeError(
                f"'{final}' holds the model of an earlier training: pass --resume true to continue that training, "
                "or train into a new --ckpt_dir (or delete it to train afresh there)"
            )

    def release(self, engine: Engine | None = None) -> None:
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None
            atexit.unregister(self.release)

    def _failed(self, engine: Engine, exc: BaseException) -> None:
        self.release()
        if len(engine._event_handlers[Events.EXCEPTION_RAISED]) <= 1:  # the sole handler: let it go on, as ignite
            raise exc

    def _save(self, obj: Any, name: str) -> Path:
        from medpipe.files import atomic_write

        return atomic_write(self.ckpt_dir / name, lambda tmp: torch.save(obj, tmp))

    def save_last(self, engine: Engine) -> None:
        self._save(_state_dicts(self.model, self.state, engine), self.last_filename)

    def save_final(self, engine: Engine) -> None:
        from medpipe.files import atomic_write_text

        final = self.ckpt_dir / self.final_filename
        if self.trained_on:
            atomic_write_text(trained_on_file(final), json.dumps(self.trained_on))
        for name, value in self.sidecars.items():  # before model.pt: a final model never lacks what it needs
            if value is None:  # none for this model: one left by an earlier training must not pair with it
                sidecar_file(final, name).unlink(missing_ok=True)
            else:
                atomic_write_text(sidecar_file(final, name), json.dumps(value, indent=1))
        path = self._save(self.model.state_dict(), self.final_filename)
        logger.info(f"saved the final model (epoch {engine.state.epoch}) to {path}")


def sidecar_file(ckpt_path: str | Path, name: str) -> Path:
    """`model.pt` → `model.<name>.json`: what a final model needs or records, written beside it (`trained_on`; the
    HU `normalisation` of a model trained on volumes, medpipe.transforms.ct_intensity)."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.with_name(f"{ckpt_path.stem}.{name}.json")


def trained_on_file(ckpt_path: str | Path) -> Path:
    """`model.pt` → `model.trained_on.json`: the images a final model was trained on, written beside it."""
    return sidecar_file(ckpt_path, "trained_on")


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


def _first_mismatch(own: dict[str, Any], theirs: Any) -> str | None:
    """What keeps a saved state dict from loading into this model, in a few words, or None when it fits."""
    if not isinstance(theirs, dict):
        return f"its model entry is a {type(theirs).__name__}, not a state dict"
    for key, value in own.items():
        if key not in theirs:
            return f"no weight '{key}' there"
        if tuple(getattr(theirs[key], "shape", ())) != tuple(value.shape):
            return f"'{key}' is {tuple(theirs[key].shape)} there, {tuple(value.shape)} here"
    extra = [k for k in theirs if k not in own]
    return f"'{extra[0]}' there is not in this network" if extra else None


def _read_checkpoint(path: Path, map_location: Any) -> dict[str, Any] | str | None:
    """A checkpoint's contents; None when there is no file; a one-line message when it cannot be read (sent to the
    other ranks as is, so that every rank stops with the same line)."""
    from medpipe.errors import first_line

    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated, not a torch file, pickled objects: weights_only refuses them
        return (
            f"--resume: '{path}' cannot be read as a checkpoint ({first_line(exc)}); train afresh into a new --ckpt_dir"
        )


class ResumeTraining:
    """With `--resume true`: before the first epoch, load `last.pt` (see TrainingCheckpoint) into the model,
    optimizer, scheduler… and the trainer's epoch counter, on every rank, so a killed run goes on where its last
    finished epoch ended and stops at the same `epochs`. No `last.pt` yet: train from the start (same command for
    the first start and every restart).

    Rank 0 reads the file and hands it to the other ranks: it wrote it, and on a multi-node job the other nodes may
    not see its --ckpt_dir. Were each rank to look for itself, one that saw no file would train from epoch 0 while
    rank 0 resumed, and their collectives would no longer pair up."""

    def __init__(
        self, path: str, model: torch.nn.Module, state: dict[str, Any] | None = None, map_location: Any = "cpu"
    ) -> None:
        self.path = Path(path)
        self.model, self.state, self.map_location = model, dict(state or {}), map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from medpipe.errors import MedpipeError
        from medpipe.training.distributed import from_main_rank, is_distributed

        # across ranks the state travels on the CPU; load_state_dict copies it onto each rank's own device
        map_location = "cpu" if is_distributed() else self.map_location
        ckpt = from_main_rank(lambda: _read_checkpoint(self.path, map_location))
        if ckpt is None:
            logger.warning(f"--resume: no checkpoint '{self.path}' yet, training from the start")
            return
        if isinstance(ckpt, str):
            raise MedpipeError(ckpt)
        missing = [k for k in ["model", "trainer", *self.state] if k not in ckpt]
        if missing:
            raise MedpipeError(f"'{self.path}' lacks {missing}: not a resume checkpoint written by this bundle")
        max_epochs, done = engine.state.max_epochs, ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]
        if done > max_epochs:
            raise MedpipeError(f"'{self.path}' is at epoch {done}, beyond --epochs {max_epochs}")
        hint = ("resume with the --network and settings (image size, channels …) it was trained with, or train "
                "afresh into a new --ckpt_dir")  # fmt: skip
        mismatch = _first_mismatch(self.model.state_dict(), ckpt["model"])
        if mismatch:
            raise MedpipeError(f"--resume: '{self.path}' was written by another network or image size ({mismatch}); "
                               f"{hint}")  # fmt: skip
        self.model.load_state_dict(ckpt["model"])
        for key, obj in self.state.items():
            try:
                obj.load_state_dict(ckpt[key])
            except (ValueError, RuntimeError, KeyError, IndexError) as exc:  # e.g. other parameter groups
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise MedpipeError(
                    f"--resume: the {key} state in '{self.path}' does not fit ({first}); {hint}"
                ) from None
        engine.load_state_dict(ckpt["trainer"])
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from '{self.path}' after epoch {engine.state.epoch} of {max_epochs}")
