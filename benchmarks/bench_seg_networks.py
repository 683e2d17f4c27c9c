"""CPU cost of candidate 2-D segmentation networks for covid_ct_seg: one training step (batch 16 at 128², 3 input
channels, AdamW) and inference of 16 slices at 256², with seeded random weights and inputs.

    OMP_NUM_THREADS=2 python benchmarks/bench_seg_networks.py [--repeat 4]

The networks are the default 5-level UNet, the v1 4-level UNet (1 channel), and MONAI DynUNets (nnU-Net's
architecture, deep supervision on) of the same widths; sizes a recipe to the CPU budget before a CV is run.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.networks.nets import DynUNet, UNet


def candidates() -> dict[str, tuple[torch.nn.Module, int]]:
    def dynunet(filters: tuple[int, ...]) -> DynUNet:
        levels = len(filters)
        return DynUNet(2, 3, 3, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
                       upsample_kernel_size=[2] * (levels - 1), filters=filters, deep_supervision=True,
                       deep_supr_num=levels - 3, res_block=True)  # fmt: skip

    return {
        "UNet 16-256, 3 ch (default)": (UNet(2, 3, 3, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2), 3),
        "UNet 16-128, 1 ch (v1)": (UNet(2, 1, 3, (16, 32, 64, 128), (2, 2, 2), num_res_units=2), 1),
        "DynUNet 16-256, 3 ch": (dynunet((16, 32, 64, 128, 256)), 3),
        "DynUNet 32-320, 3 ch": (dynunet((32, 64, 128, 256, 320)), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':30s} {'parameters':>10s} {'train step s':>13s} {'infer 16x256² s':>16s}")
    for name, (net, channels) in candidates().items():
        optimizer = torch.optim.AdamW(net.parameters())
        x = torch.rand(16, channels, 128, 128)
        times = []
        for i in range(args.repeat + 1):  # the first step warms up
            started = time.perf_counter()
            out = net(x)
            out = out[:, 0] if out.ndim == 5 else out  # DynUNet stacks its deep-supervision heads in training
            out.float().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            if i:
                times.append(time.perf_counter() - started)
        net.eval()
        with torch.no_grad():
            started = time.perf_counter()
            net(torch.rand(16, channels, 256, 256))
            infer = time.perf_counter() - started
        params = sum(p.numel() for p in net.parameters()) / 1e6
        print(f"{name:30s} {params:9.2f}M {sorted(times)[len(times) // 2]:13.3f} {infer:16.3f}")


if __name__ == "__main__":
    main()
