"""Rank-aware helpers for the bundles' multi_gpu_train.json (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE).

The device comes from LOCAL_RANK (the GPU on this node), never from the global rank (model-zoo#444); CPU runs use
gloo, so the same overlay is tested on CPU CI.
"""

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
    """Join the torchrun job once (nccl on CUDA, gloo on CPU)."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
