"""Rank-aware helpers for the bundles' multi_gpu_train.json (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).

The device comes from LOCAL_RANK (the GPU on this node), never from the global rank (model-zoo#444); CPU runs use
gloo, so the same overlay is tested on CPU CI."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_main_rank() -> bool:
    """True on rank 0 or when not distributed: only this process writes checkpoints and tracking runs."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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


def destroy_process_group() -> None:
    """Leave the job (all ranks), and reset ignite to serial so a later in-process run starts clean."""
    import ignite.distributed as idist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still finishes its last collective
        dist.destroy_process_group()
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
