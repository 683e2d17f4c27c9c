"""Load a pretrained backbone into a bundle network and keep its new head: the `pretrained_ckpt` config key.

Accepts medpipe bundle checkpoints (e.g. the 4-class brain-MRI pretraining) and torchvision/MONAI-style state
dicts. Files are read with `torch.load(weights_only=True)`, so a checkpoint can never run code. Keys are matched
by name after stripping wrapper prefixes (`module.`, `model.`, …); when the names differ (another implementation
of the same architecture) they are matched in order, by shape. Every backbone tensor must find a partner, or
loading stops with one line saying what does not fit: a half-loaded backbone would train without complaint."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from medpipe.errors import MedpipeError, first_line

logger = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "network.", "net.")  # DDP, Lightning, torch.compile, …
NESTED_KEYS = ("state_dict", "model", "network", "net", "model_state_dict")  # {"model": state_dict} and the like
HEAD_PREFIXES = ("classifier.", "fc.", "class_layers.", "head.", "heads.", "_fc.")  # torchvision, MONAI, timm




def read_state_dict(
    path: str | Path, what: str = "pretrained checkpoint", hint: str = "set --pretrained_ckpt to a .pt state dict"
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from {"model": …}-style containers; MedpipeError if it has none.

    what / hint: how error messages name the file and what to do when it is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise MedpipeError(f"{what} '{path}' not found; {hint}")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # not a pickled class: plain garbage, not a checkpoint
            raise MedpipeError(f"cannot read {what} '{path}': {first_line(exc)}") from exc
        raise MedpipeError(
            f"{what} '{path}' holds objects other than tensors (refused: weights_only=True); "
            "save model.state_dict() instead"
        ) from exc
    except Exception as exc:  # truncated zip, an empty file, not a torch file at all, …
        raise MedpipeError(f"cannot read {what} '{path}': {first_line(exc)}") from exc
    for _ in range(3):  # unwrap at most a few levels of {"state_dict": {...}}
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise MedpipeError(f"{what} '{path}' is not a state dict (got {type(obj).__name__})")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise MedpipeError(f"{what} '{path}' is not a state dict: {not_tensors[:3]} are not tensors")
    return {strip_prefixes(str(k)): v for k, v in obj.items()}


def fitting_state_dict(network: torch.nn.Module, path: str | Path, what: str, hint: str) -> dict[str, torch.Tensor]:
    """Checkpoint `path`'s tensors keyed by `network`'s own names, when every tensor fits; one line otherwise.

    A checkpoint of another network (or another head size), or one missing or adding tensors, is refused before any
    weight is loaded; wrapper prefixes ("module.", …) are tolerated on either side."""
    own = network.state_dict()
    by_stripped = {strip_prefixes(k): k for k in own}  # read_state_dict strips the same prefixes from the file
    state = read_state_dict(path, what=what, hint=hint)
    missing = [k for k in by_stripped if k not in state]
    unexpected = [k for k in state if k not in by_stripped]
    misshapen = [k for k in by_stripped if k in state and state[k].shape != own[by_stripped[k]].shape]
    if missing or unexpected or misshapen:
        problems = [f"{name} {keys[:3]}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if keys]  # fmt: skip
        raise MedpipeError(f"{what} '{path}' does not fit the network ({'; '.join(problems)}); {hint}")
    return {by_stripped[k]: v for k, v in state.items()}


def strip_prefixes(key: str) -> str:
    """'module.model.conv1.weight' -> 'conv1.weight'."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def head_prefixes(network: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the network's task head: its own `head_prefixes`, else the usual classifier names."""
    return tuple(getattr(network, "head_prefixes", HEAD_PREFIXES))


def _fit(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """`source` shaped like `target`, or None; a 3-channel RGB first conv is summed into a 1-channel grey one."""
    if source.shape == target.shape:
        return source
    same_rest = source.ndim == 4 and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:]
    if same_rest and source.shape[1] == 3 and target.shape[1] == 1:
        return source.sum(dim=1, keepdim=True)  # grey x fed as (x, x, x) gives the same response
    return None


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")  # BN bookkeeping; absent in older checkpoints


def match_backbone(network: nn.Module, source: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Backbone tensors of `source` renamed to `network`'s keys, and a report; MedpipeError when they do not fit."""
    target = network.state_dict()
    heads = head_prefixes(network)
    backbone = [k for k in target if not k.startswith(heads)]
    matched: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    for key in backbone:  # 1) same name (after prefix stripping), fitting shape
        if key in source and (value := _fit(source[key], target[key])) is not None:
            matched[key] = value
            adapted += [key] if value is not source[key] else []
    needed = [k for k in backbone if not _is_counter(k)]
    mode = "by name"
    if any(k not in matched for k in needed):  # 2) another implementation: same order, same shapes
        src_keys = [k for k in source if not _is_counter(k) and not k.startswith(HEAD_PREFIXES)]
        pairs = list(zip(needed, src_keys, strict=False))  # src_keys may be longer
        fitted = {t: _fit(source[s], target[t]) for t, s in pairs}
        if len(src_keys) >= len(needed) and all(v is not None for v in fitted.values()):
            matched, mode = {k: v for k, v in fitted.items() if v is not None}, "by order and shape"
            adapted = [t for t, s in pairs if fitted[t] is not source[s]]
        else:
            missing = [k for k in needed if k not in matched]
            first = missing[0]
            got = tuple(source[first].shape) if first in source else "no such key"
            raise MedpipeError(
                f"pretrained checkpoint does not fit {type(network).__name__}: {len(missing)} of {len(needed)} "
                f"backbone tensors unmatched by name or by order+shape (first: '{first}' needs "
                f"{tuple(target[first].shape)}, checkpoint has {got})"
            )
    used = set(matched) if mode == "by name" else set(src_keys[: len(needed)])
    report = {
        "loaded": len(matched), "mode": mode, "adapted_rgb_to_grey": adapted,
        "kept_new_head": [k for k in target if k.startswith(heads)],
        "unused": [k for k in source if k not in used and not _is_counter(k)],
    }  # fmt: skip
    return matched, report


def load_pretrained(network: nn.Module, path: str | Path | None) -> dict[str, Any] | None:
    """Load the backbone of checkpoint `path` into `network` in place (head untouched); None path: do nothing."""
    if path is None or str(path) in ("", "None", "null"):
        return None
    source = read_state_dict(path)
    module = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    matched, report = match_backbone(module, source)
    module.load_state_dict(matched, strict=False)  # strict=False only for the head; coverage was checked above
    adapted = report["adapted_rgb_to_grey"]
    summary = (
        f"pretrained: loaded {report['loaded']} backbone tensors from '{path}' ({report['mode']}); "
        f"new head {sorted({k.rsplit('.', 2)[0] for k in report['kept_new_head']})}, "
        f"{len(report['unused'])} checkpoint tensors unused"
    ) + (f", {len(adapted)} RGB conv(s) summed to grey" if adapted else "")
    logger.info(summary)
    print(summary)
    return report


class LoadPretrained:
    """Ignite handler for train.json: load `path`'s backbone into `network` when training starts (no-op if None).

    A handler rather than an `initialize` step so the multi-GPU overlay (which replaces `initialize`) keeps it, and
    so evaluate/inference, which never run the trainer, never need the pretraining file. Attach it before any
    resume handler: resuming must win over pretraining.
    """

    def __init__(self, network: nn.Module, path: str | Path | None) -> None:
        self.network, self.path = network, path
        if path is not None and str(path) not in ("", "None", "null") and not Path(path).is_file():
            raise MedpipeError(f"pretrained checkpoint '{path}' not found; set --pretrained_ckpt to a .pt state dict")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: load_pretrained(self.network, self.path))
