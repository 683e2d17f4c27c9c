"""Rank-aware helpers for the bundles' multi_gpu_train.json (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).

The device comes from LOCAL_RANK (the GPU on this node), never from the global rank (model-zoo#444); what happens
once per job (checkpoints, the MLflow run, INFO logging, reading last.pt) keys on the global rank, so the same overlay
runs on one node or several (`torchrun --nnodes N`, docs/scale.md). CPU runs use gloo, so it is tested on CPU CI."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
_quieted = False  # quiet_other_ranks disabled INFO logging in this process


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_rank() -> bool:
    """True on global rank 0 or when not distributed: only this process writes checkpoints and tracking runs.

    Global, not LOCAL_RANK: with `--nnodes 2 --nproc_per_node 1` every process is local rank 0 of its node."""
    return not is_distributed() or dist.get_rank() == 0


def from_main_rank(read: Callable[[], T]) -> T:
    """`read()` on rank 0, its result handed to every rank (pickled through the process group); plain `read()` when
    not distributed. For files that only rank 0 is sure to see: a checkpoint folder on rank 0's machine is not
    shared storage on a multi-node job."""
    if not is_distributed():
        return read()
    box: list[Any] = [read() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def quiet_other_ranks() -> None:
    """Ranks other than 0 log warnings and errors only: N copies of every epoch line say nothing more than one.

    Process-wide (`logging.disable`), not per handler: MONAI's StatsHandler makes its own logger and handler when
    the trainer is built, after this runs, and each rank's loss lines came through it."""
    global _quieted
    if not is_main_rank():
        logging.disable(logging.INFO)
        _quieted = True


def local_device() -> torch.device:
    """cuda:LOCAL_RANK when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def device_ids(device: torch.device) -> list[int] | None:
    """DistributedDataParallel's device_ids: [index] on CUDA, None on CPU."""
    return [device.index] if device.type == "cuda" else None


def init_process_group() -> None:
    """Join the torchrun job once (nccl on CUDA, gloo on CPU), then sync ignite's view of it on every rank.

    ignite discovers the process group lazily, with a collective (`new_group` + `all_reduce`), on the first
    `idist.get_rank()`. ignite's Checkpoint calls that in its constructor, and the checkpoint handler exists on
    rank 0 only, so rank 0 waited in that collective while the other ranks trained: the hang of the first
    multi_gpu_train.json. Syncing here makes every rank run that collective at the same point.
    """
    import ignite.distributed as idist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    idist.sync()
    quiet_other_ranks()


# Seconds the main thread sleeps (releasing the GIL) after leaving a gloo job; see destroy_process_group
GLOO_DRAIN_S = 1.0


def destroy_process_group() -> None:
    """Leave the job (all ranks), and reset ignite to serial so a later in-process run starts clean.

    On gloo, a collective's work object is freed by gloo's worker thread a moment after `wait()` returns, and
    freeing it drops a Python reference, which needs the GIL. If the main thread is already finalizing the
    interpreter by then, the worker thread is torn down and the rank dies of SIGABRT ("terminate called without an
    active exception", core: `AsyncBarrierWork::~AsyncBarrierWork` -> `take_gil` -> `pthread_exit`) after the job's
    work is done (a CI failure). `benchmarks/ddp_teardown.py`, beside a training job: 9 of 30 two-rank jobs aborted
    this way with torch's plain teardown, 0 of 30 with this one. GLOO_DRAIN_S gives the workers that moment, with
    margin for a loaded CPU; torch's destroy_process_group() does not join gloo's worker threads (DDP still holds
    the group)."""
    import ignite.distributed as idist

    if dist.is_available() and dist.is_initialized():
        gloo = dist.get_backend() == "gloo"
        dist.barrier()  # no rank tears down while another still finishes its last collective
        dist.destroy_process_group()
        if gloo:
            time.sleep(GLOO_DRAIN_S)
    global _quieted
    if _quieted:  # undo quiet_other_ranks for whatever runs next in this process
        logging.disable(logging.NOTSET)
        _quieted = False
    idist.sync()


class ShardRecorder:
    """Write the cases this rank trained on to `<out_dir>/rank<R>.txt` (one `epoch<TAB>case` line each).

    Evidence, for tests and debugging, that the DistributedSampler gave every rank its own shard.
    """

    def __init__(self, out_dir: str, key: str = "path") -> None:
        self.out_dir, self.key = out_dir, key
        self.lines: list[str] = []

    def attach(self, engine) -> None:  # noqa: ANN001 - an ignite Engine
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _case(self, item: dict) -> str:
        value = item.get(self.key)
        if isinstance(value, str):
            return value
        meta = getattr(item.get("image"), "meta", {})  # MetaTensor: the file it was loaded from
        return str(meta.get("filename_or_obj", value))

    def _collect(self, engine) -> None:  # noqa: ANN001
        batch = engine.state.batch
        if not isinstance(batch, list):  # not decollated: one dict of per-key batches
            batch = [dict(zip(batch, row, strict=True)) for row in zip(*batch.values(), strict=True)]
        items = batch
        self.lines += [f"{engine.state.epoch}\t{self._case(item)}" for item in items]

    def _write(self, engine) -> None:  # noqa: ANN001
        from medpipe.files import atomic_write_text

        rank = dist.get_rank() if dist.is_initialized() else 0
        atomic_write_text(os.path.join(self.out_dir, f"rank{rank}.txt"), "\n".join(self.lines) + "\n")
