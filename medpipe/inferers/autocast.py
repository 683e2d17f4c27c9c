"""Training/inference speed-ups MONAI's engines do not offer on CPU: bf16 autocast and channels_last.

MONAI's `amp=True` always autocasts for CUDA; this inferer autocasts for whatever device the input is on."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import Inferer

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}




class AutocastInferer(Inferer):
    """Run the network under autocast (`precision` bf16/fp16) and/or channels_last; return float32 outputs."""

    def __init__(self, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got '{precision}'")
        self.dtype = PRECISIONS[precision]
        self.channels_last = channels_last

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return network(inputs, *args, **kwargs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype):
            outputs = network(inputs, *args, **kwargs)
        return outputs.float()


def prepare_network(
    network: torch.nn.Module, device: torch.device | str, channels_last: bool = False
) -> torch.nn.Module:
    """Move to `device` and, when asked, to channels_last memory format (pairs with AutocastInferer)."""
    network = network.to(device)
    return network.to(memory_format=torch.channels_last) if channels_last else network
