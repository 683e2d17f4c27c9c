"""CPU inference speed of the exported runtimes, as ratios to eager fp32 PyTorch measured in the same run.

Cases: brain_tumor_cls EfficientNet-Lite0 (batch 64 at 128² and 224²), covid_cxr_cls's default network (batch 64 at
its trained size), covid_ct_seg's UNet on the 95-slice RIDER series (whole volumetric pipeline after loading, and the
network alone on the 95 prepared slices in batches of 32). Variants: torch fp32 (baseline), torch channels_last,
onnxruntime fp32, onnxruntime int8 (static, calibrated on 32 training images through the bundle's preprocessing),
torchscript. Weights are seeded random ones (speed does not depend on them; agreement with eager is shown, but
int8's accuracy change needs trained models). Inputs are real images through the bundle's preprocessing.

    OMP_NUM_THREADS=2 MEDPIPE_DATA=/work/shared/data python benchmarks/bench_runtime.py [--threads 2] [--repeat 2]
        [--cases brain128,brain224,cxr,ct] [--batch 64] [--ct_networks default,unet5_25d]

Run it on an otherwise idle machine: variants take turns (round robin) so a load change spreads over all of them,
but a load that stops mid-run still skews a row measured once.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("torch fp32", "torch channels_last", "onnxruntime fp32", "onnxruntime int8", "torchscript")


def round_robin(calls: dict[str, Callable[[], object]], repeat: int, warmup: dict[str, int]) -> dict[str, tuple]:
    """{variant: (median seconds, last result)}: variants take turns, so load from other processes on a shared CPU
    falls on all of them alike instead of on whichever ran during a busy minute."""
    for name, fn in calls.items():
        for _ in range(warmup.get(name, 0)):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, object] = {}
    for _ in range(repeat):
        for name, fn in calls.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in calls}


def networks(bundle: str, network: str | None, overrides: dict, folder: Path) -> tuple[dict, object]:
    """Each variant's network for a bundle network with seeded random weights, exported into `folder`."""
    from medpipe.export.exporters import bundle_network, export_network
    from medpipe.export.runtime import runtime_network

    torch.manual_seed(0)
    bundle_net = bundle_network(REPO / "bundles" / bundle, network, overrides)
    ckpt = folder / "model.pt"
    torch.save(bundle_net.net.state_dict(), ckpt)
    for fmt, quantize in (("onnx", None), ("onnx", "int8"), ("torchscript", None)):
        export_network(bundle_net, ckpt, fmt, quantize, calibration_images=32)
    net = bundle_net.net.eval()
    return {
        "torch fp32": net,
        "torch channels_last": copy.deepcopy(net).to(memory_format=torch.channels_last),
        "onnxruntime fp32": runtime_network(net, "onnxruntime", ckpt),
        "onnxruntime int8": runtime_network(net, "onnxruntime_int8", ckpt),
        "torchscript": runtime_network(net, "torchscript", ckpt),
    }, bundle_net


def labels(outputs: torch.Tensor | np.ndarray) -> np.ndarray:
    outputs = np.asarray(outputs)
    return (outputs[:, 0] > 0).astype(int) if outputs.shape[1] == 1 else np.argmax(outputs, axis=1)


def call(net: torch.nn.Module, variant: str, batch: torch.Tensor, chunk: int) -> np.ndarray:
    """The network on `batch` in chunks, channels_last input for the channels_last variant (as AutocastInferer)."""
    outs = []
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            x = batch[start : start + chunk]
            if variant == "torch channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(net(x).float().numpy())
    return np.concatenate(outs)


def bench_batch(title: str, nets: dict, batch: torch.Tensor, repeat: int, chunk: int) -> list[tuple]:
    calls = {v: (lambda v=v: call(nets[v], v, batch, chunk)) for v in VARIANTS}
    # one warm-up each; TorchScript's profiling executor optimises on its second call
    timed = round_robin(calls, repeat, {v: 2 if v == "torchscript" else 1 for v in VARIANTS})
    reference = labels(timed["torch fp32"][1])
    return [(title, v, timed[v][0], float(np.mean(labels(timed[v][1]) == reference))) for v in VARIANTS]


def bench_ct(series: Path, nets: dict, image_size: int, repeat: int, context: int = 1, name: str = "UNet") -> list:
    """The network alone on the prepared slices, then the whole pipeline after loading (the networks are warm by
    then: no warm-up run). context: the network's 2.5-D input slices."""
    from medpipe.inference.ct_volume import VolumeSegmenter
    from medpipe.inferers.autocast import AutocastInferer
    from medpipe.io import ct
    from medpipe.transforms.ct_intensity import ct_to_model_slices
    from medpipe.transforms.slice_context import stack_context

    volume = ct.load_volume(series)
    slices = torch.from_numpy(stack_context(ct_to_model_slices(volume), context))
    slices = torch.nn.functional.interpolate(slices, size=(image_size, image_size), mode="area")
    rows = bench_batch(f"CT {name} {len(slices)} slices, network alone", nets, slices, repeat, 32)
    segmenters = {v: VolumeSegmenter(nets[v], image_size, inferer=AutocastInferer(channels_last="last" in v),
                                     context_slices=context) for v in VARIANTS}  # fmt: skip
    timed = round_robin({v: (lambda s=segmenters[v]: s.segment(volume)) for v in VARIANTS}, repeat, {})
    reference = timed["torch fp32"][1]
    title = f"CT {name} {volume.array.shape} whole pipeline"
    return rows + [(title, v, timed[v][0], float(np.mean(timed[v][1] == reference))) for v in VARIANTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="classification batch size")
    parser.add_argument("--cases", default="brain128,brain224,cxr,ct", help="comma-separated subset to run")
    parser.add_argument("--series", default=None, help="CT DICOM series (default: the RIDER series under MEDPIPE_DATA)")
    parser.add_argument("--ct_networks", default="default", help="covid_ct_seg networks for the ct case (comma list)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medpipe.export.int8 import calibration_batches

    data = Path(os.environ.get("MEDPIPE_DATA", REPO.parent / "shared" / "data"))
    series = Path(args.series) if args.series else data / "dicom" / "rider_pilot_chest_ct_0117"
    rows: list[tuple] = []
    started = time.perf_counter()
    chosen = {c.strip() for c in args.cases.split(",")}
    cases = [case[1:] for case in (
        ("brain128", "brain_tumor_cls", "efficientnet_lite0_4class", {"image_size": 128}, "brain Lite0 64x128²"),
        ("brain224", "brain_tumor_cls", "efficientnet_lite0_4class_224", {"image_size": 224}, "brain Lite0 64x224²"),
        ("cxr", "covid_cxr_cls", None, {"pretrained": False}, "CXR {net} 64x{size}²"),
    ) if case[0] in chosen]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        for i, (bundle, network, overrides, title) in enumerate(cases):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            nets, bundle_net = networks(bundle, network, overrides, folder)
            batch = torch.from_numpy(np.concatenate(calibration_batches(bundle_net, args.batch)))
            net_name = bundle_net.parser.get_parsed_content("network_name")
            title = title.format(net=net_name, size=batch.shape[-1])
            rows += bench_batch(title.replace("64x", f"{len(batch)}x"), nets, batch, args.repeat, len(batch))
        for ct_network in args.ct_networks.split(",") if "ct" in chosen else []:
            folder = Path(tmp) / f"ct_{ct_network}"
            folder.mkdir()
            network = None if ct_network == "default" else ct_network
            nets, bundle_net = networks("covid_ct_seg", network, {}, folder)
            size, context = int(bundle_net.example.shape[-1]), int(bundle_net.example.shape[1])
            name = str(bundle_net.parser.get_parsed_content("network_name"))
            rows += bench_ct(series, nets, size, args.repeat, context, name)
    import onnxruntime

    elapsed = time.perf_counter() - started
    print(f"\ntorch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
          f"(intra-op threads = torch's), {os.cpu_count()} CPUs; random weights; median of {args.repeat} "
          f"after warm-up; whole run {elapsed:.0f} s")  # fmt: skip
    print(f"{'case':38s} {'variant':22s} {'seconds':>8s} {'x eager':>8s} {'same labels as eager':>21s}")
    base: dict[str, float] = {}
    for title, variant, seconds, agree in rows:
        base.setdefault(title, seconds)
        print(f"{title:38s} {variant:22s} {seconds:8.3f} {base[title] / seconds:8.2f} {agree:21.4f}")


if __name__ == "__main__":
    main()
