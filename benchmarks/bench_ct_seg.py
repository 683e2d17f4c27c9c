"""covid_ct_seg speed: a 512² CT series → lung/infection masks (target ≤ 10 s on 2 cores), and training images/s.

Prints each stage's time and ratios against a baseline measured in the same run (fp32, one slice at a time,
contiguous memory). The network is the bundle's default UNet; weights do not change the speed, so a checkpoint is
optional (--ckpt) and random weights are used without one.

    OMP_NUM_THREADS=2 python benchmarks/bench_ct_seg.py [--series DIR] [--ckpt model.pt] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "covid_ct_seg"


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bundle_network(image_size: int, ckpt: str | None) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["image_size"] = image_size
    network = parser.get_parsed_content("network_def")
    if ckpt:
        network.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
    return network.eval()


def bench_volume(series: Path, ckpt: str | None, image_size: int) -> None:
    from medpipe.inference.ct_volume import predict_slices
    from medpipe.inferers.autocast import AutocastInferer
    from medpipe.io import ct, dicom_seg
    from medpipe.transforms.ct_intensity import check_axial_ct, ct_to_model_slices

    t_load, volume = timed(lambda: ct.load_volume(series))
    check_axial_ct(volume, str(series))
    t_pre, slices = timed(lambda: ct_to_model_slices(volume))
    print(f"series {series.name}: {volume.array.shape}, load {t_load:.2f} s, window+resize+CLAHE {t_pre:.2f} s")
    variants = {
        "fp32, 1 slice/batch (baseline)": (AutocastInferer("fp32", False), 1, False),
        "fp32, 32 slices/batch": (AutocastInferer("fp32", False), 32, False),
        "fp32, 32 slices/batch, channels_last": (AutocastInferer("fp32", True), 32, True),
        "bf16, 32 slices/batch, channels_last": (AutocastInferer("bf16", True), 32, True),
    }
    times, outputs = {}, {}
    for name, (inferer, batch, channels_last) in variants.items():
        network = bundle_network(image_size, ckpt)
        if channels_last:
            network = network.to(memory_format=torch.channels_last)
        run = partial(predict_slices, slices, network, inferer, image_size, batch)
        times[name], outputs[name] = timed(run, 2)
    base = next(iter(times.values()))
    reference = np.argmax(next(iter(outputs.values())), axis=1)
    for name, seconds in times.items():
        agree = float(np.mean(np.argmax(outputs[name], axis=1) == reference))
        print(f"  predict {name:40s} {seconds:6.2f} s  x{base / seconds:5.2f}  label agreement {agree:.4f}")
    best = min(times, key=times.get)
    t_back, mask = timed(lambda: ct.reassemble(list(outputs[best]), volume.array.shape, volume.affine))
    with tempfile.TemporaryDirectory() as tmp:
        t_nii, _ = timed(lambda: ct.write_mask_nifti(mask, volume.affine, Path(tmp) / "seg.nii.gz"))
        t_seg, _ = timed(
            lambda: dicom_seg.write_dicom_seg(mask, volume, Path(tmp) / "seg.dcm", {1: "lung", 2: "infection"})
        )
    masks = t_load + t_pre + times[best] + t_back
    print(f"  reassemble to {volume.array.shape[:2]} {t_back:.2f} s, NIfTI {t_nii:.2f} s, DICOM-SEG {t_seg:.2f} s")
    print(f"series -> masks ({best}): {masks:.2f} s (target <= 10 s); with NIfTI + DICOM-SEG files "
          f"{masks + t_nii + t_seg:.2f} s; baseline predict would give {t_load + t_pre + base + t_back:.2f} s")


def train_step(
    network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
    bf16: bool,
) -> None:
    optimizer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = network(x)
    loss_fn(out.float(), y).backward()
    optimizer.step()


def bench_training(image_size: int, batch: int = 16, steps: int = 4) -> None:
    from monai.losses import DiceCELoss

    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.rand(batch, 1, image_size, image_size)
    y = torch.randint(0, 3, (batch, 1, image_size, image_size))
    rates = {}
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            torch.manual_seed(0)
            network = bundle_network(image_size, None).train()
            inputs = x
            if channels_last:
                network = network.to(memory_format=torch.channels_last)
                inputs = x.contiguous(memory_format=torch.channels_last)
            optimizer = torch.optim.AdamW(network.parameters(), 1e-3)
            step = partial(train_step, network, optimizer, loss_fn, inputs, y, precision == "bf16")
            step()  # warm-up
            seconds, _ = timed(lambda: [step() for _ in range(steps)])  # noqa: B023 (called right here)
            rates[(precision, channels_last)] = batch * steps / seconds
    base = rates[("fp32", False)]
    for (precision, channels_last), rate in rates.items():
        layout = "channels_last" if channels_last else "contiguous"
        print(f"  train {precision} {layout:13s} {rate:7.1f} images/s  x{rate / base:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data = Path(os.environ.get("MEDPIPE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--series", type=Path, default=data / "dicom" / "rider_pilot_chest_ct_0117")
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, image_size {args.image_size}")
    bench_volume(args.series, args.ckpt, args.image_size)
    print(f"training speed at {args.image_size}x{args.image_size}, batch 16 (UNet of train.json):")
    bench_training(args.image_size)


if __name__ == "__main__":
    main()
