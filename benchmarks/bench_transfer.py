"""Benchmark: EfficientNet-Lite0 transfer learning on CPU — training images/s fp32 vs bf16 autocast, and time to floor.

    OMP_NUM_THREADS=1 python benchmarks/bench_transfer.py [--image-size 128] [--steps 8] [--floor 0.95] [--epochs 12]

1. Throughput: full fine-tuning steps (forward + backward + Adam, batch 16) in fp32, fp32 + channels_last and bf16
   autocast + channels_last, alternating in the same run after a warm-up each; frozen-backbone steps too. Prints
   images/s and the ratios against plain fp32.
2. Time to floor: fine-tunes on brain_mri_yes_no fold 0 (group-aware, seed 0) with the bundle's transforms and
   prints the wall time until validation accuracy first reaches --floor (0 skips this part).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from medpipe.nets.efficientnet_lite0 import EfficientNetLite0


def train_step_fn(
    net: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor, precision: str
) -> Callable[[], None]:
    """One optimiser step of `net` on a fixed batch, under autocast when precision is 'bf16'."""
    params = [p for p in net.parameters() if p.requires_grad]
    optimiser = torch.optim.Adam(params, lr=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = loss_fn(net(batch).float(), labels)
        loss.backward()
        optimiser.step()

    return step


def throughput(image_size: int, batch_size: int, steps: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(batch_size, 1, image_size, image_size)
    y = torch.randint(0, 2, (batch_size, 1)).float()
    runs: dict[str, Callable[[], None]] = {}
    for name, precision, freeze, channels_last in [
        ("fine-tune fp32", "fp32", False, False),
        ("fine-tune fp32 + channels_last", "fp32", False, True),
        ("fine-tune bf16 + channels_last", "bf16", False, True),
        ("frozen fp32", "fp32", True, False),
        ("frozen bf16 + channels_last", "bf16", True, True),
    ]:
        net = EfficientNetLite0(pretrained=True, freeze_backbone=freeze).train()
        batch = x
        if channels_last:
            net, batch = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        runs[name] = train_step_fn(net, batch, y, precision)
        runs[name]()  # warm-up (allocations, oneDNN kernel selection)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):  # alternate so that other load on the machine hits every variant alike
        for name, step in runs.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    rate = {name: batch_size / statistics.median(t) for name, t in times.items()}
    print(f"training throughput, {image_size}x{image_size}, batch {batch_size}, {torch.get_num_threads()} thread(s), "
          f"median of {steps} steps:")  # fmt: skip
    for name, r in rate.items():
        print(f"  {name:<34} {r:7.1f} images/s")
    base = rate["fine-tune fp32"]
    print(f"  fine-tune vs fp32: channels_last {rate['fine-tune fp32 + channels_last'] / base:.2f}x, "
          f"bf16 + channels_last {rate['fine-tune bf16 + channels_last'] / base:.2f}x; "
          f"frozen bf16/fp32 {rate['frozen bf16 + channels_last'] / rate['frozen fp32']:.2f}x")  # fmt: skip


def time_to_floor(image_size: int, floor: float, epochs: int, precision: str, lr: float) -> None:
    """Fine-tune on fold 0 of the yes/no set; report wall time until val accuracy >= floor."""
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, RandAffined, RandFlipd, Resized

    from medpipe.data.datalists import class_folder_datalists, dataset_dir
    from medpipe.io.images import LoadGrey2Dd

    torch.manual_seed(0)
    lists = class_folder_datalists(dataset_dir("brain_mri_yes_no"), ["no", "yes"], fold=0, num_folds=5, seed=0)
    load = [LoadGrey2Dd("image"), Resized("image", (image_size, image_size), mode="area")]
    augment = [RandFlipd("image", prob=0.5, spatial_axis=1),
               RandAffined("image", prob=0.7, rotate_range=0.26, scale_range=0.1, translate_range=8)]  # fmt: skip
    train_ds = CacheDataset(lists["train"], Compose(load + augment), progress=False)
    train = DataLoader(train_ds, batch_size=16, shuffle=True)
    val = DataLoader(CacheDataset(lists["val"], Compose(load), progress=False), batch_size=32)
    net = EfficientNetLite0(pretrained=True).to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        net.train()
        for batch in train:
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(**autocast):
                logits = net(batch["image"].contiguous(memory_format=torch.channels_last)).float()
            loss_fn(logits, batch["label"].float().view(-1, 1)).backward()
            optimiser.step()
        net.eval()
        correct = 0
        with torch.no_grad(), torch.autocast(**autocast):
            for batch in val:
                pred = net(batch["image"]).float().view(-1) > 0
                correct += int((pred == batch["label"].bool()).sum())
        accuracy = correct / len(lists["val"])
        elapsed = time.perf_counter() - start
        print(f"  epoch {epoch:2d}: val accuracy {accuracy:.3f} ({len(lists['val'])} images), {elapsed:6.1f} s")
        if accuracy >= floor:
            print(f"time to val accuracy >= {floor} ({precision}, fold 0): {elapsed:.1f} s, {epoch} epoch(s)")
            return
    print(f"val accuracy never reached {floor} in {epochs} epochs ({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--floor", type=float, default=0.95, help="0 skips the time-to-floor run")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--lr", type=float, default=3e-4)
    args = parser.parse_args()
    throughput(args.image_size, args.batch_size, args.steps)
    if args.floor > 0:
        time_to_floor(args.image_size, args.floor, args.epochs, args.precision, args.lr)


if __name__ == "__main__":
    main()
