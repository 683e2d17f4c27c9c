"""Training speed of the paper's CNN: medpipe (PyTorch) against Keras (the paper's framework), and medpipe's
precision / memory-format options, all measured in this one run on the same images.

    python benchmarks/bench_train_speed.py [--steps 30] [--accuracy] [--cv [--cv_parallel 2]] [--profile]

Prints images/s and the ratio against the Keras baseline, and the ceiling this machine's matmul rate puts on
images/s (--profile: where the default path's step spends its time). --accuracy trains fold 0 of the bundle in
fp32 and in the fastest option and checks that accuracy stays inside fp32's bootstrap CI. --cv times the whole
5-fold CV as `medpipe cv brain_tumor_cls --network paper_cnn --parallel 2` runs it, without per-epoch validation.
Keras needs the optional extra (pip install -e ".[bench]", tensorflow-cpu) in this interpreter or in the one
given by --keras-python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medpipe.data.datalists import scan_class_folders
from medpipe.data.synthetic import make_synthetic_set
from medpipe.inferers.autocast import AutocastInferer
from medpipe.io.images import load_grey_2d
from medpipe.nets.paper_cnn import PaperCNN

BATCH, SIZE = 16, 128


def load_images(limit: int = 160) -> tuple[np.ndarray, np.ndarray, str]:
    """(N, 1, 128, 128) float32 images and labels: the real yes/no set when present, else synthetic."""
    real = Path(os.environ.get("MEDPIPE_DATA", "/nonexistent")) / "brain_mri_yes_no"
    root, source = (real, "real brain_mri_yes_no") if real.is_dir() else (None, "SYNTHETIC images")
    if root is None:
        root = make_synthetic_set(tempfile.mkdtemp(), per_class=limit // 2, size=SIZE)
    items = scan_class_folders(root, ["no", "yes"])[:limit]
    resize = torch.nn.functional.interpolate
    images = [resize(torch.from_numpy(load_grey_2d(it["image"]))[None, None], size=(SIZE, SIZE), mode="area")[0]
              for it in items]  # fmt: skip
    return torch.stack(images).numpy(), np.array([it["label"] for it in items], np.float32), source


def torch_images_per_s(
    x: np.ndarray, y: np.ndarray, precision: str, channels_last: bool, steps: int, profile: bool = False
) -> float:
    """The bundle's training step (AutocastInferer + BCEWithLogits + Adam) on PaperCNN; `profile` also prints
    torch.profiler's per-op, per-shape table of the timed steps (which layer the time goes to)."""
    torch.manual_seed(0)
    net = PaperCNN()
    net = net.to(memory_format=torch.channels_last) if channels_last else net
    inferer, loss_fn = AutocastInferer(precision, channels_last), torch.nn.BCEWithLogitsLoss()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    n_batches = len(x) // BATCH

    def step(i: int) -> None:
        b = slice((i % n_batches) * BATCH, (i % n_batches + 1) * BATCH)
        opt.zero_grad()
        loss_fn(inferer(xt[b], net), yt[b]).backward()
        opt.step()

    for i in range(3):  # warm-up: oneDNN primitive creation
        step(i)
    if profile:
        with torch.profiler.profile(record_shapes=True) as prof:
            for i in range(steps):
                step(i)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=12))
    start = time.perf_counter()
    for i in range(steps):
        step(i)
    return steps * BATCH / (time.perf_counter() - start)


def training_macs_per_image(net: torch.nn.Module) -> int:
    """Multiply-accumulates of one training step per image: forward F, weight gradient F, input gradient F for every
    layer but the first (the image needs no gradient); conv and linear layers only, the rest is memory-bound."""
    layers: list[int] = []

    def count(module: torch.nn.Module, _: tuple, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            layers.append(out[0].numel() * k)
        elif isinstance(module, torch.nn.Linear):
            layers.append(module.in_features * module.out_features)

    hooks = [m.register_forward_hook(count) for m in net.modules()]
    with torch.no_grad():
        net(torch.zeros(1, 1, SIZE, SIZE))
    for h in hooks:
        h.remove()
    return 3 * sum(layers) - layers[0]


def matmul_gmacs(size: int = 2048, repeats: int = 20) -> float:
    """This machine's fp32 multiply-accumulate rate on one large square matmul (GMAC/s): the practical ceiling of
    dense kernels on these threads, which a small network's convolutions can approach but not pass."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * size**3 / (time.perf_counter() - start) / 1e9


def keras_images_per_s(x: np.ndarray, y: np.ndarray, steps: int, python: str) -> float | None:
    """The same architecture in Keras (benchmarks/keras_paper_cnn.py), in `python` (an interpreter with TensorFlow)."""
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "images.npz", x=x, y=y, batch=BATCH)
        script = Path(__file__).with_name("keras_paper_cnn.py")
        args = [python, str(script), str(Path(tmp) / "images.npz"), str(steps), str(torch.get_num_threads())]
        result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"Keras run failed ({python}): {result.stderr.strip().splitlines()[-1:]}")
        return None
    return float(result.stdout.strip().splitlines()[-1])


def fold0_accuracy(precision: str, channels_last: bool, out: Path) -> dict:
    from medpipe.bundle.config import find_bundle, run_bundle

    common = {"fold": 0, "ckpt_dir": str(out), "output_dir": str(out), "precision": precision,
              "channels_last": channels_last}  # fmt: skip
    run_bundle(find_bundle("brain_tumor_cls"), "train", **common)
    run_bundle(find_bundle("brain_tumor_cls"), "evaluate", **common)
    return json.loads((out / "metrics.json").read_text())["metrics"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--cv", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print where the default path's step spends its time")
    parser.add_argument("--cv_parallel", type=int, default=2, help="folds trained at a time by --cv")
    parser.add_argument("--keras-python", default=sys.executable, help="an interpreter with tensorflow-cpu installed")
    args = parser.parse_args()

    x, y, source = load_images()
    print(f"paper CNN, batch {BATCH}, {SIZE}x{SIZE} grey, {len(x)} {source}, torch threads {torch.get_num_threads()}")
    keras_ips = keras_images_per_s(x, y, args.steps, args.keras_python)
    print(f"{'Keras (TensorFlow ' + ('n/a' if keras_ips is None else 'CPU') + ')':34s} "
          + ("not installed: pip install -e '.[bench]'" if keras_ips is None else f"{keras_ips:8.1f} img/s  1.00x"))
    results = {}
    for precision, channels_last in [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]:
        profile = args.profile and (precision, channels_last) == ("fp32", True)
        ips = torch_images_per_s(x, y, precision, channels_last, args.steps, profile)
        results[(precision, channels_last)] = ips
        ratio = f"{ips / keras_ips:5.2f}x Keras" if keras_ips else ""
        print(f"medpipe {precision:4s} channels_last={channels_last!s:5s}       {ips:8.1f} img/s  {ratio}")
    best = max(results, key=results.get)
    # roofline: even at large-matmul speed with zero overhead a training step cannot go faster than this
    macs, gmacs = training_macs_per_image(PaperCNN()), matmul_gmacs()
    ceiling = gmacs * 1e9 / macs
    keras_share = ""
    if keras_ips:
        keras_share = f", Keras {keras_ips / ceiling:.0%}; 1.5x Keras needs {1.5 * keras_ips / ceiling:.0%}"
    print(f"ceiling: {macs / 1e6:.0f} M multiply-adds per training image at {gmacs:.0f} GMAC/s (2048^2 fp32 matmul)"
          f" = {ceiling:.0f} img/s; medpipe default {results[('fp32', True)] / ceiling:.0%} of it{keras_share}")
    print(f"fastest: {best[0]} channels_last={best[1]} ({results[best] / results[('fp32', False)]:.2f}x plain fp32)")

    if args.accuracy:
        with tempfile.TemporaryDirectory() as tmp:
            base = fold0_accuracy("fp32", False, Path(tmp) / "fp32")
            fast = fold0_accuracy(best[0], best[1], Path(tmp) / "fast")
        inside = base["ci95"][0] <= fast["value"] <= base["ci95"][1]
        print(f"fold-0 accuracy: fp32 {base['value']:.3f} (95% CI {base['ci95'][0]:.3f}-{base['ci95'][1]:.3f}), "
              f"{best[0]}/channels_last={best[1]} {fast['value']:.3f}: {'inside' if inside else 'OUTSIDE'} fp32's CI")
    if args.cv:
        from medpipe.evaluation.cv import run_cv

        # the held-out fold is scored once, by the evaluate job: no per-epoch validation on it during CV
        overrides = {"val_interval": 1000}
        with tempfile.TemporaryDirectory() as tmp:
            summary = run_cv("brain_tumor_cls", "paper_cnn", 5, "group", tmp, parallel=args.cv_parallel, **overrides)
        accuracy = summary["pooled_out_of_fold"]["metrics"]["accuracy"]
        print(f"5-fold group CV of paper_cnn, {args.cv_parallel} fold(s) at a time: wall time "
              f"{summary['wall_time_s']:.0f} s (target <= 300 s); pooled accuracy {accuracy['value']:.3f} "
              f"{accuracy['ci95']}")  # fmt: skip


if __name__ == "__main__":
    main()
