"""Benchmark: covid_cxr_cls training and inference images/s, fp32 against channels_last + bf16 autocast, same run.

    python benchmarks/bench_cxr.py [--network densenet121|efficientnet_lite0] [--size 224] [--batch 16] [--steps 4]

Uses the bundle's own network definition (train.json + net overlay) and its AutocastInferer, on random
(1, size, size) inputs, so only the arithmetic is timed (no image decoding). Modes alternate after one warm-up step
each. Target: channels_last + bf16 ≥ 2x fp32 training images/s. bf16 autocast only pays on CPUs with native bf16
(AVX512-BF16 / AMX) or on GPUs; elsewhere it is emulated and slower, and the script prints what it measured.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medpipe.bundle.config import config_files
from medpipe.inferers.autocast import AutocastInferer, prepare_network

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_cxr_cls"
MODES = {"fp32": ("fp32", False), "channels_last": ("fp32", True), "channels_last+bf16": ("bf16", True)}


def build(network: str, channels_last: bool, device: torch.device) -> torch.nn.Module:
    """The bundle's `network_def` (pretrained weights off: speed does not depend on them)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(BUNDLE, "train", network))
    if "pretrained" in parser.config:
        parser["pretrained"] = False
    return prepare_network(parser.get_parsed_content("network_def", instantiate=True), device, channels_last)


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer measures it (CUDA calls return before the work is done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(net: torch.nn.Module, inferer: AutocastInferer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Training images/s: forward under the inferer, cross-entropy, backward, Adam step."""
    net.train()
    opt = torch.optim.Adam(net.parameters(), 1e-4)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(inferer(x, net), y).backward()
        opt.step()

    step()  # warm-up: allocator, oneDNN kernel choice
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(x.device)
    return steps * len(x) / (time.perf_counter() - start)


@torch.no_grad()
def infer_rate(net: torch.nn.Module, inferer: AutocastInferer, x: torch.Tensor, steps: int) -> float:
    net.eval()
    inferer(x, net)
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        inferer(x, net)
    _sync(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="densenet121")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x = torch.rand(args.batch, 1, args.size, args.size, device=device)
    y = torch.randint(0, 3, (args.batch,), device=device)
    print(f"{args.network} {args.size}x{args.size} batch {args.batch}, {args.steps} steps, {device}, "
          f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")  # fmt: skip
    rates: dict[str, tuple[float, float]] = {}
    for name, (precision, channels_last) in MODES.items():
        inferer = AutocastInferer(precision, channels_last)
        net = build(args.network, channels_last, device)
        xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        rates[name] = (train_rate(net, inferer, xin, y, args.steps), infer_rate(net, inferer, xin, args.steps))
        print(f"  {name:<20} train {rates[name][0]:7.1f} img/s   inference {rates[name][1]:7.1f} img/s", flush=True)
    base, fast = rates["fp32"], rates["channels_last+bf16"]
    print(f"  ratio channels_last+bf16 / fp32: train {fast[0] / base[0]:.2f}x (target >= 2x), "
          f"inference {fast[1] / base[1]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
